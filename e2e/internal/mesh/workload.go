package mesh

import (
	"context"
	"fmt"
	"maps"
	"sort"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/utils/ptr"

	"github.com/amesh-dev/amesh/e2e/internal/kube"
)

// Workload is a sample application Deployment with its ServiceAccount and
// (optionally) a Service, for tests that need their own topology.
type Workload struct {
	// Name names the Deployment (and the ServiceAccount unless set).
	Name string
	// App is the "app" label shared by versions (default Name); the
	// Service selects on it.
	App string
	// Role is the sample role (default "details": a plain HTTP server
	// answering /echo with what it saw).
	Role    string
	Version string
	// ServiceAccount defaults to Name.
	ServiceAccount string
	Replicas       int
	// Node pins the pods to a node (spec.nodeName) when set.
	Node string
	// Service creates a ClusterIP Service named App on port 9080.
	Service bool
	// VersionService creates a Service named App-Version selecting only
	// this version (a route's backend).
	VersionService bool
	// PodLabels are added to the pod template's labels.
	PodLabels map[string]string
	// Env adds environment variables (test knobs: FAIL, DELAY, …).
	Env map[string]string
}

func (w Workload) defaults() Workload {
	if w.App == "" {
		w.App = w.Name
	}
	if w.Role == "" {
		w.Role = "details"
	}
	if w.Version == "" {
		w.Version = "v1"
	}
	if w.ServiceAccount == "" {
		w.ServiceAccount = w.Name
	}
	if w.Replicas == 0 {
		w.Replicas = 1
	}
	return w
}

// Selector is the label selector of the workload's pods.
func (w Workload) Selector() string {
	w = w.defaults()
	return fmt.Sprintf("app=%s,version=%s", w.App, w.Version)
}

// Objects returns the workload's Kubernetes objects.
func (w Workload) Objects(ns string) ([]*unstructured.Unstructured, error) {
	w = w.defaults()
	labels := map[string]string{"app": w.App, "version": w.Version}
	podLabels := maps.Clone(labels)
	maps.Copy(podLabels, w.PodLabels)
	env := []corev1.EnvVar{
		{Name: "ROLE", Value: w.Role},
		{Name: "VERSION", Value: w.Version},
		{Name: "SERVICE_NAME", Value: w.App},
		{Name: "POD_NAME", ValueFrom: &corev1.EnvVarSource{FieldRef: &corev1.ObjectFieldSelector{FieldPath: "metadata.name"}}},
		{Name: "POD_NAMESPACE", ValueFrom: &corev1.EnvVarSource{FieldRef: &corev1.ObjectFieldSelector{FieldPath: "metadata.namespace"}}},
	}
	keys := make([]string, 0, len(w.Env))
	for k := range w.Env {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		env = append(env, corev1.EnvVar{Name: k, Value: w.Env[k]})
	}
	sa := &corev1.ServiceAccount{
		TypeMeta:   metav1.TypeMeta{APIVersion: "v1", Kind: "ServiceAccount"},
		ObjectMeta: metav1.ObjectMeta{Name: w.ServiceAccount, Namespace: ns},
	}
	dep := &appsv1.Deployment{
		TypeMeta:   metav1.TypeMeta{APIVersion: "apps/v1", Kind: "Deployment"},
		ObjectMeta: metav1.ObjectMeta{Name: w.Name, Namespace: ns, Labels: labels},
		Spec: appsv1.DeploymentSpec{
			Replicas: ptr.To(int32(w.Replicas)),
			Selector: &metav1.LabelSelector{MatchLabels: labels},
			Template: corev1.PodTemplateSpec{
				ObjectMeta: metav1.ObjectMeta{Labels: podLabels},
				Spec: corev1.PodSpec{
					ServiceAccountName:            w.ServiceAccount,
					NodeName:                      w.Node,
					TerminationGracePeriodSeconds: ptr.To(int64(5)),
					SecurityContext: &corev1.PodSecurityContext{
						RunAsNonRoot: ptr.To(true), RunAsUser: ptr.To(int64(65532)), RunAsGroup: ptr.To(int64(65532)),
					},
					Containers: []corev1.Container{{
						Name:            "app",
						Image:           SampleImage,
						ImagePullPolicy: corev1.PullIfNotPresent,
						Env:             env,
						Ports:           []corev1.ContainerPort{{Name: "http", ContainerPort: PortApp}},
						ReadinessProbe: &corev1.Probe{
							ProbeHandler:  corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{Path: "/readyz", Port: intstr.FromInt32(PortApp)}},
							PeriodSeconds: 1,
						},
						SecurityContext: &corev1.SecurityContext{
							AllowPrivilegeEscalation: ptr.To(false),
							ReadOnlyRootFilesystem:   ptr.To(true),
							Capabilities:             &corev1.Capabilities{Drop: []corev1.Capability{"ALL"}},
						},
					}},
				},
			},
		},
	}
	objs := []runtime.Object{sa, dep}
	if w.Service {
		objs = append(objs, &corev1.Service{
			TypeMeta:   metav1.TypeMeta{APIVersion: "v1", Kind: "Service"},
			ObjectMeta: metav1.ObjectMeta{Name: w.App, Namespace: ns, Labels: map[string]string{"app": w.App}},
			Spec: corev1.ServiceSpec{
				Selector: map[string]string{"app": w.App},
				Ports: []corev1.ServicePort{{
					Name: "http", Port: PortApp, TargetPort: intstr.FromInt32(PortApp), AppProtocol: ptr.To("http"),
				}},
			},
		})
	}
	if w.VersionService {
		objs = append(objs, &corev1.Service{
			TypeMeta:   metav1.TypeMeta{APIVersion: "v1", Kind: "Service"},
			ObjectMeta: metav1.ObjectMeta{Name: w.App + "-" + w.Version, Namespace: ns, Labels: labels},
			Spec: corev1.ServiceSpec{
				Selector: labels,
				Ports: []corev1.ServicePort{{
					Name: "http", Port: PortApp, TargetPort: intstr.FromInt32(PortApp), AppProtocol: ptr.To("http"),
				}},
			},
		})
	}
	return toUnstructured(objs...)
}

func toUnstructured(objs ...runtime.Object) ([]*unstructured.Unstructured, error) {
	out := make([]*unstructured.Unstructured, 0, len(objs))
	for _, o := range objs {
		m, err := runtime.DefaultUnstructuredConverter.ToUnstructured(o)
		if err != nil {
			return nil, fmt.Errorf("convert %T: %w", o, err)
		}
		u := &unstructured.Unstructured{Object: m}
		unstructured.RemoveNestedField(u.Object, "status")
		unstructured.RemoveNestedField(u.Object, "metadata", "creationTimestamp")
		unstructured.RemoveNestedField(u.Object, "spec", "template", "metadata", "creationTimestamp")
		out = append(out, u)
	}
	return out, nil
}

// Deploy applies the workloads and waits until their pods are Ready.
func Deploy(ctx context.Context, c *kube.Client, ns string, ws ...Workload) error {
	var objs []*unstructured.Unstructured
	for _, w := range ws {
		o, err := w.Objects(ns)
		if err != nil {
			return err
		}
		objs = append(objs, o...)
	}
	if err := c.Apply(ctx, objs...); err != nil {
		return err
	}
	for _, w := range ws {
		w = w.defaults()
		if _, err := c.WaitPods(ctx, ns, w.Selector(), w.Replicas, 2*time.Minute); err != nil {
			return err
		}
	}
	return nil
}

// ToolPod is a privileged pod with tcpdump, curl and a shell that sleeps
// until deleted: on the host network of node (to capture on the node's
// interfaces) when hostNetwork is set, else an ordinary pod. It is not
// enrolled (dataplane-mode none) unless enrol is set.
func ToolPod(ns, name, node string, hostNetwork, enrol bool) (*unstructured.Unstructured, error) {
	mode := ModeNone
	if enrol {
		mode = ModeAmbient
	}
	p := &corev1.Pod{
		TypeMeta: metav1.TypeMeta{APIVersion: "v1", Kind: "Pod"},
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns, Labels: map[string]string{
			"app": name, LabelDataplaneMode: mode,
		}},
		Spec: corev1.PodSpec{
			NodeName:                      node,
			HostNetwork:                   hostNetwork,
			TerminationGracePeriodSeconds: ptr.To(int64(1)),
			Containers: []corev1.Container{{
				Name:            "tool",
				Image:           ToolImage,
				ImagePullPolicy: corev1.PullIfNotPresent,
				Command:         []string{"sleep", "infinity"},
				SecurityContext: &corev1.SecurityContext{
					Privileged: ptr.To(hostNetwork),
					Capabilities: &corev1.Capabilities{
						Add: []corev1.Capability{"NET_ADMIN", "NET_RAW"},
					},
				},
			}},
		},
	}
	objs, err := toUnstructured(p)
	if err != nil {
		return nil, err
	}
	return objs[0], nil
}
