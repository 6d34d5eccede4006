package demo

import (
	"fmt"
	"math"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
)

var httpRoutes = schema.GroupVersionResource{Group: "gateway.networking.k8s.io", Version: "v1", Resource: "httproutes"}

// routeAccepted reports whether every parent of a route reports Accepted
// for the route's current generation.
func routeAccepted(obj map[string]any, generation int64) (bool, error) {
	parents, _, _ := unstructured.NestedSlice(obj, "status", "parents")
	if len(parents) == 0 {
		return false, fmt.Errorf("no parent status yet")
	}
	for _, p := range parents {
		pm, _ := p.(map[string]any)
		conds, _, _ := unstructured.NestedSlice(pm, "conditions")
		ok := false
		for _, c := range conds {
			cm, _ := c.(map[string]any)
			if cm["type"] != "Accepted" {
				continue
			}
			og, _, _ := unstructured.NestedInt64(cm, "observedGeneration")
			if cm["status"] != "True" || og < generation {
				return false, fmt.Errorf("parent %v: Accepted=%v (%v) for generation %d of %d", pm["parentRef"], cm["status"], cm["message"], og, generation)
			}
			ok = true
		}
		if !ok {
			return false, fmt.Errorf("parent %v: no Accepted condition", pm["parentRef"])
		}
	}
	return true, nil
}

func sqrt(x float64) float64 { return math.Sqrt(x) }
