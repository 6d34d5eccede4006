package translate

import (
	"fmt"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/amesh-dev/amesh/controller/apis/security/v1alpha1"
	"github.com/amesh-dev/amesh/controller/internal/label"
)

// ScaleInput builds a mesh of pods and services spread over namespaces:
// every service selects pods/services pods by its own app label, has an HTTP
// port with a named target port and a metrics port; every namespace has an
// ALLOW policy per service.
func scaleInput(namespaces, services, pods int) *Input {
	in := &Input{RootCertificates: []string{testRoot}}
	for n := range namespaces {
		ns := fmt.Sprintf("ns-%d", n)
		in.Namespaces = append(in.Namespaces, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{
			Name: ns, Labels: map[string]string{label.DataplaneMode: label.DataplaneModeAmbient},
		}})
	}
	for s := range services {
		ns := fmt.Sprintf("ns-%d", s%namespaces)
		app := fmt.Sprintf("svc-%d", s)
		in.Services = append(in.Services, &corev1.Service{
			ObjectMeta: metav1.ObjectMeta{Name: app, Namespace: ns},
			Spec: corev1.ServiceSpec{
				Selector:  map[string]string{"app": app},
				ClusterIP: fmt.Sprintf("10.96.%d.%d", s/250, s%250+1),
				Ports: []corev1.ServicePort{
					{Name: "http", Port: 80, TargetPort: intstr.FromString("http")},
					{Name: "metrics", Port: 9090, TargetPort: intstr.FromInt32(9090)},
				},
			},
		})
		in.AuthorizationPolicies = append(in.AuthorizationPolicies, &v1alpha1.AuthorizationPolicy{
			ObjectMeta: metav1.ObjectMeta{Name: app, Namespace: ns},
			Spec: v1alpha1.AuthorizationPolicySpec{
				Selector: &v1alpha1.WorkloadSelector{MatchLabels: map[string]string{"app": app}},
				Rules: []v1alpha1.Rule{{From: []v1alpha1.RuleFrom{{Source: v1alpha1.Source{
					Principals: []string{"cluster.local/ns/" + ns + "/sa/client"},
				}}}}},
			},
		})
	}
	for p := range pods {
		s := p % services
		in.Pods = append(in.Pods, scalePod(p, fmt.Sprintf("ns-%d", s%namespaces), fmt.Sprintf("svc-%d", s), 0))
	}
	return in
}

func scalePod(p int, ns, app string, gen int) *corev1.Pod {
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{
			Name:        fmt.Sprintf("%s-%d", app, p),
			Namespace:   ns,
			UID:         types.UID(fmt.Sprintf("uid-%d", p)),
			Labels:      map[string]string{"app": app, "version": fmt.Sprintf("v%d", gen), "pod-template-hash": "abc"},
			Annotations: map[string]string{label.Redirection: label.RedirectionEnabled},
		},
		Spec: corev1.PodSpec{
			NodeName:           fmt.Sprintf("node-%d", p%50),
			ServiceAccountName: app,
			Containers: []corev1.Container{{Name: "app", Ports: []corev1.ContainerPort{
				{Name: "http", ContainerPort: 8080}, {Name: "metrics", ContainerPort: 9090},
			}}},
		},
		Status: corev1.PodStatus{
			Phase:      corev1.PodRunning,
			PodIP:      fmt.Sprintf("10.%d.%d.%d", 1+p/65536, (p/256)%256, p%256),
			Conditions: []corev1.PodCondition{{Type: corev1.PodReady, Status: corev1.ConditionTrue}},
		},
	}
}

// BenchmarkTranslate measures a full translation at the scale
// (10,000 pods, 1,000 services) next to a tenth of it as the baseline.
func BenchmarkTranslate(b *testing.B) {
	for _, sz := range []struct{ ns, svcs, pods int }{{10, 100, 1000}, {10, 1000, 10000}} {
		in := scaleInput(sz.ns, sz.svcs, sz.pods)
		b.Run(fmt.Sprintf("pods=%d/services=%d", sz.pods, sz.svcs), func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				out := Translate(Config{}, in)
				if len(out.Workloads) != sz.pods {
					b.Fatalf("got %d workloads", len(out.Workloads))
				}
			}
		})
	}
}

func TestScaleInput(t *testing.T) {
	out := Translate(Config{}, scaleInput(2, 4, 8))
	if len(out.Workloads) != 8 || len(out.Services) != 4 || len(out.Authorizations) != 4 {
		t.Fatalf("got %d workloads, %d services, %d authorizations", len(out.Workloads), len(out.Services), len(out.Authorizations))
	}
	for _, w := range out.Workloads {
		if len(w.Services) != 1 || len(w.AuthorizationPolicies) != 1 {
			t.Errorf("workload %s: services %v, policies %v", w.Name, w.Services, w.AuthorizationPolicies)
		}
		for _, pl := range w.Services {
			if len(pl.Ports) != 2 || pl.Ports[0].TargetPort != 8080 {
				t.Errorf("workload %s: ports %v", w.Name, pl.Ports)
			}
		}
	}
}
