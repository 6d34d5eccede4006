package manifest

import (
	"bytes"
	"errors"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"text/template"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"sigs.k8s.io/yaml"
)

// The Helm chart (manifests/charts/amesh) is generated from the kustomize
// base: crds/ holds the CRDs as rendered, templates/ every other object
// with a few fields replaced by values (image registry, tag and pull
// policy; the CNI conf and bin dirs). Chart.yaml and values.yaml are
// written by hand. The templates use nothing but {{ .Values.x.y }}, which
// Go's text/template renders exactly as Helm does, so a test can prove
// that the chart with its default values renders to the base.

// BaseRegistry is the image registry (and repository prefix) of the base.
const BaseRegistry = "ghcr.io/amesh-dev"

// chartHeader starts every generated chart file.
const chartHeader = "# Generated from manifests/base by `make generate` (e2e/cmd/amesh-chartgen). Do not edit.\n"

// Value tokens: placeholders set into objects before marshalling and
// replaced by template actions after.
const (
	tokRegistry   = "__AMESH_REGISTRY__"
	tokTag        = "__AMESH_TAG__"
	tokPullPolicy = "__AMESH_PULL_POLICY__"
	tokCNIConfDir = "__AMESH_CNI_CONF_DIR__"
	tokCNIBinDir  = "__AMESH_CNI_BIN_DIR__"
)

var tokenActions = map[string]string{
	tokRegistry:   "{{ .Values.image.registry }}",
	tokTag:        "{{ .Values.image.tag }}",
	tokPullPolicy: "{{ .Values.image.pullPolicy }}",
	tokCNIConfDir: "{{ .Values.cni.confDir }}",
	tokCNIBinDir:  "{{ .Values.cni.binDir }}",
}

// Base values of the templated fields (what values.yaml must default to).
const (
	baseCNIConfDir = "/etc/cni/net.d"
	baseCNIBinDir  = "/opt/cni/bin"
)

// waypointImageEnv is the controller's environment variable naming the
// waypoint image.
const waypointImageEnv = "WAYPOINT_IMAGE"

// splitImage splits "registry/prefix/name:tag" into the part before the
// last slash, the name and the tag.
func splitImage(ref string) (registry, name, tag string, err error) {
	slash := strings.LastIndex(ref, "/")
	colon := strings.LastIndex(ref, ":")
	if slash < 0 || colon < slash || strings.Contains(ref, "@") {
		return "", "", "", fmt.Errorf("image %q: want registry/name:tag", ref)
	}
	return ref[:slash], ref[slash+1 : colon], ref[colon+1:], nil
}

// templateImage replaces an image reference of the base by tokens.
func templateImage(ref string) (string, error) {
	reg, name, _, err := splitImage(ref)
	if err != nil {
		return "", err
	}
	if reg != BaseRegistry {
		return "", fmt.Errorf("image %q: not in %s", ref, BaseRegistry)
	}
	return tokRegistry + "/" + name + ":" + tokTag, nil
}

// templatize returns a copy of u whose value-driven fields hold tokens.
func templatize(u *unstructured.Unstructured) (*unstructured.Unstructured, error) {
	out := u.DeepCopy()
	switch out.GetKind() {
	case "Deployment", "DaemonSet", "StatefulSet":
	default:
		return out, nil
	}
	spec, ok, err := unstructured.NestedMap(out.Object, "spec", "template", "spec")
	if err != nil || !ok {
		return nil, fmt.Errorf("%s: no pod template: %v", Key(u), err)
	}
	var errs []error
	for _, field := range []string{"initContainers", "containers"} {
		cs, _ := spec[field].([]any)
		for _, c := range cs {
			cm, ok := c.(map[string]any)
			if !ok {
				continue
			}
			img, _ := cm["image"].(string)
			t, err := templateImage(img)
			if err != nil {
				errs = append(errs, fmt.Errorf("%s: %w", Key(u), err))
				continue
			}
			cm["image"] = t
			cm["imagePullPolicy"] = tokPullPolicy
			envs, _ := cm["env"].([]any)
			for _, e := range envs {
				em, ok := e.(map[string]any)
				if !ok || em["name"] != waypointImageEnv {
					continue
				}
				v, _ := em["value"].(string)
				t, err := templateImage(v)
				if err != nil {
					errs = append(errs, fmt.Errorf("%s: %s: %w", Key(u), waypointImageEnv, err))
					continue
				}
				em["value"] = t
			}
		}
	}
	vols, _ := spec["volumes"].([]any)
	for _, v := range vols {
		vm, ok := v.(map[string]any)
		if !ok {
			continue
		}
		hp, ok := vm["hostPath"].(map[string]any)
		if !ok {
			continue
		}
		switch hp["path"] {
		case baseCNIConfDir:
			hp["path"] = tokCNIConfDir
		case baseCNIBinDir:
			hp["path"] = tokCNIBinDir
		}
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	if err := unstructured.SetNestedMap(out.Object, spec, "spec", "template", "spec"); err != nil {
		return nil, fmt.Errorf("%s: %w", Key(u), err)
	}
	return out, nil
}

// tokenLine matches a YAML line whose scalar value holds a token.
var tokenLine = regexp.MustCompile(`^(\s*(?:- )?[A-Za-z0-9_.-]+: )(\S*__AMESH_[A-Z_]+__\S*)$`)

// actionize replaces the tokens of marshalled YAML by template actions,
// quoting the scalars that hold them (a "{" must not open a flow mapping).
func actionize(doc []byte) ([]byte, error) {
	lines := strings.Split(string(doc), "\n")
	for i, l := range lines {
		if !strings.Contains(l, "__AMESH_") {
			continue
		}
		m := tokenLine.FindStringSubmatch(l)
		if m == nil {
			return nil, fmt.Errorf("token in an unexpected place: %q", l)
		}
		v := m[2]
		for tok, action := range tokenActions {
			v = strings.ReplaceAll(v, tok, action)
		}
		if strings.Contains(v, "__AMESH_") {
			return nil, fmt.Errorf("unknown token in %q", l)
		}
		lines[i] = m[1] + `"` + v + `"`
	}
	return []byte(strings.Join(lines, "\n")), nil
}

// fileName is the chart file of u: a CRD's name, or kind and name in
// lower case.
func fileName(u *unstructured.Unstructured) string {
	if IsCRD(u) {
		return u.GetName() + ".yaml"
	}
	return strings.ToLower(u.GetKind()) + "-" + u.GetName() + ".yaml"
}

// Chart returns the generated chart files (paths relative to the chart
// directory) for the objects of the kustomize base.
func Chart(base []*unstructured.Unstructured) (map[string][]byte, error) {
	files := make(map[string][]byte)
	var errs []error
	for _, u := range base {
		dir, obj := "templates", u
		if IsCRD(u) {
			dir = "crds"
		} else {
			t, err := templatize(u)
			if err != nil {
				errs = append(errs, err)
				continue
			}
			obj = t
		}
		doc, err := yaml.Marshal(obj.Object)
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", Key(u), err))
			continue
		}
		if doc, err = actionize(doc); err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", Key(u), err))
			continue
		}
		name := filepath.Join(dir, fileName(u))
		if _, dup := files[name]; dup {
			errs = append(errs, fmt.Errorf("%s: two objects for chart file %s", Key(u), name))
			continue
		}
		files[name] = append([]byte(chartHeader), doc...)
	}
	return files, errors.Join(errs...)
}

// chartDirs are the chart's generated directories.
var chartDirs = []string{"crds", "templates"}

// WriteChart regenerates the chart's crds/ and templates/ under root from
// the kustomize base (removing generated files of objects that are gone).
func WriteChart(root string) error {
	base, err := Render(filepath.Join(root, DirBase))
	if err != nil {
		return err
	}
	files, err := Chart(base)
	if err != nil {
		return err
	}
	chart := filepath.Join(root, DirChart)
	for _, d := range chartDirs {
		if err := os.RemoveAll(filepath.Join(chart, d)); err != nil {
			return fmt.Errorf("chart: %w", err)
		}
		if err := os.MkdirAll(filepath.Join(chart, d), 0o755); err != nil {
			return fmt.Errorf("chart: %w", err)
		}
	}
	for _, name := range slices.Sorted(maps.Keys(files)) {
		if err := os.WriteFile(filepath.Join(chart, name), files[name], 0o644); err != nil {
			return fmt.Errorf("chart: %w", err)
		}
	}
	return nil
}

// ReadChart reads the generated files of the chart under root.
func ReadChart(root string) (map[string][]byte, error) {
	files := make(map[string][]byte)
	chart := filepath.Join(root, DirChart)
	for _, d := range chartDirs {
		entries, err := os.ReadDir(filepath.Join(chart, d))
		if err != nil {
			return nil, fmt.Errorf("chart: %w", err)
		}
		for _, e := range entries {
			b, err := os.ReadFile(filepath.Join(chart, d, e.Name()))
			if err != nil {
				return nil, fmt.Errorf("chart: %w", err)
			}
			files[filepath.Join(d, e.Name())] = b
		}
	}
	return files, nil
}

// RenderChart renders the chart under root as Helm would with its
// values.yaml (merged with overrides, maps merged key by key), using Go's
// text/template: the generated templates use only .Values lookups. It
// returns the objects of crds/ and templates/.
func RenderChart(root string, overrides map[string]any) ([]*unstructured.Unstructured, error) {
	chart := filepath.Join(root, DirChart)
	raw, err := os.ReadFile(filepath.Join(chart, "values.yaml"))
	if err != nil {
		return nil, fmt.Errorf("chart values: %w", err)
	}
	values := map[string]any{}
	if err := yaml.Unmarshal(raw, &values); err != nil {
		return nil, fmt.Errorf("chart values: %w", err)
	}
	mergeValues(values, overrides)
	files, err := ReadChart(root)
	if err != nil {
		return nil, err
	}
	var out []*unstructured.Unstructured
	for _, name := range slices.Sorted(maps.Keys(files)) {
		doc := files[name]
		if strings.HasPrefix(name, "templates/") {
			t, err := template.New(name).Option("missingkey=error").Parse(string(doc))
			if err != nil {
				return nil, fmt.Errorf("chart %s: %w", name, err)
			}
			var b bytes.Buffer
			if err := t.Execute(&b, map[string]any{"Values": values}); err != nil {
				return nil, fmt.Errorf("chart %s: %w", name, err)
			}
			doc = b.Bytes()
		}
		j, err := yaml.YAMLToJSON(doc)
		if err != nil {
			return nil, fmt.Errorf("chart %s: %w", name, err)
		}
		u := &unstructured.Unstructured{}
		if err := u.UnmarshalJSON(j); err != nil {
			return nil, fmt.Errorf("chart %s: %w", name, err)
		}
		out = append(out, u)
	}
	return out, nil
}

// mergeValues merges src into dst recursively (maps key by key, anything
// else replaced).
func mergeValues(dst, src map[string]any) {
	for k, v := range src {
		if sm, ok := v.(map[string]any); ok {
			if dm, ok := dst[k].(map[string]any); ok {
				mergeValues(dm, sm)
				continue
			}
		}
		dst[k] = v
	}
}
