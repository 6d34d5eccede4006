package translate

import (
	"cmp"
	"slices"
	"strings"

	pb "github.com/amesh-dev/amesh/api/discovery/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
)

// services translates every Service except ExternalName ones. Only TCP
// ports are carried: ztunnel captures TCP only.
func (t *translator) translateServices() []*pb.Service {
	out := make([]*pb.Service, 0, len(t.in.Services))
	for _, s := range t.in.Services {
		if s.Spec.Type == corev1.ServiceTypeExternalName {
			continue
		}
		r := &pb.Service{
			Name:      s.Name,
			Namespace: s.Namespace,
			Hostname:  t.hostname(s.Namespace, s.Name),
		}
		ips := s.Spec.ClusterIPs
		if len(ips) == 0 && s.Spec.ClusterIP != "" {
			ips = []string{s.Spec.ClusterIP}
		}
		for _, ip := range ips {
			if a := parseIP(ip); a != nil { // "None" (headless) parses to nothing
				r.Addresses = append(r.Addresses, a)
			}
		}
		for _, p := range s.Spec.Ports {
			if !isTCP(p.Protocol) {
				continue
			}
			sp := &pb.ServicePort{
				Name:        p.Name,
				ServicePort: uint32(p.Port),
				AppProtocol: appProtocol(p),
			}
			switch {
			case p.TargetPort.Type == intstr.Int && p.TargetPort.IntVal == 0:
				sp.TargetPort = uint32(p.Port) // unset: same as port
			case p.TargetPort.Type == intstr.Int:
				sp.TargetPort = uint32(p.TargetPort.IntVal)
			}
			r.Ports = append(r.Ports, sp)
		}
		if w := t.serviceWaypoint(s); w != nil {
			r.Waypoint = w.address
			if w.unavailable { // nobody to configure, no policy enforced
				t.refusedServices[t.serviceKey(s.Namespace, s.Name)] = w
			} else {
				t.serviceWaypoints[t.serviceKey(s.Namespace, s.Name)] = w
			}
		}
		out = append(out, r)
	}
	slices.SortFunc(out, func(a, b *pb.Service) int {
		return cmp.Or(cmp.Compare(a.Namespace, b.Namespace), cmp.Compare(a.Hostname, b.Hostname))
	})
	return out
}

func isTCP(p corev1.Protocol) bool { return p == "" || p == corev1.ProtocolTCP }

// appProtocol resolves a port's application protocol from appProtocol,
// else from the port name's prefix ("http-web" → http), as Istio does.
func appProtocol(p corev1.ServicePort) string {
	if p.AppProtocol != nil {
		switch strings.ToLower(*p.AppProtocol) {
		case "http", "http1", "kubernetes.io/ws", "grpc-web":
			return "http"
		case "http2", "kubernetes.io/h2c":
			return "http2"
		case "grpc":
			return "grpc"
		case "https", "tls", "kubernetes.io/wss":
			return "tls"
		default:
			return "tcp"
		}
	}
	name := strings.ToLower(p.Name)
	if name == "grpc-web" || strings.HasPrefix(name, "grpc-web-") {
		return "http"
	}
	prefix, _, _ := strings.Cut(name, "-")
	switch prefix {
	case "http":
		return "http"
	case "http2":
		return "http2"
	case "grpc":
		return "grpc"
	case "https", "tls":
		return "tls"
	}
	return "tcp"
}

// targetPort resolves a Service port's target port for one pod; ok is false
// when a named target port is not declared by the pod.
func targetPort(p corev1.ServicePort, pod *corev1.Pod) (uint32, bool) {
	switch {
	case p.TargetPort.Type == intstr.Int && p.TargetPort.IntVal == 0:
		return uint32(p.Port), true
	case p.TargetPort.Type == intstr.Int:
		return uint32(p.TargetPort.IntVal), true
	}
	name := p.TargetPort.StrVal
	find := func(cs []corev1.Container) (uint32, bool) {
		for _, c := range cs {
			for _, cp := range c.Ports {
				if cp.Name == name && isTCP(cp.Protocol) {
					return uint32(cp.ContainerPort), true
				}
			}
		}
		return 0, false
	}
	if port, ok := find(pod.Spec.Containers); ok {
		return port, true
	}
	return find(pod.Spec.InitContainers) // sidecar containers
}
