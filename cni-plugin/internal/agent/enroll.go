package agent

import (
	"slices"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/amesh-dev/amesh/api/capture"
)

// Label and annotation names (DESIGN.md §2).
const (
	LabelDataplaneMode    = "amesh.dev/dataplane-mode"
	ModeAmbient           = "ambient"
	ModeNone              = "none"
	AnnotationRedirection = "amesh.dev/redirection"
)

// ShouldEnroll decides whether a pod belongs in the mesh: not
// host-network, not in an excluded namespace, not opted out with
// dataplane-mode=none, and labelled ambient itself or through its
// namespace.
func ShouldEnroll(pod *corev1.Pod, ns *corev1.Namespace, exclude []string) bool {
	if pod.Spec.HostNetwork || slices.Contains(exclude, pod.Namespace) {
		return false
	}
	switch pod.Labels[LabelDataplaneMode] {
	case ModeNone:
		return false
	case ModeAmbient:
		return true
	}
	return ns != nil && ns.Labels[LabelDataplaneMode] == ModeAmbient
}

// ProbePorts returns the pod ports its kubelet probes (HTTP, TCP, gRPC)
// connect to, named ports resolved against the container's ports.
func ProbePorts(pod *corev1.Pod) []uint16 {
	var ports []uint16
	resolve := func(c *corev1.Container, p intstr.IntOrString) {
		if p.Type == intstr.Int {
			if p.IntVal > 0 && p.IntVal < 65536 {
				ports = append(ports, uint16(p.IntVal))
			}
			return
		}
		for _, cp := range c.Ports {
			if cp.Name == p.StrVal && cp.ContainerPort > 0 && cp.ContainerPort < 65536 {
				ports = append(ports, uint16(cp.ContainerPort))
			}
		}
	}
	all := slices.Concat(pod.Spec.InitContainers, pod.Spec.Containers)
	for i := range all {
		c := &all[i]
		for _, pr := range []*corev1.Probe{c.LivenessProbe, c.ReadinessProbe, c.StartupProbe} {
			if pr == nil {
				continue
			}
			switch {
			case pr.HTTPGet != nil:
				resolve(c, pr.HTTPGet.Port)
			case pr.TCPSocket != nil:
				resolve(c, pr.TCPSocket.Port)
			case pr.GRPC != nil:
				resolve(c, intstr.FromInt32(pr.GRPC.Port))
			}
		}
	}
	slices.Sort(ports)
	return slices.DeleteFunc(slices.Compact(ports), func(p uint16) bool {
		return p == capture.OutboundPort || p == capture.InboundPlaintextPort || p == capture.InboundHBONEPort
	})
}
