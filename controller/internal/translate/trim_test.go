package translate

import (
	"bytes"
	"path/filepath"
	"testing"

	"github.com/google/go-cmp/cmp"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// TestTrimPod: every golden input translates to the same output with its
// pods trimmed as the controller's cache stores them, and a trimmed pod
// keeps what the certificate authorizer reads.
func TestTrimPod(t *testing.T) {
	files, err := filepath.Glob("testdata/*.in.yaml")
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range files {
		in := loadInput(t, f)
		want := render(t, Translate(Config{}, in))
		for i, p := range in.Pods {
			in.Pods[i] = TrimPod(p.DeepCopy())
		}
		if got := render(t, Translate(Config{}, in)); !bytes.Equal(got, want) {
			t.Errorf("%s: trimmed pods translate differently:\n%s", f, cmp.Diff(string(want), string(got)))
		}
	}

	always := corev1.ContainerRestartPolicyAlways
	p := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{
			Namespace: "shop", Name: "web-1", UID: "u1", Labels: map[string]string{"app": "web"},
			Annotations:     map[string]string{"amesh.dev/redirection": "enabled"},
			OwnerReferences: []metav1.OwnerReference{{Kind: "ReplicaSet", Name: "web-6d4b"}},
			ManagedFields:   []metav1.ManagedFieldsEntry{{Manager: "kubelet"}},
		},
		Spec: corev1.PodSpec{
			NodeName: "node-a", ServiceAccountName: "web", HostNetwork: true,
			Containers: []corev1.Container{{
				Name: "app", Image: "web:1", Ports: []corev1.ContainerPort{{Name: "http", ContainerPort: 8080}},
				Env:       []corev1.EnvVar{{Name: "A", Value: "b"}},
				Resources: corev1.ResourceRequirements{Limits: corev1.ResourceList{corev1.ResourceMemory: resource.MustParse("1Gi")}},
			}},
			InitContainers: []corev1.Container{{Name: "proxy", RestartPolicy: &always, Ports: []corev1.ContainerPort{{Name: "admin", ContainerPort: 9901}}}},
			Volumes:        []corev1.Volume{{Name: "data"}},
		},
		Status: corev1.PodStatus{
			Phase: corev1.PodRunning, PodIP: "10.0.0.5", PodIPs: []corev1.PodIP{{IP: "10.0.0.5"}}, HostIP: "172.18.0.2",
			Conditions:        []corev1.PodCondition{{Type: corev1.PodReady, Status: corev1.ConditionTrue}},
			ContainerStatuses: []corev1.ContainerStatus{{Name: "app", Ready: true}},
		},
	}
	want := &corev1.Pod{
		ObjectMeta: *p.ObjectMeta.DeepCopy(),
		Spec: corev1.PodSpec{
			NodeName: "node-a", ServiceAccountName: "web", HostNetwork: true,
			Containers:     []corev1.Container{{Name: "app", Ports: []corev1.ContainerPort{{Name: "http", ContainerPort: 8080}}}},
			InitContainers: []corev1.Container{{Name: "proxy", RestartPolicy: &always, Ports: []corev1.ContainerPort{{Name: "admin", ContainerPort: 9901}}}},
		},
		Status: corev1.PodStatus{
			Phase: corev1.PodRunning, PodIP: "10.0.0.5", PodIPs: []corev1.PodIP{{IP: "10.0.0.5"}},
			Conditions: []corev1.PodCondition{{Type: corev1.PodReady, Status: corev1.ConditionTrue}},
		},
	}
	want.ManagedFields = nil
	if d := cmp.Diff(want, TrimPod(p)); d != "" {
		t.Errorf("trimmed pod (-want +got):\n%s", d)
	}
}
