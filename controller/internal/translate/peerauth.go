package translate

import (
	"fmt"
	"slices"
	"strconv"
	"strings"

	pb "github.com/amesh-dev/amesh/api/discovery/v1"

	"github.com/amesh-dev/amesh/controller/apis/security/v1alpha1"
)

// peerAuthentications sets Workload.mtls_mode and port_mtls_modes. The
// policy with a selector beats the namespace-wide one, which beats the
// mesh-wide one (root namespace, no selector); UNSET inherits from the next
// level; among policies of one level the oldest wins, and the others are
// reported as conflicted.
func (t *translator) peerAuthentications(ws []*pb.Workload) {
	pas := slices.Clone(t.in.PeerAuthentications)
	pas = slices.DeleteFunc(pas, func(p *v1alpha1.PeerAuthentication) bool { return p.DeletionTimestamp != nil })
	slices.SortFunc(pas, func(a, b *v1alpha1.PeerAuthentication) int { return olderFirst(a.ObjectMeta, b.ObjectMeta) })

	var mesh *v1alpha1.PeerAuthentication
	nsWide := map[string]*v1alpha1.PeerAuthentication{}
	selected := map[string][]*v1alpha1.PeerAuthentication{}
	lost := map[*v1alpha1.PeerAuthentication]*v1alpha1.PeerAuthentication{}
	for _, pa := range pas {
		if pa.Spec.Selector != nil && len(pa.Spec.Selector.MatchLabels) > 0 {
			selected[pa.Namespace] = append(selected[pa.Namespace], pa)
			continue
		}
		if w := nsWide[pa.Namespace]; w != nil {
			lost[pa] = w
			continue
		}
		nsWide[pa.Namespace] = pa
		if pa.Namespace == t.cfg.RootNamespace {
			mesh = pa
		}
	}

	invalid := map[*v1alpha1.PeerAuthentication][]string{}
	portModes := map[*v1alpha1.PeerAuthentication]map[uint32]pb.MtlsMode{}
	for _, pa := range pas {
		for k, m := range pa.Spec.PortLevelMtls {
			p, err := strconv.ParseUint(k, 10, 16)
			if err != nil || p == 0 {
				invalid[pa] = append(invalid[pa], fmt.Sprintf("port %q", k))
				continue
			}
			if mode := mtlsMode(m.Mode); mode != pb.MtlsMode_MTLS_MODE_UNSET {
				if portModes[pa] == nil {
					portModes[pa] = map[uint32]pb.MtlsMode{}
				}
				portModes[pa][uint32(p)] = mode
			}
		}
	}

	for _, w := range ws {
		pod := t.pods[w.Uid]
		if pod == nil {
			continue // not a pod: no policy applies
		}
		var winner *v1alpha1.PeerAuthentication
		for _, pa := range selected[pod.Namespace] {
			if !selects(pa.Spec.Selector.MatchLabels, pod.Labels) {
				continue
			}
			if winner == nil {
				winner = pa
			} else if lost[pa] == nil {
				lost[pa] = winner
			}
		}
		mode := pb.MtlsMode_MTLS_MODE_UNSET
		for _, pa := range []*v1alpha1.PeerAuthentication{winner, nsWide[pod.Namespace], mesh} {
			if pa != nil && pa.Spec.Mtls != nil && mode == pb.MtlsMode_MTLS_MODE_UNSET {
				mode = mtlsMode(pa.Spec.Mtls.Mode)
			}
		}
		w.MtlsMode = mode
		if winner != nil && len(portModes[winner]) > 0 {
			w.PortMtlsModes = make(map[uint32]pb.MtlsMode, len(portModes[winner]))
			for p, m := range portModes[winner] {
				w.PortMtlsModes[p] = m
			}
		}
	}

	for _, pa := range pas {
		if bad := invalid[pa]; len(bad) > 0 {
			t.setCondition(KindPeerAuthentication, pa.ObjectMeta, condition(v1alpha1.ConditionAccepted, false,
				v1alpha1.ReasonInvalid, "invalid portLevelMtls keys ("+strings.Join(bad, ", ")+") are ignored"))
		} else {
			t.setCondition(KindPeerAuthentication, pa.ObjectMeta, condition(v1alpha1.ConditionAccepted, true,
				v1alpha1.ReasonAccepted, "the policy is valid"))
		}
		if w := lost[pa]; w != nil {
			t.setCondition(KindPeerAuthentication, pa.ObjectMeta, condition(v1alpha1.ConditionConflicted, true,
				v1alpha1.ReasonConflicted, fmt.Sprintf("older PeerAuthentication %s/%s takes precedence for some or all workloads", w.Namespace, w.Name)))
		} else {
			t.setCondition(KindPeerAuthentication, pa.ObjectMeta, condition(v1alpha1.ConditionConflicted, false,
				v1alpha1.ReasonNoConflict, "no other policy takes precedence"))
		}
	}
}

// mtlsMode maps a CRD mode to its wire form; DISABLE behaves as PERMISSIVE
// in ambient mode.
func mtlsMode(m v1alpha1.MutualTLSMode) pb.MtlsMode {
	switch m {
	case v1alpha1.MTLSStrict:
		return pb.MtlsMode_MTLS_MODE_STRICT
	case v1alpha1.MTLSPermissive, v1alpha1.MTLSDisable:
		return pb.MtlsMode_MTLS_MODE_PERMISSIVE
	}
	return pb.MtlsMode_MTLS_MODE_UNSET
}
