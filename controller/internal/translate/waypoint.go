package translate

import (
	"net/netip"
	"slices"

	pb "github.com/amesh-dev/amesh/api/discovery/v1"
	corev1 "k8s.io/api/core/v1"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"

	"github.com/amesh-dev/amesh/controller/internal/label"
)

// waypoint is a Gateway of the waypoint class.
type waypoint struct {
	gw *gwv1.Gateway
	// serves is the waypoint-for value: service, workload, all or none.
	serves string
	// serviceAccount is the for-service-account annotation, if any.
	serviceAccount string
	address        *pb.GatewayAddress
}

func (w *waypoint) key() string { return w.gw.Namespace + "/" + w.gw.Name }

// servesServices and servesWorkloads say which traffic the waypoint takes.
func (w *waypoint) servesServices() bool {
	return w.serves == label.WaypointForService || w.serves == label.WaypointForAll
}

func (w *waypoint) servesWorkloads() bool {
	return w.serves == label.WaypointForWorkload || w.serves == label.WaypointForAll
}

func (t *translator) indexWaypoints() {
	for _, gw := range t.in.Gateways {
		if string(gw.Spec.GatewayClassName) != t.cfg.WaypointClass || gw.DeletionTimestamp != nil {
			continue
		}
		w := &waypoint{
			gw:             gw,
			serves:         gw.Labels[label.WaypointFor],
			serviceAccount: gw.Annotations[label.ForServiceAccount],
		}
		switch w.serves {
		case label.WaypointForService, label.WaypointForWorkload, label.WaypointForAll, label.WaypointForNone:
		default:
			w.serves = label.WaypointForService
		}
		w.address = &pb.GatewayAddress{
			Service:   t.serviceKey(gw.Namespace, gw.Name),
			HbonePort: label.HBONEPort,
			Gateway:   w.key(),
		}
		if svc := t.svcByName[gw.Namespace+"/"+gw.Name]; svc != nil {
			if a := parseIP(svc.Spec.ClusterIP); a != nil {
				w.address.Address = a
			}
		}
		if w.address.Address == nil {
			for _, a := range gw.Status.Addresses {
				if a.Type == nil || *a.Type == gwv1.IPAddressType {
					if ip := parseIP(a.Value); ip != nil {
						w.address.Address = ip
						break
					}
				}
			}
		}
		t.waypoints[w.key()] = w
		if w.serviceAccount != "" && w.serves != label.WaypointForNone {
			k := gw.Namespace + "/" + w.serviceAccount
			t.perSA[k] = append(t.perSA[k], w)
		}
	}
	for _, ws := range t.perSA {
		slices.SortFunc(ws, func(a, b *waypoint) int { return olderFirst(a.gw.ObjectMeta, b.gw.ObjectMeta) })
	}
}

// binding is the waypoint reference written on an object or its namespace.
type binding struct {
	// set is true when a use-waypoint label was found (possibly "none").
	set  bool
	none bool
	key  string // "<ns>/<name>" of the Gateway
}

// bindingFrom reads use-waypoint labels of an object in namespace ns.
func bindingFrom(labels map[string]string, ns string) binding {
	name, ok := labels[label.UseWaypoint]
	if !ok || name == "" {
		return binding{}
	}
	if name == label.UseWaypointNone {
		return binding{set: true, none: true}
	}
	if wns := labels[label.UseWaypointNamespace]; wns != "" {
		ns = wns
	}
	return binding{set: true, key: ns + "/" + name}
}

// bindingFor resolves the binding of an object: its own label first, then
// its namespace's.
func (t *translator) bindingFor(labels map[string]string, ns string) binding {
	if b := bindingFrom(labels, ns); b.set {
		return b
	}
	if n := t.namespaces[ns]; n != nil {
		return bindingFrom(n.Labels, ns)
	}
	return binding{}
}

// isWaypointService reports whether svc is the Service of a waypoint (which
// must never be bound to a waypoint itself).
func (t *translator) isWaypointService(svc *corev1.Service) bool {
	if t.waypoints[svc.Namespace+"/"+svc.Name] != nil {
		return true
	}
	gw := svc.Labels[label.GatewayName]
	return gw != "" && t.waypoints[svc.Namespace+"/"+gw] != nil
}

// waypointPod returns the waypoint a pod implements, if any.
func (t *translator) waypointPod(pod *corev1.Pod) *waypoint {
	gw := pod.Labels[label.GatewayName]
	if gw == "" {
		return nil
	}
	return t.waypoints[pod.Namespace+"/"+gw]
}

// serviceWaypoint returns the waypoint that traffic to svc goes through.
func (t *translator) serviceWaypoint(svc *corev1.Service) *waypoint {
	if t.isWaypointService(svc) {
		return nil
	}
	b := t.bindingFor(svc.Labels, svc.Namespace)
	if !b.set || b.none {
		return nil
	}
	w := t.waypoints[b.key]
	if w == nil || !w.servesServices() {
		return nil
	}
	return w
}

// workloadWaypoint returns the waypoint that traffic addressed to the pod
// itself goes through: the pod's own use-waypoint label, else a waypoint
// for its service account, else its namespace's use-waypoint label.
func (t *translator) workloadWaypoint(pod *corev1.Pod) *waypoint {
	if t.waypointPod(pod) != nil {
		return nil
	}
	if b := bindingFrom(pod.Labels, pod.Namespace); b.set {
		return t.workloadBinding(b)
	}
	if ws := t.perSA[pod.Namespace+"/"+serviceAccount(pod)]; len(ws) > 0 {
		return ws[0]
	}
	if n := t.namespaces[pod.Namespace]; n != nil {
		return t.workloadBinding(bindingFrom(n.Labels, pod.Namespace))
	}
	return nil
}

func (t *translator) workloadBinding(b binding) *waypoint {
	if !b.set || b.none {
		return nil
	}
	w := t.waypoints[b.key]
	if w == nil || !w.servesWorkloads() {
		return nil
	}
	return w
}

func serviceAccount(pod *corev1.Pod) string {
	if pod.Spec.ServiceAccountName == "" {
		return "default"
	}
	return pod.Spec.ServiceAccountName
}

// parseIP returns the 4- or 16-byte form of an IP address, or nil.
func parseIP(s string) []byte {
	a, err := netip.ParseAddr(s)
	if err != nil || a.Zone() != "" {
		return nil
	}
	return a.Unmap().AsSlice()
}
