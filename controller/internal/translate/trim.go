package translate

import corev1 "k8s.io/api/core/v1"

// TrimPod strips p, in place, down to what the controller reads of a pod,
// and returns it: its metadata (without managed fields); the node, service
// account and host network of its spec, and the names, ports and restart
// policy of its containers and init containers (named target ports,
// sidecars); the phase, IPs and conditions of its status. The rest of a
// pod — environment, volumes, probes, resources, container statuses — is
// most of its size and nothing that the translator or the certificate
// authorizer (internal/auth) reads, so the controller's cache stores pods
// trimmed: TestTrimPod proves every golden translation unchanged by it.
func TrimPod(p *corev1.Pod) *corev1.Pod {
	p.ManagedFields = nil
	p.Spec = corev1.PodSpec{
		NodeName:           p.Spec.NodeName,
		ServiceAccountName: p.Spec.ServiceAccountName,
		HostNetwork:        p.Spec.HostNetwork,
		Containers:         trimContainers(p.Spec.Containers),
		InitContainers:     trimContainers(p.Spec.InitContainers),
	}
	p.Status = corev1.PodStatus{
		Phase:      p.Status.Phase,
		Conditions: p.Status.Conditions,
		PodIP:      p.Status.PodIP,
		PodIPs:     p.Status.PodIPs,
	}
	return p
}

func trimContainers(cs []corev1.Container) []corev1.Container {
	if cs == nil {
		return nil
	}
	out := make([]corev1.Container, len(cs))
	for i, c := range cs {
		out[i] = corev1.Container{Name: c.Name, Ports: c.Ports, RestartPolicy: c.RestartPolicy}
	}
	return out
}
