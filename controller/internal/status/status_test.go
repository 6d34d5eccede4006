package status

import (
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/amesh-dev/amesh/controller/internal/translate"
)

// TestApply: unchanged conditions keep their transition time and report
// no change; a changed status stamps a new time; conditions no longer
// reported are removed.
func TestApply(t *testing.T) {
	old := metav1.NewTime(time.Unix(1000, 0))
	var gen int64 = 2
	conds := []metav1.Condition{
		{Type: "Accepted", Status: metav1.ConditionTrue, Reason: "Accepted", Message: "ok", ObservedGeneration: 2, LastTransitionTime: old},
		{Type: "ZtunnelAccepted", Status: metav1.ConditionTrue, Reason: "Enforced", Message: "all", ObservedGeneration: 2, LastTransitionTime: old},
	}
	st := policyStatus{observedGeneration: &gen, conditions: &conds}
	same := translate.Status{Generation: 2, Conditions: []metav1.Condition{
		{Type: "Accepted", Status: metav1.ConditionTrue, Reason: "Accepted", Message: "ok", ObservedGeneration: 2},
		{Type: "ZtunnelAccepted", Status: metav1.ConditionTrue, Reason: "Enforced", Message: "all", ObservedGeneration: 2},
	}}
	if apply(st, same) {
		t.Fatal("an identical status reported a change")
	}
	if !conds[0].LastTransitionTime.Equal(&old) {
		t.Fatal("transition time changed without a transition")
	}

	moved := translate.Status{Generation: 3, Conditions: []metav1.Condition{
		{Type: "Accepted", Status: metav1.ConditionTrue, Reason: "Accepted", Message: "ok", ObservedGeneration: 3},
		{Type: "WaypointAccepted", Status: metav1.ConditionFalse, Reason: "TargetNotFound", Message: "x", ObservedGeneration: 3},
	}}
	if !apply(st, moved) {
		t.Fatal("a new status reported no change")
	}
	if gen != 3 || len(conds) != 2 {
		t.Fatalf("observedGeneration %d, conditions %+v", gen, conds)
	}
	for _, c := range conds {
		switch c.Type {
		case "Accepted":
			if !c.LastTransitionTime.Equal(&old) || c.ObservedGeneration != 3 {
				t.Errorf("Accepted: %+v", c)
			}
		case "WaypointAccepted":
			if c.LastTransitionTime.IsZero() || c.LastTransitionTime.Equal(&old) {
				t.Errorf("WaypointAccepted has no fresh transition time: %+v", c)
			}
		default:
			t.Errorf("stale condition %s kept", c.Type)
		}
	}
}
