package translate

import (
	"fmt"
	"maps"
	"slices"
	"strconv"
	"strings"

	pb "github.com/amesh-dev/amesh/api/discovery/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/amesh-dev/amesh/controller/apis/security/v1alpha1"
)

// PeerAuthentication precedence: the policy with a selector beats the
// namespace-wide one, which beats the mesh-wide one (root namespace, no
// selector); UNSET inherits from the next level; among policies of one
// level the oldest wins, and the others are reported as conflicted.

// peerAuthIndex holds the PeerAuthentications by level.
type peerAuthIndex struct {
	all      []*v1alpha1.PeerAuthentication // oldest first
	mesh     *v1alpha1.PeerAuthentication
	nsWide   map[string]*v1alpha1.PeerAuthentication
	selected map[string][]*v1alpha1.PeerAuthentication // by namespace, oldest first
	// nsLost maps a namespace-wide policy to the older one that beat it.
	nsLost    map[*v1alpha1.PeerAuthentication]*v1alpha1.PeerAuthentication
	invalid   map[*v1alpha1.PeerAuthentication][]string
	portModes map[*v1alpha1.PeerAuthentication]map[uint32]pb.MtlsMode
}

func (t *translator) indexPeerAuthentications() peerAuthIndex {
	pas := slices.Clone(t.in.PeerAuthentications)
	pas = slices.DeleteFunc(pas, func(p *v1alpha1.PeerAuthentication) bool { return p.DeletionTimestamp != nil })
	slices.SortFunc(pas, func(a, b *v1alpha1.PeerAuthentication) int { return olderFirst(a.ObjectMeta, b.ObjectMeta) })
	x := peerAuthIndex{
		all:       pas,
		nsWide:    map[string]*v1alpha1.PeerAuthentication{},
		selected:  map[string][]*v1alpha1.PeerAuthentication{},
		nsLost:    map[*v1alpha1.PeerAuthentication]*v1alpha1.PeerAuthentication{},
		invalid:   map[*v1alpha1.PeerAuthentication][]string{},
		portModes: map[*v1alpha1.PeerAuthentication]map[uint32]pb.MtlsMode{},
	}
	for _, pa := range pas {
		for _, k := range slices.Sorted(maps.Keys(pa.Spec.PortLevelMtls)) {
			p, err := strconv.ParseUint(k, 10, 16)
			if err != nil || p == 0 {
				x.invalid[pa] = append(x.invalid[pa], fmt.Sprintf("port %q", k))
				continue
			}
			if mode := mtlsMode(pa.Spec.PortLevelMtls[k].Mode); mode != pb.MtlsMode_MTLS_MODE_UNSET {
				if x.portModes[pa] == nil {
					x.portModes[pa] = map[uint32]pb.MtlsMode{}
				}
				x.portModes[pa][uint32(p)] = mode
			}
		}
		if pa.Spec.Selector != nil && len(pa.Spec.Selector.MatchLabels) > 0 {
			x.selected[pa.Namespace] = append(x.selected[pa.Namespace], pa)
			continue
		}
		if w := x.nsWide[pa.Namespace]; w != nil {
			x.nsLost[pa] = w
			continue
		}
		x.nsWide[pa.Namespace] = pa
		if pa.Namespace == t.cfg.RootNamespace {
			x.mesh = pa
		}
	}
	return x
}

// podPeerAuthentication sets the workload's mTLS modes and returns the
// selector policy that applies (if any) and those it beat.
func (t *translator) podPeerAuthentication(pod *corev1.Pod, w *pb.Workload) (winner *v1alpha1.PeerAuthentication, losers []*v1alpha1.PeerAuthentication) {
	x := &t.pa
	for _, pa := range x.selected[pod.Namespace] {
		if !selects(pa.Spec.Selector.MatchLabels, pod.Labels) {
			continue
		}
		if winner == nil {
			winner = pa
		} else {
			losers = append(losers, pa)
		}
	}
	mode := pb.MtlsMode_MTLS_MODE_UNSET
	for _, pa := range []*v1alpha1.PeerAuthentication{winner, x.nsWide[pod.Namespace], x.mesh} {
		if pa != nil && pa.Spec.Mtls != nil && mode == pb.MtlsMode_MTLS_MODE_UNSET {
			mode = mtlsMode(pa.Spec.Mtls.Mode)
		}
	}
	w.MtlsMode = mode
	if winner != nil && len(x.portModes[winner]) > 0 {
		w.PortMtlsModes = maps.Clone(x.portModes[winner])
	}
	return winner, losers
}

// peerAuthStatuses reports, for every PeerAuthentication, whether it is
// valid and whether an older policy took precedence on some workload.
func (t *translator) peerAuthStatuses(pods []*podResult) []Status {
	x := &t.pa
	lost := maps.Clone(x.nsLost)
	for _, p := range pods {
		for _, l := range p.paLosers {
			if lost[l] == nil {
				lost[l] = p.paWinner
			} else if olderFirst(p.paWinner.ObjectMeta, lost[l].ObjectMeta) < 0 {
				lost[l] = p.paWinner // report the oldest winner, whatever the pod order
			}
		}
	}
	out := make([]Status, 0, len(x.all))
	for _, pa := range x.all {
		accepted := condition(v1alpha1.ConditionAccepted, true, v1alpha1.ReasonAccepted, "the policy is valid")
		if bad := x.invalid[pa]; len(bad) > 0 {
			accepted = condition(v1alpha1.ConditionAccepted, false, v1alpha1.ReasonInvalid,
				"invalid portLevelMtls keys ("+strings.Join(bad, ", ")+") are ignored")
		}
		conflicted := condition(v1alpha1.ConditionConflicted, false, v1alpha1.ReasonNoConflict, "no other policy takes precedence")
		if w := lost[pa]; w != nil {
			conflicted = condition(v1alpha1.ConditionConflicted, true, v1alpha1.ReasonConflicted,
				fmt.Sprintf("older PeerAuthentication %s/%s takes precedence for some or all workloads", w.Namespace, w.Name))
		}
		accepted.ObservedGeneration, conflicted.ObservedGeneration = pa.Generation, pa.Generation
		s := Status{
			Kind: KindPeerAuthentication, Namespace: pa.Namespace, Name: pa.Name, Generation: pa.Generation,
			Conditions: []metav1.Condition{accepted, conflicted},
		}
		out = append(out, s)
	}
	return out
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
