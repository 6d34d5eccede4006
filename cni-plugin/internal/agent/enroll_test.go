package agent

import (
	"slices"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
)

func TestShouldEnroll(t *testing.T) {
	exclude := []string{"kube-system", "amesh-system"}
	ns := func(name, mode string) *corev1.Namespace {
		n := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name}}
		if mode != "" {
			n.Labels = map[string]string{LabelDataplaneMode: mode}
		}
		return n
	}
	pod := func(namespace, mode string, hostNet bool) *corev1.Pod {
		p := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: "p", Namespace: namespace}, Spec: corev1.PodSpec{HostNetwork: hostNet}}
		if mode != "" {
			p.Labels = map[string]string{LabelDataplaneMode: mode}
		}
		return p
	}
	for _, tc := range []struct {
		name string
		pod  *corev1.Pod
		ns   *corev1.Namespace
		want bool
	}{
		{"namespace ambient", pod("a", "", false), ns("a", ModeAmbient), true},
		{"namespace unlabelled", pod("a", "", false), ns("a", ""), false},
		{"namespace other value", pod("a", "", false), ns("a", "sidecar"), false},
		{"pod opts out", pod("a", ModeNone, false), ns("a", ModeAmbient), false},
		{"pod opts in", pod("a", ModeAmbient, false), ns("a", ""), true},
		{"pod opts in, namespace unknown", pod("a", ModeAmbient, false), nil, true},
		{"host network", pod("a", ModeAmbient, true), ns("a", ModeAmbient), false},
		{"excluded namespace", pod("kube-system", ModeAmbient, false), ns("kube-system", ModeAmbient), false},
		{"mesh's own namespace", pod("amesh-system", "", false), ns("amesh-system", ModeAmbient), false},
	} {
		if got := ShouldEnroll(tc.pod, tc.ns, exclude); got != tc.want {
			t.Errorf("%s: ShouldEnroll = %v, want %v", tc.name, got, tc.want)
		}
	}
}

func TestProbePorts(t *testing.T) {
	probe := func(h corev1.ProbeHandler) *corev1.Probe { return &corev1.Probe{ProbeHandler: h} }
	p := &corev1.Pod{Spec: corev1.PodSpec{
		InitContainers: []corev1.Container{{StartupProbe: probe(corev1.ProbeHandler{TCPSocket: &corev1.TCPSocketAction{Port: intstr.FromInt32(7000)}})}},
		Containers: []corev1.Container{
			{
				Ports:          []corev1.ContainerPort{{Name: "http", ContainerPort: 8080}, {Name: "admin", ContainerPort: 9090}},
				ReadinessProbe: probe(corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{Port: intstr.FromString("http")}}),
				LivenessProbe:  probe(corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{Port: intstr.FromInt32(8080)}}),
			},
			{
				LivenessProbe:  probe(corev1.ProbeHandler{GRPC: &corev1.GRPCAction{Port: 5000}}),
				ReadinessProbe: probe(corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{Port: intstr.FromString("missing")}}),
				StartupProbe:   probe(corev1.ProbeHandler{TCPSocket: &corev1.TCPSocketAction{Port: intstr.FromInt32(15008)}}),
			},
			{LivenessProbe: probe(corev1.ProbeHandler{Exec: &corev1.ExecAction{Command: []string{"true"}}})},
		},
	}}
	if got, want := ProbePorts(p), []uint16{5000, 7000, 8080}; !slices.Equal(got, want) {
		t.Fatalf("ProbePorts = %v, want %v", got, want)
	}
}

func TestConfigValidate(t *testing.T) {
	c := DefaultConfig()
	if err := c.Validate(); err == nil {
		t.Fatal("default config without node name validated")
	}
	c.NodeName = "n"
	if err := c.Validate(); err != nil {
		t.Fatal(err)
	}
	c.AckTimeout = 0
	if err := c.Validate(); err == nil {
		t.Fatal("zero ack timeout validated")
	}
}
