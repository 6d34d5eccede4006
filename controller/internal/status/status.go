// Package status writes the translator's statuses back: conditions and
// observedGeneration of the amesh policies, amesh's parent entries of
// HTTPRoute and GRPCRoute status, and the WaypointBound condition of
// Services — touching only objects whose status differs, and only the
// parts amesh owns.
package status

import (
	"context"
	"errors"
	"fmt"
	"slices"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	corev1ac "k8s.io/client-go/applyconfigurations/core/v1"
	metav1ac "k8s.io/client-go/applyconfigurations/meta/v1"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/controller-runtime/pkg/client"

	securityv1alpha1 "github.com/amesh-dev/amesh/controller/apis/security/v1alpha1"
	trafficv1alpha1 "github.com/amesh-dev/amesh/controller/apis/traffic/v1alpha1"
	"github.com/amesh-dev/amesh/controller/internal/translate"
)

// Writer patches policy statuses through a client whose reads may come
// from a cache.
type Writer struct {
	c client.Client
}

// NewWriter returns a Writer using c.
func NewWriter(c client.Client) *Writer { return &Writer{c: c} }

// Write brings every listed policy's status to the desired one. Objects
// that are gone, or whose generation moved on since the translation, are
// skipped (the next translation covers them). It returns the number of
// objects patched and the errors met.
//
// It is called after every translation with every policy, and nearly all
// of them are current: each is first looked at in place (a cache-backed
// client hands out the cached object, which is never modified), and only
// one whose status differs is read again as a copy to patch. A copy of
// every policy at every translation cost more than the translation.
func (w *Writer) Write(ctx context.Context, desired []translate.Status) (patched int, err error) {
	var errs []error
	for _, d := range desired {
		obj, st, ok := newObject(d.Kind)
		if !ok {
			errs = append(errs, fmt.Errorf("status: unknown kind %q", d.Kind))
			continue
		}
		key := types.NamespacedName{Namespace: d.Namespace, Name: d.Name}
		if err := w.c.Get(ctx, key, obj, &client.GetOptions{UnsafeDisableDeepCopy: ptr.To(true)}); err != nil {
			if !apierrors.IsNotFound(err) {
				errs = append(errs, fmt.Errorf("status: get %s %s: %w", d.Kind, key, err))
			}
			continue
		}
		if obj.GetGeneration() != d.Generation {
			continue
		}
		// obj may share its contents with the cache: apply works on
		// copies of the status fields.
		gen, conds := *st.observedGeneration, slices.Clone(*st.conditions)
		if !apply(policyStatus{observedGeneration: &gen, conditions: &conds}, d) {
			continue
		}
		obj, st, _ = newObject(d.Kind)
		if err := w.c.Get(ctx, key, obj); err != nil {
			if !apierrors.IsNotFound(err) {
				errs = append(errs, fmt.Errorf("status: get %s %s: %w", d.Kind, key, err))
			}
			continue
		}
		if obj.GetGeneration() != d.Generation {
			continue
		}
		base := obj.DeepCopyObject().(client.Object)
		if !apply(st, d) {
			continue
		}
		if err := w.c.Status().Patch(ctx, obj, client.MergeFrom(base)); err != nil {
			if !apierrors.IsNotFound(err) {
				errs = append(errs, fmt.Errorf("status: patch %s %s: %w", d.Kind, key, err))
			}
			continue
		}
		patched++
	}
	return patched, errors.Join(errs...)
}

// policyStatus is the status shape shared by every amesh policy.
type policyStatus struct {
	observedGeneration *int64
	conditions         *[]metav1.Condition
}

func newObject(kind string) (client.Object, policyStatus, bool) {
	switch kind {
	case translate.KindAuthorizationPolicy:
		o := &securityv1alpha1.AuthorizationPolicy{}
		return o, policyStatus{&o.Status.ObservedGeneration, &o.Status.Conditions}, true
	case translate.KindPeerAuthentication:
		o := &securityv1alpha1.PeerAuthentication{}
		return o, policyStatus{&o.Status.ObservedGeneration, &o.Status.Conditions}, true
	case translate.KindRequestAuthentication:
		o := &securityv1alpha1.RequestAuthentication{}
		return o, policyStatus{&o.Status.ObservedGeneration, &o.Status.Conditions}, true
	case translate.KindBackendTrafficPolicy:
		o := &trafficv1alpha1.BackendTrafficPolicy{}
		return o, policyStatus{&o.Status.ObservedGeneration, &o.Status.Conditions}, true
	}
	return nil, policyStatus{}, false
}

// apply sets the desired conditions (keeping the transition time of those
// whose status did not change, dropping those no longer reported) and
// reports whether anything changed.
func apply(st policyStatus, d translate.Status) bool {
	before := slices.Clone(*st.conditions)
	changed := *st.observedGeneration != d.Generation
	*st.observedGeneration = d.Generation
	want := map[string]bool{}
	for _, c := range d.Conditions {
		want[c.Type] = true
		if meta.SetStatusCondition(st.conditions, c) {
			changed = true
		}
	}
	for _, c := range before {
		if !want[c.Type] {
			meta.RemoveStatusCondition(st.conditions, c.Type)
			changed = true
		}
	}
	return changed
}

// WriteServices applies the Services' WaypointBound condition by
// server-side apply under fieldOwner: it owns only that condition of the
// Service's status, so other writers' conditions are left alone, and
// applying none removes it. The transition time is kept when the
// condition's status did not change.
func (w *Writer) WriteServices(ctx context.Context, fieldOwner string, desired []translate.Status) (patched int, err error) {
	var errs []error
	for _, d := range desired {
		key := types.NamespacedName{Namespace: d.Namespace, Name: d.Name}
		var svc corev1.Service
		if err := w.c.Get(ctx, key, &svc); err != nil {
			if !apierrors.IsNotFound(err) {
				errs = append(errs, fmt.Errorf("status: get Service %s: %w", key, err))
			}
			continue
		}
		st := corev1ac.ServiceStatus()
		for _, c := range d.Conditions {
			ltt := metav1.Now()
			if old := meta.FindStatusCondition(svc.Status.Conditions, c.Type); old != nil && old.Status == c.Status {
				ltt = old.LastTransitionTime
			}
			st.WithConditions(metav1ac.Condition().
				WithType(c.Type).WithStatus(c.Status).WithReason(c.Reason).WithMessage(c.Message).
				WithObservedGeneration(c.ObservedGeneration).WithLastTransitionTime(ltt))
		}
		ac := corev1ac.Service(d.Name, d.Namespace).WithStatus(st)
		if err := w.c.Status().Apply(ctx, ac, client.FieldOwner(fieldOwner), client.ForceOwnership); err != nil {
			if !apierrors.IsNotFound(err) {
				errs = append(errs, fmt.Errorf("status: apply Service %s: %w", key, err))
			}
			continue
		}
		patched++
	}
	return patched, errors.Join(errs...)
}
