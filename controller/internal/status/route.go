package status

import (
	"context"
	"errors"
	"fmt"
	"slices"

	"k8s.io/apimachinery/pkg/api/equality"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"sigs.k8s.io/controller-runtime/pkg/client"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"

	"github.com/amesh-dev/amesh/controller/internal/translate"
)

// maxParents is the Gateway API's limit on route status entries.
const maxParents = 32

// WriteRoutes brings the entries of every listed route's status.parents
// that carry controllerName to the desired ones: entries of other
// controllers are kept as they are (the Gateway API's rule for shared
// route status), amesh's are updated, added or removed. Each write is a
// read-modify-write guarded by the object's resourceVersion, so a
// concurrent writer's change is never lost (the conflict is retried with
// the next translation). Routes that are gone or whose generation moved on
// are skipped.
func (w *Writer) WriteRoutes(ctx context.Context, controllerName string, desired []translate.RouteStatus) (patched int, err error) {
	var errs []error
	for _, d := range desired {
		key := types.NamespacedName{Namespace: d.Namespace, Name: d.Name}
		var (
			obj     client.Object
			parents *[]gwv1.RouteParentStatus
		)
		switch d.Kind {
		case translate.KindHTTPRoute:
			r := &gwv1.HTTPRoute{}
			obj, parents = r, &r.Status.Parents
		case translate.KindGRPCRoute:
			r := &gwv1.GRPCRoute{}
			obj, parents = r, &r.Status.Parents
		default:
			errs = append(errs, fmt.Errorf("status: unknown route kind %q", d.Kind))
			continue
		}
		if err := w.c.Get(ctx, key, obj); err != nil {
			if !apierrors.IsNotFound(err) {
				errs = append(errs, fmt.Errorf("status: get %s %s: %w", d.Kind, key, err))
			}
			continue
		}
		if obj.GetGeneration() != d.Generation {
			continue
		}
		next, changed := mergeParents(*parents, controllerName, d.Parents)
		if !changed {
			continue
		}
		*parents = next
		// Update carries the resourceVersion read: a conflict means
		// someone else wrote in between, and the next round retries.
		if err := w.c.Status().Update(ctx, obj); err != nil {
			if !apierrors.IsNotFound(err) {
				errs = append(errs, fmt.Errorf("status: update %s %s: %w", d.Kind, key, err))
			}
			continue
		}
		patched++
	}
	return patched, errors.Join(errs...)
}

// mergeParents returns current with the entries of controllerName replaced
// by desired (keeping the transition time of conditions whose status did
// not change), and whether anything changed. Other controllers' entries
// keep their place and content.
func mergeParents(current []gwv1.RouteParentStatus, controllerName string, desired []gwv1.RouteParentStatus) ([]gwv1.RouteParentStatus, bool) {
	// Never nil: status.parents is required.
	out := make([]gwv1.RouteParentStatus, 0, len(current)+len(desired))
	mine := map[int]gwv1.RouteParentStatus{}
	for i, p := range current {
		if string(p.ControllerName) != controllerName {
			out = append(out, p)
			continue
		}
		mine[i] = p
	}
	room := max(maxParents-len(out), 0)
	for _, d := range desired[:min(len(desired), room)] {
		var old []metav1.Condition
		for i, p := range mine {
			if equality.Semantic.DeepEqual(p.ParentRef, d.ParentRef) {
				old = p.Conditions
				delete(mine, i)
				break
			}
		}
		conds := slices.Clone(old)
		want := map[string]bool{}
		for _, c := range d.Conditions {
			want[c.Type] = true
			meta.SetStatusCondition(&conds, c)
		}
		conds = slices.DeleteFunc(conds, func(c metav1.Condition) bool { return !want[c.Type] })
		d.Conditions = conds
		d.ControllerName = gwv1.GatewayController(controllerName)
		out = append(out, d)
	}
	return out, !equality.Semantic.DeepEqual(normalize(out), normalize(current))
}

// normalize makes an empty list and a nil one compare equal.
func normalize(l []gwv1.RouteParentStatus) []gwv1.RouteParentStatus {
	if len(l) == 0 {
		return nil
	}
	return l
}
