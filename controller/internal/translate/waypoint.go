package translate

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"

	pb "github.com/amesh-dev/amesh/api/discovery/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"

	"github.com/amesh-dev/amesh/controller/internal/gatewayclass"
	"github.com/amesh-dev/amesh/controller/internal/label"
)

// waypoint is a Gateway of the waypoint class, while that class is amesh's
// and accepted; else an unavailable one (see translator.unavailable).
type waypoint struct {
	// ns and name name the Gateway.
	ns, name string
	// gw is the Gateway; nil for the stand-in of a missing one.
	gw *gwv1.Gateway
	// unavailable: nobody runs this waypoint — its Gateway is missing or
	// being deleted, or its class is not amesh's (missing, another
	// controller's, being deleted, not accepted) — so traffic bound to it
	// is refused (see unavailableAddress).
	unavailable bool
	// reason and why say why an unavailable waypoint is: the binding
	// status reason (ReasonGatewayNotFound, ReasonWaypointUnavailable,
	// ReasonNotAWaypoint, or ReasonNotAllowed) and a phrase for its
	// message (for ReasonNotAllowed, the namespace it does not admit).
	reason, why string
	// serves is the waypoint-for value: service, workload, all or none.
	serves string
	// serviceAccount is the for-service-account annotation, if any.
	serviceAccount string
	address        *pb.GatewayAddress
}

func (w *waypoint) key() string { return w.ns + "/" + w.name }

// serving reports whether the waypoint takes that kind of traffic
// (services, else workloads).
func (w *waypoint) serving(services bool) bool {
	if services {
		return w.servesServices()
	}
	return w.servesWorkloads()
}

// unavailableMessage is the binding status message of an unavailable
// waypoint.
func (w *waypoint) unavailableMessage() string {
	switch w.reason {
	case ReasonGatewayNotFound:
		return fmt.Sprintf("waypoint Gateway %s not found: traffic bound to it is refused, never sent around it; "+
			"create the waypoint, or set %s=%s to send the traffic directly", w.key(), label.UseWaypoint, label.UseWaypointNone)
	case ReasonNotAllowed:
		return fmt.Sprintf("waypoint %s does not admit namespace %s (a Gateway admits other namespaces in its listener's "+
			"allowedRoutes.namespaces): traffic bound to it is refused, never sent around it", w.key(), w.why)
	}
	return fmt.Sprintf("Gateway %s is not a waypoint amesh runs (%s): traffic bound to it is refused, never sent around it",
		w.key(), w.why)
}

// servesServices and servesWorkloads say which traffic the waypoint takes.
func (w *waypoint) servesServices() bool {
	return w.serves == label.WaypointForService || w.serves == label.WaypointForAll
}

func (w *waypoint) servesWorkloads() bool { return gatewayclass.ServesWorkloads(w.serves) }

func (t *translator) indexWaypoints() {
	var class *gwv1.GatewayClass
	for _, gc := range t.in.GatewayClasses {
		if gc.Name == t.cfg.WaypointClass {
			class = gc
		}
	}
	if ok, why := gatewayclass.Waypoint(class, t.cfg.WaypointClass, t.cfg.WaypointController); !ok {
		t.notWaypointClass = why
	}
	for _, gw := range t.in.Gateways {
		if string(gw.Spec.GatewayClassName) != t.cfg.WaypointClass {
			continue
		}
		w := &waypoint{
			ns:             gw.Namespace,
			name:           gw.Name,
			gw:             gw,
			serves:         gatewayclass.Serves(gw),
			serviceAccount: gw.Annotations[label.ForServiceAccount],
		}
		if gw.DeletionTimestamp != nil {
			// On its way out: bindings to it are refused as if it were
			// gone (the deployer no longer runs it), and it claims no
			// service account (nor does the deployer count it).
			t.setUnavailable(w, ReasonWaypointUnavailable, "it is being deleted")
			continue
		}
		verdict := gatewayclass.CheckGateway(gw)
		svc := t.svcByName[gw.Namespace+"/"+gw.Name]
		switch {
		// The deployer runs none of these, so they are not waypoints: no
		// configuration, identity or root certificate for them, their
		// pods are ordinary workloads. Traffic bound to one is refused
		// rather than bypassing its policies.
		case t.notWaypointClass != "":
			t.setUnavailable(w, ReasonWaypointUnavailable, t.notWaypointClass)
		case !verdict.Accepted:
			t.setUnavailable(w, ReasonWaypointUnavailable, "the Gateway is not accepted: "+verdict.Message)
		case svc != nil && !ownedBy(svc, "Gateway", gw.UID):
			// The deployer does not deploy over another object; and the
			// waypoint's address must never resolve to someone else's
			// Service, whose pods ztunnel would take for the waypoint.
			t.setUnavailable(w, ReasonWaypointUnavailable, fmt.Sprintf(
				"the Service %s/%s does not belong to the Gateway, so the waypoint cannot be deployed", gw.Namespace, gw.Name))
		default:
			w.address = &pb.GatewayAddress{
				Service:   t.serviceKey(gw.Namespace, gw.Name),
				HbonePort: label.HBONEPort,
				Gateway:   w.key(),
			}
			// The address is that of the deployer's Service (named after
			// the Gateway and owned by it), else the one in the Gateway
			// status.
			if svc != nil {
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
		}
		// A per-service-account waypoint takes its service account's
		// workload traffic only if it serves workloads (the deployer's
		// ForServiceAccount condition says when it does not).
		if w.serviceAccount != "" && w.servesWorkloads() {
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
	// from is the namespace of the bound object.
	from string
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
	from := ns
	if wns := labels[label.UseWaypointNamespace]; wns != "" {
		ns = wns
	}
	return binding{set: true, key: ns + "/" + name, from: from}
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
// must never be bound to a waypoint itself): one a waypoint Gateway
// controls, named after it or labelled with its name.
func (t *translator) isWaypointService(svc *corev1.Service) bool {
	return t.serviceOfWaypoint(svc) != nil
}

// serviceOfWaypoint returns the waypoint whose Service svc is, if any.
func (t *translator) serviceOfWaypoint(svc *corev1.Service) *waypoint {
	for _, gw := range []string{svc.Name, svc.Labels[label.GatewayName]} {
		if w := t.waypoints[svc.Namespace+"/"+gw]; w != nil && ownedBy(svc, "Gateway", w.gw.UID) {
			return w
		}
	}
	return nil
}

// waypointPod returns the waypoint a pod implements, if any: the pod
// carries the gateway-name label of a waypoint Gateway and is controlled,
// through its ReplicaSet and the Deployment named after the Gateway (the
// deployer's), by that Gateway. A pod that merely carries the label is an
// ordinary workload: labelling itself must not make a pod a waypoint.
func (t *translator) waypointPod(pod *corev1.Pod) *waypoint {
	gw := pod.Labels[label.GatewayName]
	if gw == "" {
		return nil
	}
	w := t.waypoints[pod.Namespace+"/"+gw]
	if w == nil {
		return nil
	}
	rsRef := metav1.GetControllerOfNoCopy(pod)
	if rsRef == nil || rsRef.Kind != "ReplicaSet" {
		return nil
	}
	rs := t.replicaSets[rsRef.UID]
	if rs == nil || rs.Namespace != pod.Namespace || rs.Name != rsRef.Name {
		return nil
	}
	depRef := metav1.GetControllerOfNoCopy(rs)
	if depRef == nil || depRef.Kind != "Deployment" || depRef.Name != w.gw.Name {
		return nil
	}
	dep := t.deployments[depRef.UID]
	if dep == nil || dep.Namespace != pod.Namespace || dep.Name != w.gw.Name || !ownedBy(dep, "Gateway", w.gw.UID) {
		return nil
	}
	return w
}

// ownedBy reports whether obj's controller is the object of kind and uid.
func ownedBy(obj metav1.Object, kind string, uid types.UID) bool {
	ref := metav1.GetControllerOfNoCopy(obj)
	return ref != nil && ref.Kind == kind && uid != "" && ref.UID == uid
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
	w := t.boundWaypoint(b)
	if !w.servesServices() {
		return nil
	}
	return w
}

// boundWaypoint is the waypoint a binding to key sends traffic to: a
// waypoint, else an unavailable one (traffic refused); never nil.
//
// A binding to a Gateway that does not exist, or is of another class, is
// refused too: the label says
// that the traffic goes through a waypoint, and a missing one (not created
// yet, or deleted and about to be re-created) must not let it bypass the
// waypoint's policies. Which traffic the missing waypoint would take is
// unknown, so it is taken to take all; the operator removes the label or
// sets it to none to send traffic directly. A missing Gateway claims no
// service account.
//
// A waypoint in another namespace takes the binding only when its Gateway
// admits the binding's namespace (gatewayclass.AdmitsNamespace); otherwise
// the traffic is refused as well: a namespace cannot make someone else's
// waypoint carry, and its policies decide over, traffic its owner never
// agreed to serve.
//
// The answer depends only on the context (Gateways, namespaces), not on
// the pod or Service asking, so it is computed once per binding: every pod
// of a namespace shares its namespace's binding.
func (t *translator) boundWaypoint(b binding) *waypoint {
	if w, ok := t.bound[b]; ok {
		return w
	}
	w := t.resolveBinding(b)
	t.bound[b] = w
	return w
}

func (t *translator) resolveBinding(b binding) *waypoint {
	w := t.waypointAt(b.key)
	if w.gw == nil || w.ns == b.from {
		return w
	}
	var nsLabels map[string]string
	if n := t.namespaces[b.from]; n != nil {
		nsLabels = n.Labels
	}
	if gatewayclass.AdmitsNamespace(w.gw, b.from, nsLabels) {
		return w
	}
	refused := &waypoint{ns: w.ns, name: w.name, gw: w.gw, serves: w.serves}
	t.markUnavailable(refused, ReasonNotAllowed, b.from)
	return refused
}

// waypointAt is the waypoint, or unavailable stand-in, for the Gateway key.
func (t *translator) waypointAt(key string) *waypoint {
	if w := t.waypoints[key]; w != nil {
		return w
	}
	if w := t.unavailable[key]; w != nil {
		return w
	}
	ns, name, _ := strings.Cut(key, "/")
	w := &waypoint{ns: ns, name: name, serves: label.WaypointForAll}
	if t.gateways[key] != nil {
		// A Gateway of another class (an ingress gateway, say): whoever
		// labelled the traffic wanted a waypoint's policies applied to
		// it, and none runs, so it is refused like traffic bound to a
		// missing Gateway — never sent around the waypoint.
		t.markUnavailable(w, ReasonNotAWaypoint, fmt.Sprintf("its class is not %s", t.cfg.WaypointClass))
		return w
	}
	t.markUnavailable(w, ReasonGatewayNotFound, "the Gateway does not exist")
	return w
}

// setUnavailable records w as an unavailable waypoint.
func (t *translator) setUnavailable(w *waypoint, reason, why string) {
	t.markUnavailable(w, reason, why)
	t.unavailable[w.key()] = w
}

// markUnavailable makes w an unavailable waypoint: its address is one no
// pod implements, so that ztunnel refuses the traffic bound to it.
func (t *translator) markUnavailable(w *waypoint, reason, why string) {
	w.unavailable, w.reason, w.why = true, reason, why
	w.address = &pb.GatewayAddress{
		Service:   unavailableService(w.ns, w.name),
		HbonePort: label.HBONEPort,
		Gateway:   w.key(),
	}
}

// unavailableService is the service an unavailable waypoint's address
// names: one that no Service resource can be (their hostnames are
// <name>.<ns>.svc.<cluster domain>), so that the data plane finds no
// waypoint pod for it and refuses the traffic. Naming the Service a
// waypoint would have (<gw>.<ns>.svc…) would let anyone who may create a
// Service of that name in the Gateway's namespace make their pods the
// waypoint: ztunnel would send them the bound traffic and admit them past
// the bound workloads' L4 policies.
func unavailableService(ns, name string) string {
	return ns + "/" + name + ".unavailable-waypoint.invalid"
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
	w := t.boundWaypoint(b)
	if !w.servesWorkloads() {
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

// notAWaypoint explains why the Gateway gw ("<ns>/<name>", which exists)
// is not a waypoint.
func (t *translator) notAWaypoint(key string) string {
	if w := t.unavailable[key]; w != nil {
		return fmt.Sprintf("Gateway %s is not a waypoint: %s", key, w.why)
	}
	return fmt.Sprintf("Gateway %s is not a waypoint (its class is not %s)", key, t.cfg.WaypointClass)
}
