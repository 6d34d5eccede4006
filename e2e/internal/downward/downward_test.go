package downward

import (
	"testing"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

func TestFieldValue(t *testing.T) {
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "p", Namespace: "ns", UID: "u1", Labels: map[string]string{"b": "2", "a": "x\"y"}, Annotations: map[string]string{"k": "v"}},
		Spec:       corev1.PodSpec{NodeName: "n1", ServiceAccountName: "sa"},
		Status:     corev1.PodStatus{PodIP: "10.0.0.5", PodIPs: []corev1.PodIP{{IP: "10.0.0.5"}, {IP: "fd00::5"}}, HostIP: "172.30.0.11"},
	}
	tests := map[string]string{
		"metadata.name": "p", "metadata.namespace": "ns", "metadata.uid": "u1",
		"metadata.labels['b']": "2", "metadata.annotations['k']": "v", "metadata.labels['missing']": "",
		"metadata.labels": "a=\"x\\\"y\"\nb=\"2\"",
		"spec.nodeName":   "n1", "spec.serviceAccountName": "sa",
		"status.podIP": "10.0.0.5", "status.podIPs": "10.0.0.5,fd00::5", "status.hostIP": "172.30.0.11",
	}
	for path, want := range tests {
		got, err := FieldValue(pod, path)
		if err != nil || got != want {
			t.Errorf("FieldValue(%s) = %q, %v; want %q", path, got, err, want)
		}
	}
	if _, err := FieldValue(pod, "spec.containers"); err == nil {
		t.Error("unsupported path accepted")
	}
}

func TestResourceValue(t *testing.T) {
	c := &corev1.Container{Resources: corev1.ResourceRequirements{
		Limits:   corev1.ResourceList{corev1.ResourceCPU: resource.MustParse("250m"), corev1.ResourceMemory: resource.MustParse("64Mi")},
		Requests: corev1.ResourceList{corev1.ResourceCPU: resource.MustParse("100m")},
	}}
	node := Allocatable{CPU: resource.MustParse("8"), Memory: resource.MustParse("16Gi")}
	tests := []struct {
		res, divisor, want string
	}{
		{"limits.cpu", "", "1"},
		{"limits.cpu", "1m", "250"},
		{"requests.cpu", "1m", "100"},
		{"limits.memory", "1Mi", "64"},
		{"requests.memory", "", "0"},
	}
	for _, tt := range tests {
		ref := &corev1.ResourceFieldSelector{Resource: tt.res}
		if tt.divisor != "" {
			ref.Divisor = resource.MustParse(tt.divisor)
		}
		got, err := ResourceValue(c, ref, node)
		if err != nil || got != tt.want {
			t.Errorf("%s/%s = %q, %v; want %s", tt.res, tt.divisor, got, err, tt.want)
		}
	}
	if got, _ := ResourceValue(&corev1.Container{}, &corev1.ResourceFieldSelector{Resource: "limits.cpu"}, node); got != "8" {
		t.Errorf("unset cpu limit = %s, want the node's 8", got)
	}
}
