// Package downward computes Downward API values — pod fields and container
// resources — for environment variables and downwardAPI volumes.
package downward

import (
	"fmt"
	"math"
	"sort"
	"strconv"
	"strings"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
)

// FieldValue returns the value of a fieldRef path such as metadata.name,
// metadata.labels['app'] or status.podIP.
func FieldValue(pod *corev1.Pod, path string) (string, error) {
	if k, ok := subscript(path, "metadata.labels"); ok {
		return pod.Labels[k], nil
	}
	if k, ok := subscript(path, "metadata.annotations"); ok {
		return pod.Annotations[k], nil
	}
	switch path {
	case "metadata.name":
		return pod.Name, nil
	case "metadata.namespace":
		return pod.Namespace, nil
	case "metadata.uid":
		return string(pod.UID), nil
	case "metadata.labels":
		return formatMap(pod.Labels), nil
	case "metadata.annotations":
		return formatMap(pod.Annotations), nil
	case "spec.nodeName":
		return pod.Spec.NodeName, nil
	case "spec.serviceAccountName":
		return pod.Spec.ServiceAccountName, nil
	case "status.hostIP":
		return pod.Status.HostIP, nil
	case "status.hostIPs":
		ips := make([]string, len(pod.Status.HostIPs))
		for i, ip := range pod.Status.HostIPs {
			ips[i] = ip.IP
		}
		return strings.Join(ips, ","), nil
	case "status.podIP":
		return pod.Status.PodIP, nil
	case "status.podIPs":
		ips := make([]string, len(pod.Status.PodIPs))
		for i, ip := range pod.Status.PodIPs {
			ips[i] = ip.IP
		}
		return strings.Join(ips, ","), nil
	}
	return "", fmt.Errorf("unsupported fieldRef path %q", path)
}

func subscript(path, field string) (string, bool) {
	rest, ok := strings.CutPrefix(path, field+"[")
	if !ok || !strings.HasSuffix(rest, "]") {
		return "", false
	}
	k := strings.TrimSuffix(rest, "]")
	k = strings.Trim(k, `'"`)
	return k, true
}

// formatMap renders labels or annotations as the kubelet does: sorted
// key="value" lines.
func formatMap(m map[string]string) string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var b strings.Builder
	for i, k := range keys {
		if i > 0 {
			b.WriteByte('\n')
		}
		fmt.Fprintf(&b, "%s=%s", k, strconv.Quote(m[k]))
	}
	return b.String()
}

// Allocatable is what a container gets when it sets no limit.
type Allocatable struct {
	CPU    resource.Quantity
	Memory resource.Quantity
}

// ResourceValue returns the value of a resourceFieldRef (limits.cpu,
// requests.memory, …) for container, divided by divisor (rounded up, as the
// kubelet does). Unset limits default to the node's allocatable.
func ResourceValue(c *corev1.Container, ref *corev1.ResourceFieldSelector, node Allocatable) (string, error) {
	kind, name, ok := strings.Cut(ref.Resource, ".")
	if !ok {
		return "", fmt.Errorf("invalid resource %q", ref.Resource)
	}
	var list corev1.ResourceList
	switch kind {
	case "limits":
		list = c.Resources.Limits
	case "requests":
		list = c.Resources.Requests
	default:
		return "", fmt.Errorf("invalid resource %q", ref.Resource)
	}
	q, ok := list[corev1.ResourceName(name)]
	if !ok {
		switch {
		case kind == "limits" && name == "cpu":
			q = node.CPU
		case kind == "limits" && name == "memory":
			q = node.Memory
		case kind == "requests" && name == "cpu":
			q = *resource.NewQuantity(0, resource.DecimalSI)
		case kind == "requests" && name == "memory":
			q = *resource.NewQuantity(0, resource.BinarySI)
		case name == "ephemeral-storage":
			q = *resource.NewQuantity(0, resource.BinarySI)
		default:
			return "", fmt.Errorf("unsupported resource %q", ref.Resource)
		}
	}
	divisor := ref.Divisor
	if divisor.IsZero() {
		divisor = *resource.NewQuantity(1, resource.DecimalSI)
	}
	if name == "cpu" {
		v := math.Ceil(float64(q.MilliValue()) / float64(divisor.MilliValue()))
		return strconv.FormatInt(int64(v), 10), nil
	}
	v := math.Ceil(float64(q.Value()) / float64(divisor.Value()))
	return strconv.FormatInt(int64(v), 10), nil
}
