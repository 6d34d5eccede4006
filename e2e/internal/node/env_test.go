package node

import (
	"net/netip"
	"slices"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/amesh-dev/amesh/e2e/internal/image"
)

func TestExpand(t *testing.T) {
	vars := map[string]string{"A": "1", "B": "two", "EMPTY": ""}
	lookup := func(k string) (string, bool) { v, ok := vars[k]; return v, ok }
	tests := map[string]string{
		"plain":            "plain",
		"$(A)":             "1",
		"x$(A)y$(B)z":      "x1ytwoz",
		"$(UNDEFINED)":     "$(UNDEFINED)",
		"$$(A)":            "$(A)",
		"$$$(A)":           "$1",
		"$(EMPTY)-":        "-",
		"cost $5":          "cost $5",
		"unterminated $(A": "unterminated $(A",
		"trailing $":       "trailing $",
		"$(A)$(A)":         "11",
	}
	for in, want := range tests {
		if got := expand(in, lookup); got != want {
			t.Errorf("expand(%q) = %q, want %q", in, got, want)
		}
	}
}

func FuzzExpand(f *testing.F) {
	f.Add("x$(A)y$$z$(")
	f.Fuzz(func(t *testing.T, s string) {
		got := expand(s, func(string) (string, bool) { return "", false })
		// With nothing defined only "$$" escapes change the string.
		if want := strings.ReplaceAll(s, "$$", "\x00"); strings.Count(want, "\x00") == 0 && got != s {
			t.Fatalf("expand(%q) = %q with no variables defined", s, got)
		}
	})
}

func TestServiceEnv(t *testing.T) {
	svcs := []*corev1.Service{
		{ObjectMeta: metav1.ObjectMeta{Name: "my-svc"}, Spec: corev1.ServiceSpec{ClusterIP: "10.96.0.7", Ports: []corev1.ServicePort{
			{Name: "http", Port: 80, Protocol: corev1.ProtocolTCP}, {Name: "dns-udp", Port: 53, Protocol: corev1.ProtocolUDP}}}},
		{ObjectMeta: metav1.ObjectMeta{Name: "headless"}, Spec: corev1.ServiceSpec{ClusterIP: corev1.ClusterIPNone, Ports: []corev1.ServicePort{{Port: 80}}}},
	}
	got := serviceEnv(svcs)
	for _, want := range []string{
		"MY_SVC_SERVICE_HOST=10.96.0.7",
		"MY_SVC_SERVICE_PORT=80",
		"MY_SVC_SERVICE_PORT_HTTP=80",
		"MY_SVC_SERVICE_PORT_DNS_UDP=53",
		"MY_SVC_PORT=tcp://10.96.0.7:80",
		"MY_SVC_PORT_80_TCP=tcp://10.96.0.7:80",
		"MY_SVC_PORT_80_TCP_PROTO=tcp",
		"MY_SVC_PORT_80_TCP_PORT=80",
		"MY_SVC_PORT_80_TCP_ADDR=10.96.0.7",
		"MY_SVC_PORT_53_UDP=udp://10.96.0.7:53",
	} {
		if !slices.Contains(got, want) {
			t.Errorf("service env lacks %s; got %v", want, got)
		}
	}
	for _, e := range got {
		if strings.HasPrefix(e, "HEADLESS_") {
			t.Errorf("headless service got variables: %s", e)
		}
	}
}

func TestResolvConf(t *testing.T) {
	a := &Agent{cfg: Config{ClusterDNS: netip.MustParseAddr("10.96.0.10"), ClusterDomain: "cluster.local"}}
	host := []byte("nameserver 192.0.2.53\nsearch example.org\noptions edns0\n")
	five := "5"
	tests := []struct {
		name string
		spec corev1.PodSpec
		want string
	}{
		{"cluster first", corev1.PodSpec{}, "search ns1.svc.cluster.local svc.cluster.local cluster.local\nnameserver 10.96.0.10\noptions ndots:5\n"},
		{"host network falls back to default", corev1.PodSpec{HostNetwork: true}, "search example.org\nnameserver 192.0.2.53\noptions edns0\n"},
		{"host network with cluster DNS", corev1.PodSpec{HostNetwork: true, DNSPolicy: corev1.DNSClusterFirstWithHostNet}, "search ns1.svc.cluster.local svc.cluster.local cluster.local\nnameserver 10.96.0.10\noptions ndots:5\n"},
		{"none with config", corev1.PodSpec{DNSPolicy: corev1.DNSNone, DNSConfig: &corev1.PodDNSConfig{
			Nameservers: []string{"1.1.1.1"}, Searches: []string{"a.b"}, Options: []corev1.PodDNSConfigOption{{Name: "ndots", Value: &five}, {Name: "rotate"}}}},
			"search a.b\nnameserver 1.1.1.1\noptions ndots:5 rotate\n"},
	}
	for _, tt := range tests {
		pod := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: "ns1", Name: "p"}, Spec: tt.spec}
		if got := string(a.resolvConf(pod, host)); got != tt.want {
			t.Errorf("%s: resolv.conf =\n%s\nwant\n%s", tt.name, got, tt.want)
		}
	}
}

func TestCommand(t *testing.T) {
	env := []string{"PATH=/bin", "GREETING=hi"}
	tests := []struct {
		name      string
		c         corev1.Container
		ep, cmd   []string
		want      []string
		wantError bool
	}{
		{"image defaults", corev1.Container{}, []string{"/app"}, []string{"--serve"}, []string{"/app", "--serve"}, false},
		{"args replace cmd", corev1.Container{Args: []string{"--x"}}, []string{"/app"}, []string{"--serve"}, []string{"/app", "--x"}, false},
		{"command replaces both", corev1.Container{Command: []string{"sh"}, Args: []string{"-c", "echo $(GREETING)"}}, []string{"/app"}, []string{"--serve"}, []string{"sh", "-c", "echo hi"}, false},
		{"nothing to run", corev1.Container{}, nil, nil, nil, true},
	}
	for _, tt := range tests {
		got, err := command(&tt.c, imageEntry(tt.ep, tt.cmd), env)
		if (err != nil) != tt.wantError || !slices.Equal(got, tt.want) {
			t.Errorf("%s: command = %v, %v; want %v (error %t)", tt.name, got, err, tt.want, tt.wantError)
		}
	}
}

func imageEntry(ep, cmd []string) image.Entry { return image.Entry{Entrypoint: ep, Cmd: cmd} }
