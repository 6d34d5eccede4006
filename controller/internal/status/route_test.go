package status

import (
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"
)

const ours = "amesh.dev/waypoint-controller"

func svcRef(name string, port int32) gwv1.ParentReference {
	g, k := gwv1.Group(""), gwv1.Kind("Service")
	r := gwv1.ParentReference{Group: &g, Kind: &k, Name: gwv1.ObjectName(name)}
	if port != 0 {
		r.Port = &port
	}
	return r
}

func accepted(ok bool, msg string) metav1.Condition {
	st, reason := metav1.ConditionFalse, "NoMatchingParent"
	if ok {
		st, reason = metav1.ConditionTrue, "Accepted"
	}
	return metav1.Condition{Type: "Accepted", Status: st, Reason: reason, Message: msg, ObservedGeneration: 1}
}

// TestMergeParents: other controllers' entries are kept in place and
// untouched; amesh's are replaced, added and removed; unchanged conditions
// keep their transition time; an identical status is no change.
func TestMergeParents(t *testing.T) {
	old := metav1.NewTime(time.Unix(1000, 0))
	other := gwv1.RouteParentStatus{
		ParentRef: svcRef("reviews", 0), ControllerName: "istio.io/gateway-controller",
		Conditions: []metav1.Condition{{Type: "Accepted", Status: metav1.ConditionTrue, Reason: "Accepted", LastTransitionTime: old}},
	}
	mineOld := gwv1.RouteParentStatus{ParentRef: svcRef("reviews", 0), ControllerName: ours,
		Conditions: []metav1.Condition{func() metav1.Condition { c := accepted(true, "a"); c.LastTransitionTime = old; return c }()}}
	stale := gwv1.RouteParentStatus{ParentRef: svcRef("gone", 0), ControllerName: ours,
		Conditions: []metav1.Condition{func() metav1.Condition { c := accepted(true, "b"); c.LastTransitionTime = old; return c }()}}
	current := []gwv1.RouteParentStatus{mineOld, other, stale}

	desired := []gwv1.RouteParentStatus{
		{ParentRef: svcRef("reviews", 0), Conditions: []metav1.Condition{accepted(true, "a")}},
		{ParentRef: svcRef("reviews", 9080), Conditions: []metav1.Condition{accepted(false, "no port")}},
	}
	out, changed := mergeParents(current, ours, desired)
	if !changed {
		t.Fatal("no change reported")
	}
	if len(out) != 3 {
		t.Fatalf("%d entries, want the other controller's and two of amesh's: %+v", len(out), out)
	}
	if out[0].ControllerName != other.ControllerName || !out[0].Conditions[0].LastTransitionTime.Equal(&old) {
		t.Errorf("the other controller's entry changed: %+v", out[0])
	}
	if got := out[1]; got.ControllerName != ours || got.ParentRef.Port != nil || !got.Conditions[0].LastTransitionTime.Equal(&old) {
		t.Errorf("unchanged amesh entry lost its transition time: %+v", got)
	}
	if got := out[2]; got.ControllerName != ours || got.ParentRef.Port == nil || got.Conditions[0].LastTransitionTime.IsZero() {
		t.Errorf("new amesh entry: %+v", got)
	}

	// The same desired state again: nothing to write.
	if _, changed := mergeParents(out, ours, desired); changed {
		t.Error("an identical status reported a change")
	}
	// amesh serves none of the parents any more: only the other stays,
	// and the list is empty rather than nil when nothing stays.
	out2, changed := mergeParents(out, ours, nil)
	if !changed || len(out2) != 1 || out2[0].ControllerName != other.ControllerName {
		t.Errorf("after removal: %+v (changed %v)", out2, changed)
	}
	out3, changed := mergeParents([]gwv1.RouteParentStatus{stale}, ours, nil)
	if !changed || out3 == nil || len(out3) != 0 {
		t.Errorf("removing the last entry: %#v (changed %v)", out3, changed)
	}
	if _, changed := mergeParents(nil, ours, nil); changed {
		t.Error("nothing to nothing reported a change")
	}
}

// TestMergeParentsLimit: amesh never pushes the list beyond the Gateway
// API's 32 entries.
func TestMergeParentsLimit(t *testing.T) {
	var current []gwv1.RouteParentStatus
	for i := range 31 {
		current = append(current, gwv1.RouteParentStatus{ParentRef: svcRef("s", int32(i+1)), ControllerName: "other.example/x"})
	}
	desired := []gwv1.RouteParentStatus{
		{ParentRef: svcRef("a", 0), Conditions: []metav1.Condition{accepted(true, "a")}},
		{ParentRef: svcRef("b", 0), Conditions: []metav1.Condition{accepted(true, "b")}},
	}
	out, _ := mergeParents(current, ours, desired)
	if len(out) != maxParents {
		t.Fatalf("%d entries, want %d", len(out), maxParents)
	}
}
