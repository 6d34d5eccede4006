package translate

import (
	"cmp"
	"slices"
	"strings"

	pb "github.com/amesh-dev/amesh/api/discovery/v1"
	corev1 "k8s.io/api/core/v1"
	k8sdisc "k8s.io/api/discovery/v1"

	"github.com/amesh-dev/amesh/controller/internal/label"
)

// pod translates one pod: its workload (none for pods without an IP,
// host-network pods — they share the node's address and are never
// captured — and finished pods), the authorizations that select it, and its
// peer authentication.
func (t *translator) pod(pod *corev1.Pod) *podResult {
	res := &podResult{
		namespace:       pod.Namespace,
		enrolledByLabel: pod.Labels[label.DataplaneMode] == label.DataplaneModeAmbient,
	}
	if pod.Status.Phase != corev1.PodSucceeded && pod.Status.Phase != corev1.PodFailed && pod.DeletionTimestamp == nil {
		res.problem = t.podProblem(pod)
	}
	if pod.Spec.HostNetwork || pod.Status.Phase == corev1.PodSucceeded || pod.Status.Phase == corev1.PodFailed {
		return res
	}
	w := t.podWorkload(pod)
	if w == nil {
		return res
	}
	w.AuthorizationPolicies = t.podAuthorizations(pod)
	res.paWinner, res.paLosers = t.podPeerAuthentication(pod, w)
	res.workload = w
	return res
}

func (t *translator) podWorkload(pod *corev1.Pod) *pb.Workload {
	var addrs [][]byte
	for _, ip := range pod.Status.PodIPs {
		if a := parseIP(ip.IP); a != nil {
			addrs = append(addrs, a)
		}
	}
	if len(addrs) == 0 {
		if a := parseIP(pod.Status.PodIP); a != nil {
			addrs = append(addrs, a)
		}
	}
	if len(addrs) == 0 {
		return nil
	}
	uid := string(pod.UID)
	if uid == "" {
		uid = pod.Namespace + "/" + pod.Name
	}
	wname, wtype := owner(pod)
	w := &pb.Workload{
		Uid:               uid,
		Name:              pod.Name,
		Namespace:         pod.Namespace,
		Addresses:         addrs,
		Node:              pod.Spec.NodeName,
		ServiceAccount:    serviceAccount(pod),
		TrustDomain:       t.cfg.TrustDomain,
		CanonicalName:     firstLabel(pod.Labels, wname, "service.istio.io/canonical-name", "app.kubernetes.io/name", "app"),
		CanonicalRevision: firstLabel(pod.Labels, "latest", "service.istio.io/canonical-revision", "app.kubernetes.io/version", "version"),
		WorkloadName:      wname,
		WorkloadType:      wtype,
		Services:          t.podServices(pod),
		ClusterId:         t.cfg.ClusterID,
		Status:            pb.WorkloadStatus_WORKLOAD_STATUS_UNHEALTHY,
	}
	for svc, ports := range t.endpointPorts[pod.Namespace+"/"+pod.Name] {
		addPorts(w, svc, ports)
	}
	// An endpoint address without targetRef that is this pod's: the
	// pod is that endpoint when the slice is of its own namespace; a
	// slice of another namespace gets nothing (the address is the pod's,
	// never published as an external workload: see Translate).
	if len(t.endpointByAddr) > 0 {
		for _, a := range addrs {
			if ext := t.endpointByAddr[string(a)]; ext != nil {
				for _, e := range ext {
					if e.Namespace == pod.Namespace {
						for svc, pl := range e.Services {
							addPorts(w, svc, pl.Ports)
						}
					}
				}
			}
		}
	}
	if podReady(pod) {
		w.Status = pb.WorkloadStatus_WORKLOAD_STATUS_HEALTHY
	}
	if wp := t.waypointPod(pod); wp != nil {
		// Waypoints speak HBONE natively.
		w.TunnelProtocol = pb.TunnelProtocol_TUNNEL_PROTOCOL_HBONE
		w.WaypointForGateway = wp.key()
	} else if t.enrolled(pod) {
		// Enrolled means HBONE, whatever the node agent's redirection
		// annotation says: peers must never send an enrolled pod
		// plaintext. A pod whose capture is not in place yet (being
		// enrolled, or its agent unable to annotate) refuses HBONE
		// until it is — fail closed — rather than receiving
		// plaintext.
		w.TunnelProtocol = pb.TunnelProtocol_TUNNEL_PROTOCOL_HBONE
	}
	if wp := t.workloadWaypoint(pod); wp != nil {
		w.Waypoint = wp.address
	}
	return w
}

func podReady(pod *corev1.Pod) bool {
	if pod.DeletionTimestamp != nil {
		return false
	}
	for _, c := range pod.Status.Conditions {
		if c.Type == corev1.PodReady {
			return c.Status == corev1.ConditionTrue
		}
	}
	return false
}

// podServices maps the Services selecting pod to their resolved ports.
func (t *translator) podServices(pod *corev1.Pod) map[string]*pb.PortList {
	idx := t.svcSelector[pod.Namespace]
	if idx == nil {
		return nil
	}
	var out map[string]*pb.PortList
	for k, v := range pod.Labels {
		for _, s := range idx[k+"="+v] {
			if !selects(s.Spec.Selector, pod.Labels) {
				continue
			}
			// A waypoint's Service has only that waypoint's own pods as
			// endpoints, never pods that merely carry its labels.
			if w := t.serviceOfWaypoint(s); w != nil && t.waypointPod(pod) != w {
				continue
			}
			var pl pb.PortList
			for _, p := range s.Spec.Ports {
				if !isTCP(p.Protocol) {
					continue
				}
				if tp, ok := targetPort(p, pod); ok {
					pl.Ports = append(pl.Ports, &pb.Port{ServicePort: uint32(p.Port), TargetPort: tp})
				}
			}
			if len(pl.Ports) == 0 {
				continue
			}
			if out == nil {
				out = map[string]*pb.PortList{}
			}
			out[t.serviceKey(s.Namespace, s.Name)] = &pl
		}
	}
	return out
}

// endpointWorkloads handles the endpoints of selector-less Services: pods
// of the slice's namespace named by an endpoint's targetRef get the Service
// in their services map (recorded in t.endpointPorts for the per-pod
// translation); other addresses become workloads of their own, outside the
// mesh.
func (t *translator) endpointWorkloads() []*pb.Workload {
	ext := map[string]*pb.Workload{}
	for _, es := range t.in.EndpointSlices {
		svc := t.svcByName[es.Namespace+"/"+es.Labels[k8sdisc.LabelServiceName]]
		if svc == nil || len(svc.Spec.Selector) > 0 || svc.Spec.Type == corev1.ServiceTypeExternalName {
			continue
		}
		if es.AddressType != k8sdisc.AddressTypeIPv4 && es.AddressType != k8sdisc.AddressTypeIPv6 {
			continue
		}
		var ports []*pb.Port
		for _, ep := range es.Ports {
			if ep.Port == nil || (ep.Protocol != nil && !isTCP(*ep.Protocol)) {
				continue
			}
			name := ""
			if ep.Name != nil {
				name = *ep.Name
			}
			for _, sp := range svc.Spec.Ports {
				if sp.Name == name && isTCP(sp.Protocol) {
					ports = append(ports, &pb.Port{ServicePort: uint32(sp.Port), TargetPort: uint32(*ep.Port)})
				}
			}
		}
		if len(ports) == 0 {
			continue
		}
		key := t.serviceKey(svc.Namespace, svc.Name)
		for _, e := range es.Endpoints {
			// A targetRef names a pod of the slice's own namespace only:
			// anyone who may write an EndpointSlice (or an Endpoints
			// object, which the mirroring controller copies) in one
			// namespace must not make another namespace's pod an
			// endpoint of their Service — ztunnel admits the waypoint of
			// a pod's Services past that pod's L4 policies. A targetRef
			// to another namespace is ignored (the addresses are then
			// treated as if it were absent).
			if e.TargetRef != nil && e.TargetRef.Kind == "Pod" && (e.TargetRef.Namespace == "" || e.TargetRef.Namespace == es.Namespace) {
				pk := es.Namespace + "/" + e.TargetRef.Name
				if t.endpointPorts[pk] == nil {
					t.endpointPorts[pk] = map[string][]*pb.Port{}
				}
				t.endpointPorts[pk][key] = append(t.endpointPorts[pk][key], ports...)
				continue
			}
			for _, ip := range e.Addresses {
				a := parseIP(ip)
				if a == nil {
					continue
				}
				uid := t.cfg.ClusterID + "/" + es.Namespace + "/endpoint/" + ip
				w := ext[uid]
				if w == nil {
					w = &pb.Workload{
						Uid:            uid,
						Name:           ip,
						Namespace:      es.Namespace,
						Addresses:      [][]byte{a},
						CanonicalName:  svc.Name,
						WorkloadName:   svc.Name,
						WorkloadType:   "endpoint",
						TunnelProtocol: pb.TunnelProtocol_TUNNEL_PROTOCOL_NONE,
						ClusterId:      t.cfg.ClusterID,
						Status:         pb.WorkloadStatus_WORKLOAD_STATUS_UNHEALTHY,
					}
					if e.NodeName != nil {
						w.Node = *e.NodeName
					}
					ext[uid] = w
				}
				if e.Conditions.Ready == nil || *e.Conditions.Ready {
					w.Status = pb.WorkloadStatus_WORKLOAD_STATUS_HEALTHY
				}
				addPorts(w, key, ports)
			}
		}
	}
	out := make([]*pb.Workload, 0, len(ext))
	for _, w := range ext {
		out = append(out, w)
	}
	slices.SortFunc(out, func(a, b *pb.Workload) int { return cmp.Compare(a.Uid, b.Uid) })
	for _, w := range out {
		k := string(w.Addresses[0])
		t.endpointByAddr[k] = append(t.endpointByAddr[k], w)
	}
	return out
}

// unclaimedEndpoints returns the endpoint workloads whose address no pod
// workload has. An address of a pod is never published as an external
// workload: ztunnel would have two claimants for the pod's IP, one of them
// plaintext, and anyone who may write an EndpointSlice (or Endpoints) in
// any namespace could make it send the pod's traffic unencrypted. (A
// slice of the pod's own namespace adds its Service to the pod's workload
// instead, see podWorkload.) eps is returned as is when nothing is
// claimed.
func (t *translator) unclaimedEndpoints(pods []*podResult) []*pb.Workload {
	if len(t.endpointByAddr) == 0 {
		return t.outEndpoints
	}
	var claimed map[string]bool
	for _, r := range pods {
		if r.workload == nil {
			continue
		}
		for _, a := range r.workload.Addresses {
			if _, ok := t.endpointByAddr[string(a)]; ok {
				if claimed == nil {
					claimed = map[string]bool{}
				}
				claimed[string(a)] = true
			}
		}
	}
	if len(claimed) == 0 {
		return t.outEndpoints
	}
	out := make([]*pb.Workload, 0, len(t.outEndpoints))
	for _, w := range t.outEndpoints {
		if !claimed[string(w.Addresses[0])] {
			out = append(out, w)
		}
	}
	return out
}

// addPorts merges service port mappings into a workload.
func addPorts(w *pb.Workload, svc string, ports []*pb.Port) {
	if w.Services == nil {
		w.Services = map[string]*pb.PortList{}
	}
	pl := w.Services[svc]
	if pl == nil {
		pl = &pb.PortList{}
		w.Services[svc] = pl
	}
	for _, p := range ports {
		if !slices.ContainsFunc(pl.Ports, func(q *pb.Port) bool {
			return q.ServicePort == p.ServicePort && q.TargetPort == p.TargetPort
		}) {
			pl.Ports = append(pl.Ports, &pb.Port{ServicePort: p.ServicePort, TargetPort: p.TargetPort})
		}
	}
	slices.SortFunc(pl.Ports, func(a, b *pb.Port) int {
		return cmp.Or(cmp.Compare(a.ServicePort, b.ServicePort), cmp.Compare(a.TargetPort, b.TargetPort))
	})
}

// owner derives the owning workload's name and kind: a Deployment from its
// ReplicaSet's name, a CronJob from its Job's, else the controller's own
// kind; a bare pod owns itself.
func owner(pod *corev1.Pod) (name, kind string) {
	for _, ref := range pod.OwnerReferences {
		if ref.Controller == nil || !*ref.Controller {
			continue
		}
		switch ref.Kind {
		case "ReplicaSet":
			if h := pod.Labels["pod-template-hash"]; h != "" && strings.HasSuffix(ref.Name, "-"+h) {
				return strings.TrimSuffix(ref.Name, "-"+h), "deployment"
			}
			return ref.Name, "replicaset"
		case "Job":
			if cj, ok := cronJobName(ref.Name); ok {
				return cj, "cronjob"
			}
			return ref.Name, "job"
		default:
			return ref.Name, strings.ToLower(ref.Kind)
		}
	}
	return pod.Name, "pod"
}

// cronJobName strips the scheduled-time suffix (minutes since the epoch)
// that a CronJob appends to its Jobs' names.
func cronJobName(job string) (string, bool) {
	i := strings.LastIndexByte(job, '-')
	if i <= 0 || len(job)-i-1 < 8 {
		return "", false
	}
	for _, c := range job[i+1:] {
		if c < '0' || c > '9' {
			return "", false
		}
	}
	return job[:i], true
}

func firstLabel(labels map[string]string, def string, keys ...string) string {
	for _, k := range keys {
		if v := labels[k]; v != "" {
			return v
		}
	}
	return def
}
