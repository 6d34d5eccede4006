// Package mesh drives amesh on a cluster for the end-to-end suite and the
// demo: install from manifests/ (e2e/manifest), enrol namespaces, deploy
// sample workloads, drive traffic through the sample client's /run, and
// read what the data plane reports (Prometheus metrics, access logs).
package mesh

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"time"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"

	"github.com/amesh-dev/amesh/e2e/internal/kube"
	"github.com/amesh-dev/amesh/e2e/manifest"
	"github.com/amesh-dev/amesh/e2e/sample"
)

// DESIGN.md §2 names.
const (
	SystemNamespace    = manifest.SystemNamespace
	LabelDataplaneMode = "amesh.dev/dataplane-mode"
	ModeAmbient        = "ambient"
	ModeNone           = "none"
	LabelUseWaypoint   = "amesh.dev/use-waypoint"
	AnnotRedirection   = "amesh.dev/redirection"
	WaypointClass      = "amesh-waypoint"
	TrustDomain        = "cluster.local"
)

// Ports (DESIGN.md §3) and the sample's port.
const (
	PortHBONE   = 15008
	PortMetrics = 15020
	PortApp     = 9080
)

// Env is where the suite runs: it picks the manifests overlay.
type Env string

// Known environments.
const (
	EnvLocal Env = "local"
	EnvKind  Env = "kind"
)

// ParseEnv checks an environment name ("" means local).
func ParseEnv(s string) (Env, error) {
	switch Env(s) {
	case "", EnvLocal:
		return EnvLocal, nil
	case EnvKind:
		return EnvKind, nil
	}
	return "", fmt.Errorf("environment %q: want local or kind", s)
}

// Overlay is the amesh install overlay of the environment.
func (e Env) Overlay() string {
	if e == EnvKind {
		return manifest.DirOverlayKind
	}
	return manifest.DirOverlayLocal
}

// SampleOverlay is the bookinfo sample overlay of the environment.
func (e Env) SampleOverlay() string { return e.Overlay() + "/bookinfo" }

// SampleImage is the sample application's image in both overlays.
const SampleImage = "ghcr.io/amesh-dev/sampleapp:dev"

// ToolImage carries tcpdump, curl and a shell. The local cluster maps it
// to the node's own tools; kind pulls it.
const ToolImage = "nicolaka/netshoot:v0.13"

// Identity is the SPIFFE ID of a service account.
func Identity(ns, sa string) string {
	return fmt.Sprintf("spiffe://%s/ns/%s/sa/%s", TrustDomain, ns, sa)
}

// Install applies amesh's manifests for env from the repository root and
// waits until the controller, the node agents and ztunnel are ready.
// progress, when set, hears about each step.
func Install(ctx context.Context, c *kube.Client, root string, env Env, progress func(string)) error {
	say := func(f string, a ...any) {
		if progress != nil {
			progress(fmt.Sprintf(f, a...))
		}
	}
	objs, err := manifest.Render(root + "/" + env.Overlay())
	if err != nil {
		return err
	}
	say("applying %d objects from %s (server-side apply, CRDs first)", len(objs), env.Overlay())
	if err := c.Apply(ctx, objs...); err != nil {
		return fmt.Errorf("install amesh: %w", err)
	}
	say("waiting for amesh-controller")
	if err := c.WaitDeployment(ctx, SystemNamespace, "amesh-controller", 3*time.Minute); err != nil {
		return err
	}
	for _, ds := range []string{"amesh-cni-agent", "ztunnel"} {
		say("waiting for the %s DaemonSet", ds)
		if err := c.WaitDaemonSet(ctx, SystemNamespace, ds, 3*time.Minute); err != nil {
			return err
		}
	}
	return nil
}

// Uninstall deletes what Install applied (CRDs included when crds is set).
func Uninstall(ctx context.Context, c *kube.Client, root string, env Env, crds bool) error {
	objs, err := manifest.Render(root + "/" + env.Overlay())
	if err != nil {
		return err
	}
	return c.Applier.Delete(ctx, objs, manifest.DeleteOptions{CRDs: crds})
}

// RenderSample renders the bookinfo sample for env.
func RenderSample(root string, env Env) ([]*unstructured.Unstructured, error) {
	return manifest.Render(root + "/" + env.SampleOverlay())
}

// Enrol labels a namespace into the mesh (enrol true) or removes the label.
func Enrol(ctx context.Context, c *kube.Client, ns string, enrol bool) error {
	v := ""
	if enrol {
		v = ModeAmbient
	}
	return c.Label(ctx, "namespaces", "", ns, LabelDataplaneMode, v)
}

// WaitRedirection waits until every pod matching selector carries the
// redirection annotation with the given state ("enabled"), or none at all
// when state is "". Pods that opt out (dataplane-mode none) are skipped.
func WaitRedirection(ctx context.Context, c *kube.Client, ns, selector, state string, timeout time.Duration) error {
	return kube.Poll(ctx, 500*time.Millisecond, timeout, func(ctx context.Context) (bool, error) {
		pods, err := c.Pods(ctx, ns, selector)
		if err != nil {
			return false, err
		}
		if len(pods) == 0 {
			return false, fmt.Errorf("no pods %s %q", ns, selector)
		}
		var bad []string
		for _, p := range pods {
			if p.Labels[LabelDataplaneMode] == ModeNone {
				continue
			}
			if got := p.Annotations[AnnotRedirection]; got != state {
				bad = append(bad, fmt.Sprintf("%s=%q", p.Name, got))
			}
		}
		if len(bad) > 0 {
			return false, fmt.Errorf("redirection annotation not %q: %s", state, strings.Join(bad, ", "))
		}
		return true, nil
	})
}

// Driver drives load from a sample client pod (role client, GET /run)
// through a port-forward; the requests themselves leave the client pod, so
// they take the mesh's path.
type Driver struct {
	Namespace, Pod string
	addr           string
	stop           func()
	http           *http.Client
}

// NewDriver forwards to the client pod's port 9080.
func NewDriver(ctx context.Context, c *kube.Client, ns, pod string) (*Driver, error) {
	addr, stop, err := c.Forward(ctx, ns, pod, PortApp)
	if err != nil {
		return nil, err
	}
	return &Driver{Namespace: ns, Pod: pod, addr: addr, stop: stop, http: &http.Client{}}, nil
}

// Close ends the port-forward.
func (d *Driver) Close() { d.stop() }

// Run runs one load (see sample.ParseLoad for the query) and returns what
// the client measured.
func (d *Driver) Run(ctx context.Context, q url.Values) (sample.LoadResult, error) {
	var res sample.LoadResult
	u := "http://" + d.addr + "/run?" + q.Encode()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return res, err
	}
	resp, err := d.http.Do(req)
	if err != nil {
		return res, fmt.Errorf("client %s/%s /run: %w", d.Namespace, d.Pod, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 8<<20))
	if err != nil {
		return res, fmt.Errorf("client %s/%s /run: %w", d.Namespace, d.Pod, err)
	}
	if resp.StatusCode != http.StatusOK {
		return res, fmt.Errorf("client %s/%s /run?%s: %s: %s", d.Namespace, d.Pod, q.Encode(), resp.Status, strings.TrimSpace(string(body)))
	}
	if err := json.Unmarshal(body, &res); err != nil {
		return res, fmt.Errorf("client %s/%s /run: decode: %w", d.Namespace, d.Pod, err)
	}
	return res, nil
}

// Get is a short load: n requests to target, one at a time.
func (d *Driver) Get(ctx context.Context, target string, n int, headers ...string) (sample.LoadResult, error) {
	q := url.Values{"url": {target}, "n": {fmt.Sprint(n)}, "timeout": {"3s"}}
	for _, h := range headers {
		q.Add("h", h)
	}
	return d.Run(ctx, q)
}

// ErrNoAccessLog means no access-log line matched.
var ErrNoAccessLog = errors.New("no matching access log")
