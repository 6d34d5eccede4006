// Package manifest renders amesh's kustomize manifests (manifests/ at the
// repository root) and installs them with server-side apply, CRDs first.
// Whatever installs amesh — the demo, the end-to-end suite, the kind
// scripts through kubectl — uses these same files; this package is how Go
// code does it. It also generates the Helm chart from the kustomize base.
package manifest

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"sigs.k8s.io/kustomize/api/krusty"
	"sigs.k8s.io/kustomize/kyaml/filesys"
	"sigs.k8s.io/yaml"
)

// Well-known kustomization directories, relative to the repository root.
const (
	DirCRDs          = "manifests/crds"
	DirBase          = "manifests/base"
	DirOverlayKind   = "manifests/overlays/kind"
	DirOverlayLocal  = "manifests/overlays/local"
	DirSample        = "manifests/samples/bookinfo"
	DirSampleRoutes  = "manifests/samples/bookinfo/routes"
	DirChart         = "manifests/charts/amesh"
	DirGatewayAPI    = "manifests/gateway-api"
	SystemNamespace  = "amesh-system"
	SampleNamespace  = "bookinfo"
	marker           = "manifests/base/kustomization.yaml"
	crdKind          = "CustomResourceDefinition"
	namespaceKind    = "Namespace"
	apiextensionsAPI = "apiextensions.k8s.io"
)

// FindRoot returns the repository root: the first directory at or above
// start that holds manifests/base/kustomization.yaml.
func FindRoot(start string) (string, error) {
	dir, err := filepath.Abs(start)
	if err != nil {
		return "", fmt.Errorf("find repository root: %w", err)
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, marker)); err == nil {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", fmt.Errorf("no %s at or above %s", marker, start)
		}
		dir = parent
	}
}

// Render builds the kustomization in dir, as `kubectl kustomize dir` does
// (same kustomize library and options: files outside a kustomization's
// root may only be reached through other kustomizations; kustomize's
// legacy order, namespaces and CRDs first), and returns its objects.
func Render(dir string) ([]*unstructured.Unstructured, error) {
	opts := krusty.MakeDefaultOptions()
	opts.Reorder = krusty.ReorderOptionLegacy // kubectl kustomize's order
	k := krusty.MakeKustomizer(opts)
	rm, err := k.Run(filesys.MakeFsOnDisk(), dir)
	if err != nil {
		return nil, fmt.Errorf("kustomize %s: %w", dir, err)
	}
	var out []*unstructured.Unstructured
	var errs []error
	for _, r := range rm.Resources() {
		// Through JSON, so that numbers are int64/float64 as in any
		// object decoded by apimachinery.
		b, err := r.MarshalJSON()
		if err != nil {
			errs = append(errs, fmt.Errorf("kustomize %s: %s: %w", dir, r.CurId(), err))
			continue
		}
		u := &unstructured.Unstructured{}
		if err := u.UnmarshalJSON(b); err != nil {
			errs = append(errs, fmt.Errorf("kustomize %s: %s: %w", dir, r.CurId(), err))
			continue
		}
		if u.GetAPIVersion() == "" || u.GetKind() == "" || u.GetName() == "" {
			errs = append(errs, fmt.Errorf("kustomize %s: object without apiVersion, kind or name: %s", dir, r.CurId()))
			continue
		}
		out = append(out, u)
	}
	return out, errors.Join(errs...)
}

// RenderAll renders several kustomization directories (relative to root)
// into one list, in order.
func RenderAll(root string, dirs ...string) ([]*unstructured.Unstructured, error) {
	var out []*unstructured.Unstructured
	for _, d := range dirs {
		objs, err := Render(filepath.Join(root, d))
		if err != nil {
			return nil, err
		}
		out = append(out, objs...)
	}
	return out, nil
}

// ReadFile parses a YAML file of one or more documents (e.g. a single
// sample route) into objects, as kubectl apply -f would.
func ReadFile(path string) ([]*unstructured.Unstructured, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("read manifest: %w", err)
	}
	defer f.Close()
	r := utilyaml.NewYAMLReader(bufio.NewReader(f))
	var out []*unstructured.Unstructured
	for {
		doc, err := r.Read()
		if errors.Is(err, io.EOF) {
			return out, nil
		}
		if err != nil {
			return nil, fmt.Errorf("read manifest %s: %w", path, err)
		}
		j, err := yaml.YAMLToJSON(doc)
		if err != nil {
			return nil, fmt.Errorf("read manifest %s: %w", path, err)
		}
		if s := strings.TrimSpace(string(j)); s == "null" || s == "{}" {
			continue // an empty document
		}
		u := &unstructured.Unstructured{}
		if err := u.UnmarshalJSON(j); err != nil {
			return nil, fmt.Errorf("read manifest %s: %w", path, err)
		}
		if u.GetName() == "" {
			return nil, fmt.Errorf("read manifest %s: %s without a name", path, u.GetKind())
		}
		out = append(out, u)
	}
}

// IsCRD reports whether u is a CustomResourceDefinition.
func IsCRD(u *unstructured.Unstructured) bool {
	return u.GetKind() == crdKind && u.GroupVersionKind().Group == apiextensionsAPI
}

// Key names an object uniquely within one render: group/kind namespace/name.
func Key(u *unstructured.Unstructured) string {
	gvk := u.GroupVersionKind()
	return fmt.Sprintf("%s/%s %s/%s", gvk.Group, gvk.Kind, u.GetNamespace(), u.GetName())
}
