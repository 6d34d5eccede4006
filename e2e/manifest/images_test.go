package manifest

import (
	"maps"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/amesh-dev/amesh/e2e/sample"
)

// shellArray returns the words of `name=(…)` in a shell script.
func shellArray(t *testing.T, file, name string) []string {
	t.Helper()
	b, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`(?m)^\s*` + name + `=\(([^)]*)\)`).FindSubmatch(b)
	if m == nil {
		t.Fatalf("%s: no %s=(…)", file, name)
	}
	words := strings.Fields(string(m[1]))
	slices.Sort(words)
	return words
}

// TestImagesAgree checks that the Dockerfile's image targets, the image
// lists of hack/images.sh and e2e/kind/kind.sh, and the images the kind
// overlays use are the same set, and that each image's entrypoint is
// /usr/local/bin/<name> (the local cluster's image table convention).
func TestImagesAgree(t *testing.T) {
	r := root(t)
	df, err := os.ReadFile(filepath.Join(r, "Dockerfile"))
	if err != nil {
		t.Fatal(err)
	}
	stage := regexp.MustCompile(`(?m)^FROM\s+\S+\s+AS\s+(\S+)\s*$`)
	var targets []string
	for _, m := range stage.FindAllStringSubmatch(string(df), -1) {
		if name := m[1]; name != "src" && !strings.HasPrefix(name, "build-") {
			targets = append(targets, name)
		}
	}
	slices.Sort(targets)
	// Each image stage's ENTRYPOINT.
	for _, target := range targets {
		i := strings.Index(string(df), " AS "+target+"\n")
		rest := string(df)[i:]
		if j := strings.Index(rest[1:], "\nFROM "); j >= 0 {
			rest = rest[:j+1]
		}
		if want := `ENTRYPOINT ["/usr/local/bin/` + target + `"]`; !strings.Contains(rest, want) {
			t.Errorf("Dockerfile target %s: no %s", target, want)
		}
	}

	scripts := map[string][]string{
		"hack/images.sh":   shellArray(t, filepath.Join(r, "hack/images.sh"), "all"),
		"e2e/kind/kind.sh": shellArray(t, filepath.Join(r, "e2e/kind/kind.sh"), "images"),
	}
	for file, list := range scripts {
		if !slices.Equal(list, targets) {
			t.Errorf("%s builds %v, the Dockerfile has %v", file, list, targets)
		}
	}

	used := map[string]bool{}
	for _, dir := range []string{DirOverlayKind, DirOverlayKind + "/bookinfo"} {
		for _, u := range render(t, dir) {
			if u.GetKind() != "Deployment" && u.GetKind() != "DaemonSet" {
				continue
			}
			c := container(t, u)
			refs := []string{c["image"].(string)}
			env, _ := c["env"].([]any)
			for _, e := range env {
				if em := e.(map[string]any); em["name"] == waypointImageEnv {
					refs = append(refs, em["value"].(string))
				}
			}
			for _, ref := range refs {
				_, name, _, err := splitImage(ref)
				if err != nil {
					t.Fatal(err)
				}
				used[name] = true
			}
		}
	}
	if got := slices.Sorted(maps.Keys(used)); !slices.Equal(got, targets) {
		t.Errorf("the kind overlays use images %v, the Dockerfile builds %v", got, targets)
	}
}

// TestSampleDeployments checks the sample's workloads: every one runs the
// sampleapp image with a role it knows, its own ServiceAccount per app,
// and a Service of the same app on 9080.
func TestSampleDeployments(t *testing.T) {
	objs := render(t, DirSample)
	services := map[string]bool{}
	for _, u := range objs {
		if u.GetKind() == "Service" {
			services[u.GetName()] = true
		}
	}
	roles := map[string]bool{}
	for _, u := range objs {
		if u.GetKind() != "Deployment" {
			continue
		}
		c := container(t, u)
		if _, name, _, err := splitImage(c["image"].(string)); err != nil || name != "sampleapp" {
			t.Errorf("%s: image %v", Key(u), c["image"])
		}
		env := map[string]string{}
		for _, e := range c["env"].([]any) {
			em := e.(map[string]any)
			if v, ok := em["value"].(string); ok {
				env[em["name"].(string)] = v
			}
		}
		if !slices.Contains(sample.Roles(), sample.Role(env["ROLE"])) {
			t.Errorf("%s: ROLE %q is not a sample role", Key(u), env["ROLE"])
		}
		roles[env["ROLE"]] = true
		app := u.GetLabels()["app"]
		if !services[app] || env["SERVICE_NAME"] != app {
			t.Errorf("%s: app %q without its Service or SERVICE_NAME (%q)", Key(u), app, env["SERVICE_NAME"])
		}
		if sa := podSpec(t, u)["serviceAccountName"]; sa == nil || sa == "default" {
			t.Errorf("%s: runs as the default service account", Key(u))
		}
	}
	for _, r := range sample.Roles() {
		if !roles[string(r)] {
			t.Errorf("no workload of role %s", r)
		}
	}
	for _, v := range []string{"reviews-v1", "reviews-v2"} {
		if !services[v] {
			t.Errorf("no Service %s for the version routes", v)
		}
	}
}
