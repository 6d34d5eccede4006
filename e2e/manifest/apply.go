package manifest

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/discovery"
	"k8s.io/client-go/discovery/cached/memory"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/restmapper"
)

// DefaultFieldManager is the server-side apply field manager of amesh's
// installers.
const DefaultFieldManager = "amesh-install"

var crdResource = schema.GroupVersionResource{Group: apiextensionsAPI, Version: "v1", Resource: "customresourcedefinitions"}

// Applier installs rendered objects with server-side apply.
type Applier struct {
	dyn          dynamic.Interface
	mapper       *restmapper.DeferredDiscoveryRESTMapper
	fieldManager string
	// Progress, when set, is told about every object applied or deleted.
	Progress func(verb string, u *unstructured.Unstructured)
}

// NewApplier returns an Applier using cfg; fieldManager "" means
// DefaultFieldManager.
func NewApplier(cfg *rest.Config, fieldManager string) (*Applier, error) {
	if fieldManager == "" {
		fieldManager = DefaultFieldManager
	}
	dyn, err := dynamic.NewForConfig(cfg)
	if err != nil {
		return nil, fmt.Errorf("dynamic client: %w", err)
	}
	disc, err := discovery.NewDiscoveryClientForConfig(cfg)
	if err != nil {
		return nil, fmt.Errorf("discovery client: %w", err)
	}
	return &Applier{
		dyn:          dyn,
		mapper:       restmapper.NewDeferredDiscoveryRESTMapper(memory.NewMemCacheClient(disc)),
		fieldManager: fieldManager,
	}, nil
}

// ApplyOptions adjust Apply.
type ApplyOptions struct {
	// DryRun asks the server to validate and admit every object without
	// persisting it. CRDs are applied for real even then (nothing that
	// uses them could be validated otherwise).
	DryRun bool
	// CRDTimeout bounds the wait for CRDs to be Established (default 60s).
	CRDTimeout time.Duration
}

// Apply installs objs with server-side apply (forcing ownership of the
// fields it sets, strict field validation): CRDs first, then waits until
// they are Established, then Namespaces, then everything else in order.
func (a *Applier) Apply(ctx context.Context, objs []*unstructured.Unstructured, opts ApplyOptions) error {
	var crds, nss, rest []*unstructured.Unstructured
	for _, u := range objs {
		switch {
		case IsCRD(u):
			crds = append(crds, u)
		case u.GetKind() == namespaceKind && u.GroupVersionKind().Group == "":
			nss = append(nss, u)
		default:
			rest = append(rest, u)
		}
	}
	for _, u := range crds {
		if err := a.apply(ctx, u, false); err != nil {
			return err
		}
	}
	if len(crds) > 0 {
		timeout := opts.CRDTimeout
		if timeout == 0 {
			timeout = time.Minute
		}
		if err := a.waitEstablished(ctx, crds, timeout); err != nil {
			return err
		}
		a.mapper.Reset()
	}
	var errs []error
	for _, u := range slices.Concat(nss, rest) {
		if err := a.apply(ctx, u, opts.DryRun); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// resource returns the client of u's resource.
func (a *Applier) resource(u *unstructured.Unstructured) (dynamic.ResourceInterface, error) {
	gvk := u.GroupVersionKind()
	m, err := a.mapper.RESTMapping(gvk.GroupKind(), gvk.Version)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", Key(u), err)
	}
	if m.Scope.Name() != meta.RESTScopeNameNamespace {
		return a.dyn.Resource(m.Resource), nil
	}
	if u.GetNamespace() == "" {
		return nil, fmt.Errorf("%s: namespaced object without a namespace", Key(u))
	}
	return a.dyn.Resource(m.Resource).Namespace(u.GetNamespace()), nil
}

func (a *Applier) apply(ctx context.Context, u *unstructured.Unstructured, dryRun bool) error {
	ri, err := a.resource(u)
	if err != nil {
		return fmt.Errorf("apply %w", err)
	}
	body, err := u.MarshalJSON()
	if err != nil {
		return fmt.Errorf("apply %s: %w", Key(u), err)
	}
	force := true
	po := metav1.PatchOptions{FieldManager: a.fieldManager, Force: &force, FieldValidation: "Strict"}
	if dryRun {
		po.DryRun = []string{metav1.DryRunAll}
	}
	if _, err := ri.Patch(ctx, u.GetName(), types.ApplyPatchType, body, po); err != nil {
		return fmt.Errorf("apply %s: %w", Key(u), err)
	}
	if a.Progress != nil {
		a.Progress("applied", u)
	}
	return nil
}

// waitEstablished waits until every CRD reports Established.
func (a *Applier) waitEstablished(ctx context.Context, crds []*unstructured.Unstructured, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	pending := slices.Clone(crds)
	for {
		var still []*unstructured.Unstructured
		for _, c := range pending {
			got, err := a.dyn.Resource(crdResource).Get(ctx, c.GetName(), metav1.GetOptions{})
			if err != nil || !established(got) {
				still = append(still, c)
			}
		}
		if len(still) == 0 {
			return nil
		}
		pending = still
		select {
		case <-ctx.Done():
			names := make([]string, len(pending))
			for i, c := range pending {
				names[i] = c.GetName()
			}
			return fmt.Errorf("CRDs not Established within %s: %v: %w", timeout, names, ctx.Err())
		case <-time.After(200 * time.Millisecond):
		}
	}
}

func established(crd *unstructured.Unstructured) bool {
	conds, _, _ := unstructured.NestedSlice(crd.Object, "status", "conditions")
	for _, c := range conds {
		m, ok := c.(map[string]any)
		if ok && m["type"] == "Established" && m["status"] == "True" {
			return true
		}
	}
	return false
}

// DeleteOptions adjust Delete.
type DeleteOptions struct {
	// CRDs deletes CustomResourceDefinitions too (and with them every
	// custom resource of their kinds); by default they are kept.
	CRDs bool
}

// Delete removes objs in reverse order, in the background (Kubernetes
// garbage-collects what they own). Objects that are already gone, or
// whose kind is no longer served, are not errors.
func (a *Applier) Delete(ctx context.Context, objs []*unstructured.Unstructured, opts DeleteOptions) error {
	var errs []error
	policy := metav1.DeletePropagationBackground
	for _, u := range slices.Backward(objs) {
		if IsCRD(u) && !opts.CRDs {
			continue
		}
		ri, err := a.resource(u)
		if meta.IsNoMatchError(err) {
			continue
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("delete %w", err))
			continue
		}
		err = ri.Delete(ctx, u.GetName(), metav1.DeleteOptions{PropagationPolicy: &policy})
		if err != nil && !apierrors.IsNotFound(err) {
			errs = append(errs, fmt.Errorf("delete %s: %w", Key(u), err))
			continue
		}
		if a.Progress != nil && err == nil {
			a.Progress("deleted", u)
		}
	}
	return errors.Join(errs...)
}
