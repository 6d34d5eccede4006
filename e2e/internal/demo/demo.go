// Package demo is `make demo`: on a running cluster it installs amesh from
// the manifests, deploys the bookinfo sample, enrols its namespace, puts a
// waypoint in front of it with `kubectl waypoint apply --enroll-namespace`,
// applies the 90/10 canary and the header route, drives traffic from the
// sample client and prints what a person wants to see: the SPIFFE
// identities on each hop, the measured split and the request metrics.
package demo

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/amesh-dev/amesh/e2e/internal/kube"
	"github.com/amesh-dev/amesh/e2e/internal/mesh"
	"github.com/amesh-dev/amesh/e2e/manifest"
	"github.com/amesh-dev/amesh/e2e/sample"
)

// Config of a demo run.
type Config struct {
	// Kubeconfig of the cluster (required).
	Kubeconfig string
	// Root is the repository root (manifests/ lives there).
	Root string
	// Env picks the overlays (local or kind).
	Env mesh.Env
	// KubectlWaypoint is the kubectl-waypoint plugin binary.
	KubectlWaypoint string
	// Requests is how many requests each traffic step drives.
	Requests int
	// Timeout bounds each wait.
	Timeout time.Duration
}

// Default fills unset fields.
func (c *Config) Default() {
	if c.Env == "" {
		c.Env = mesh.EnvLocal
	}
	if c.Requests == 0 {
		c.Requests = 400
	}
	if c.Timeout == 0 {
		c.Timeout = 3 * time.Minute
	}
}

// Validate checks the config.
func (c *Config) Validate() error {
	var errs []error
	if c.Kubeconfig == "" {
		errs = append(errs, errors.New("no kubeconfig"))
	}
	if _, err := os.Stat(filepath.Join(c.Root, manifest.DirBase, "kustomization.yaml")); err != nil {
		errs = append(errs, fmt.Errorf("root %q is not the repository root: %w", c.Root, err))
	}
	if c.Requests < 20 || c.Requests > 100000 {
		errs = append(errs, fmt.Errorf("requests %d: want 20-100000", c.Requests))
	}
	return errors.Join(errs...)
}

// Demo runs the demo.
type Demo struct {
	cfg   Config
	out   io.Writer
	c     *kube.Client
	start time.Time
	// problems collects what did not work, reported at the end.
	problems []string
}

// New returns a demo writing to out.
func New(cfg Config, out io.Writer) *Demo { return &Demo{cfg: cfg, out: out} }

const ns = manifest.SampleNamespace

func (d *Demo) step(f string, a ...any) {
	fmt.Fprintf(d.out, "\n\033[1m==> [%5.1fs] %s\033[0m\n", time.Since(d.start).Seconds(), fmt.Sprintf(f, a...))
}

func (d *Demo) say(f string, a ...any) { fmt.Fprintf(d.out, "    "+f+"\n", a...) }

func (d *Demo) problem(f string, a ...any) {
	msg := fmt.Sprintf(f, a...)
	d.problems = append(d.problems, msg)
	fmt.Fprintf(d.out, "    \033[33m! %s\033[0m\n", msg)
}

// Run runs every step; it returns an error when a step the rest depends
// on fails, and after the last step when any step did not work.
func (d *Demo) Run(ctx context.Context) error {
	d.start = time.Now()
	c, err := kube.Connect(d.cfg.Kubeconfig)
	if err != nil {
		return err
	}
	d.c = c
	nodes, err := c.Core.CoreV1().Nodes().List(ctx, metav1.ListOptions{})
	if err != nil {
		return fmt.Errorf("reach the cluster: %w", err)
	}
	d.step("cluster: %d nodes (%s)", len(nodes.Items), nodeNames(nodes.Items))

	d.step("installing amesh from %s (server-side apply)", d.cfg.Env.Overlay())
	if err := mesh.Install(ctx, c, d.cfg.Root, d.cfg.Env, func(s string) { d.say("%s", s) }); err != nil {
		return err
	}
	d.showSystem(ctx)

	d.step("deploying the bookinfo sample (%s)", d.cfg.Env.SampleOverlay())
	if err := d.deploySample(ctx); err != nil {
		return err
	}
	drv, err := d.driver(ctx)
	if err != nil {
		return err
	}
	defer drv.Close()
	page := fmt.Sprintf("http://productpage.%s:%d/productpage", ns, mesh.PortApp)
	// kube-proxy programs the new Services a moment after the pods are Ready.
	err = kube.Poll(ctx, time.Second, time.Minute, func(ctx context.Context) (bool, error) {
		r, err := drv.Get(ctx, page, 5)
		if err != nil {
			return false, err
		}
		if r.OK != 5 {
			return false, fmt.Errorf("%d of 5 OK: %v %v", r.OK, r.Codes, r.Errors)
		}
		return true, nil
	})
	if err != nil {
		return fmt.Errorf("bookinfo does not answer before enrolment: %w", err)
	}
	d.say("productpage answers (plain TCP, no mesh yet)")

	d.step("enrolling namespace %s: label %s=%s", ns, mesh.LabelDataplaneMode, mesh.ModeAmbient)
	if err := mesh.Enrol(ctx, c, ns, true); err != nil {
		return err
	}
	if err := mesh.WaitRedirection(ctx, c, ns, "", "enabled", d.cfg.Timeout); err != nil {
		return fmt.Errorf("pods not redirected: %w", err)
	}
	d.showRedirection(ctx)

	d.step("driving %d requests client → productpage → details, reviews → ratings (mTLS by ztunnel)", d.cfg.Requests/4)
	before, err := d.hopCounts(ctx)
	if err != nil {
		return err
	}
	r, err := drv.Run(ctx, url.Values{"url": {page}, "n": {fmt.Sprint(d.cfg.Requests / 4)}, "c": {"4"}, "newconn": {"true"}, "field": {"reviews.servedBy.version"}})
	if err != nil {
		return err
	}
	d.showLoad(r, "reviews.servedBy.version")
	if r.OK < r.Requests {
		d.problem("%d of %d requests failed after enrolment", r.Requests-r.OK, r.Requests)
	}
	d.say("(connections opened before enrolment, such as productpage's pooled ones, keep their direct path until they close; new ones go through ztunnel)")
	d.showHops(ctx, before, "L4 (ztunnel metrics)")

	d.step("creating a waypoint: kubectl waypoint apply -n %s --enroll-namespace", ns)
	if err := d.waypoint(ctx); err != nil {
		d.problem("waypoint: %v", err)
		return d.finish(fmt.Errorf("the waypoint did not come up: %w", err))
	}

	if err := d.restart(ctx, "productpage-v1"); err != nil {
		return d.finish(err)
	}

	d.step("HTTPRoute reviews: 90%% → v1, 10%% → v2 (%s)", "manifests/samples/bookinfo/routes/reviews-canary.yaml")
	if err := d.applyRoute(ctx, "reviews-canary.yaml"); err != nil {
		return d.finish(err)
	}
	if before, err = d.hopCounts(ctx); err != nil {
		return err
	}
	d.canary(ctx, drv, page)
	d.showHops(ctx, before, "through the waypoint (ztunnel metrics)")

	d.step("HTTPRoute reviews: end-user jason → v2, everyone else 90/10 (%s)", "reviews-header.yaml")
	if err := d.applyRoute(ctx, "reviews-header.yaml"); err != nil {
		return d.finish(err)
	}
	d.header(ctx, drv, page)

	d.step("waypoint metrics: istio_requests_total")
	d.showRequestMetrics(ctx)
	return d.finish(nil)
}

func (d *Demo) finish(err error) error {
	d.step("done in %.0fs", time.Since(d.start).Seconds())
	d.say("the cluster keeps running; try it:")
	d.say("  export KUBECONFIG=%s", d.cfg.Kubeconfig)
	d.say("  kubectl -n %s get pods,svc,gateway,httproute", ns)
	d.say("  kubectl -n %s port-forward deploy/client 9080 &", ns)
	d.say("  curl 'localhost:9080/run?url=http://productpage:9080/productpage&n=100&field=reviews.servedBy.version'")
	d.say("  make demo-down   # removes the cluster and everything in it")
	if len(d.problems) > 0 {
		fmt.Fprintf(d.out, "\n\033[33m%d step(s) did not work:\033[0m\n", len(d.problems))
		for _, p := range d.problems {
			fmt.Fprintf(d.out, "  - %s\n", p)
		}
		if err == nil {
			err = fmt.Errorf("%d demo step(s) did not work", len(d.problems))
		}
	}
	return err
}

func nodeNames(items []corev1.Node) string {
	var n []string
	for _, i := range items {
		n = append(n, i.Name)
	}
	return strings.Join(n, ", ")
}

func (d *Demo) showSystem(ctx context.Context) {
	pods, err := d.c.Pods(ctx, mesh.SystemNamespace, "")
	if err != nil {
		d.problem("%v", err)
		return
	}
	tw := tabwriter.NewWriter(d.out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "    POD\tNODE\tREADY")
	for _, p := range pods {
		fmt.Fprintf(tw, "    %s\t%s\t%t\n", p.Name, p.Spec.NodeName, kube.Ready(&p))
	}
	tw.Flush()
}

func (d *Demo) deploySample(ctx context.Context) error {
	// A fresh start: an earlier run's namespace (enrolled, with a
	// waypoint and routes) goes first.
	if _, err := d.c.Core.CoreV1().Namespaces().Get(ctx, ns, metav1.GetOptions{}); err == nil {
		d.say("removing the namespace %s of an earlier run", ns)
		if err := d.c.DeleteNamespace(ctx, ns, d.cfg.Timeout); err != nil {
			return err
		}
	}
	objs, err := mesh.RenderSample(d.cfg.Root, d.cfg.Env)
	if err != nil {
		return err
	}
	if err := d.c.Apply(ctx, objs...); err != nil {
		return err
	}
	var deps []string
	for _, o := range objs {
		if o.GetKind() == "Deployment" {
			deps = append(deps, o.GetName())
		}
	}
	sort.Strings(deps)
	for _, name := range deps {
		if err := d.c.WaitDeployment(ctx, ns, name, d.cfg.Timeout); err != nil {
			return err
		}
	}
	d.say("%d deployments ready: %s", len(deps), strings.Join(deps, ", "))
	return nil
}

func (d *Demo) driver(ctx context.Context) (*mesh.Driver, error) {
	p, err := d.c.Pod(ctx, ns, "app=client")
	if err != nil {
		return nil, err
	}
	return mesh.NewDriver(ctx, d.c, ns, p.Name)
}

func (d *Demo) showRedirection(ctx context.Context) {
	pods, err := d.c.Pods(ctx, ns, "")
	if err != nil {
		d.problem("%v", err)
		return
	}
	tw := tabwriter.NewWriter(d.out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "    POD\tNODE\tIP\tREDIRECTION\tIDENTITY")
	for _, p := range pods {
		fmt.Fprintf(tw, "    %s\t%s\t%s\t%s\t%s\n", p.Name, p.Spec.NodeName, p.Status.PodIP,
			p.Annotations[mesh.AnnotRedirection], mesh.Identity(ns, p.Spec.ServiceAccountName))
	}
	tw.Flush()
}

func (d *Demo) showLoad(r sample.LoadResult, field string) {
	d.say("%d requests: %d OK, codes %v, latency p50 %.1fms p99 %.1fms", r.Requests, r.OK, r.Codes, r.LatencyMs.P50, r.LatencyMs.P99)
	if vs := r.Fields[field]; len(vs) > 0 {
		var keys []string
		total := int64(0)
		for k, n := range vs {
			keys = append(keys, k)
			total += n
		}
		sort.Strings(keys)
		for _, k := range keys {
			d.say("  %s = %-4s %5d  %5.1f%%  %s", field, k, vs[k], 100*float64(vs[k])/float64(total), bar(vs[k], total))
		}
	}
}

func bar(n, total int64) string {
	if total == 0 {
		return ""
	}
	return strings.Repeat("█", int(40*n/total))
}

// hopKey is one hop as ztunnel reports it.
type hopKey struct{ src, dst, security string }

// hopCounts reads every ztunnel's istio_tcp_connections_opened_total for
// the sample namespace, per hop and reporter.
func (d *Demo) hopCounts(ctx context.Context) (map[string]map[hopKey]float64, error) {
	ms, err := mesh.ScrapeAll(ctx, d.c, mesh.SystemNamespace, "app=ztunnel", mesh.PortMetrics)
	if err != nil {
		return nil, err
	}
	out := map[string]map[hopKey]float64{"source": {}, "destination": {}}
	for _, m := range ms {
		for _, s := range m.Series("istio_tcp_connections_opened_total", nil) {
			l := s.Labels
			if l["destination_workload_namespace"] != ns && l["source_workload_namespace"] != ns {
				continue
			}
			if r := out[l["reporter"]]; r != nil {
				r[hopKey{l["source_principal"], l["destination_principal"], l["connection_security_policy"]}] += s.Value
			}
		}
	}
	return out, nil
}

// showHops prints the hops that opened connections since before (a
// hopCounts snapshot): each with the SPIFFE identities of both ends, as
// the ztunnels at either end verified them.
func (d *Demo) showHops(ctx context.Context, before map[string]map[hopKey]float64, title string) {
	after, err := d.hopCounts(ctx)
	if err != nil {
		d.problem("ztunnel metrics: %v", err)
		return
	}
	hops := map[hopKey]float64{}
	for rep, m := range after {
		for k, v := range m {
			if dv := v - before[rep][k]; dv > hops[k] {
				hops[k] = dv
			}
		}
	}
	keys := make([]hopKey, 0, len(hops))
	for k, v := range hops {
		if v > 0 {
			keys = append(keys, k)
		}
	}
	sort.Slice(keys, func(i, j int) bool {
		if keys[i].src != keys[j].src {
			return keys[i].src < keys[j].src
		}
		return keys[i].dst < keys[j].dst
	})
	d.say("%s — every hop with the SPIFFE identities of both ends:", title)
	tw := tabwriter.NewWriter(d.out, 0, 4, 1, ' ', 0)
	for _, k := range keys {
		dst := short(k.dst)
		if k.dst == "unknown" && k.security == "mutual_tls" {
			// ztunnel labels no destination for HBONE to a waypoint.
			dst = "(the waypoint)"
		}
		fmt.Fprintf(tw, "      %s\t→ %s\t%s\t%.0f new connections\n", short(k.src), dst, k.security, hops[k])
	}
	tw.Flush()
	if len(keys) == 0 {
		d.problem("ztunnel reports no connections for %s", ns)
	}
}

func short(id string) string {
	if id == "" {
		return "(none)"
	}
	return id
}

func (d *Demo) waypoint(ctx context.Context) error {
	args := []string{"apply", "-n", ns, "--enroll-namespace", "--wait", "--timeout", "120s", "--kubeconfig", d.cfg.Kubeconfig}
	if _, err := os.Stat(d.cfg.KubectlWaypoint); err == nil {
		d.say("$ kubectl waypoint %s", strings.Join(args[:4], " "))
		cmd := exec.CommandContext(ctx, d.cfg.KubectlWaypoint, args...)
		cmd.Stdout, cmd.Stderr = indent{d.out}, indent{d.out}
		if err := cmd.Run(); err != nil {
			return fmt.Errorf("kubectl waypoint apply: %w", err)
		}
	} else {
		d.problem("%s is not built (controller/cmd/kubectl-waypoint); applying the Gateway it would create and labelling the namespace directly", d.cfg.KubectlWaypoint)
		err := d.c.ApplyYAML(ctx, `apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata:
  name: waypoint
  namespace: %s
spec:
  gatewayClassName: %s
  listeners:
  - name: mesh
    port: 15008
    protocol: HBONE
`, ns, mesh.WaypointClass)
		if err != nil {
			return err
		}
		if err := d.c.Label(ctx, "namespaces", "", ns, mesh.LabelUseWaypoint, "waypoint"); err != nil {
			return err
		}
	}
	pods, err := d.c.WaitPods(ctx, ns, "gateway.networking.k8s.io/gateway-name=waypoint", 1, d.cfg.Timeout)
	if err != nil {
		return fmt.Errorf("waypoint pod: %w", err)
	}
	d.say("waypoint %s/%s runs on %s as %s", ns, pods[0].Name, pods[0].Spec.NodeName, mesh.Identity(ns, pods[0].Spec.ServiceAccountName))
	return nil
}

// restart restarts a Deployment (as kubectl rollout restart) and waits:
// connections that exist keep the path they had; the waypoint takes the
// ones opened after it is in place, so productpage's pooled connections to
// reviews are renewed this way.
func (d *Demo) restart(ctx context.Context, name string) error {
	d.say("restarting %s: its pooled connections to reviews predate the waypoint and keep their direct path", name)
	patch := fmt.Sprintf(`{"spec":{"template":{"metadata":{"annotations":{"amesh.dev/restarted-at":%q}}}}}`, time.Now().Format(time.RFC3339Nano))
	_, err := d.c.Core.AppsV1().Deployments(ns).Patch(ctx, name, types.StrategicMergePatchType, []byte(patch), metav1.PatchOptions{})
	if err != nil {
		return fmt.Errorf("restart %s: %w", name, err)
	}
	if err := d.c.WaitDeployment(ctx, ns, name, d.cfg.Timeout); err != nil {
		return err
	}
	return mesh.WaitRedirection(ctx, d.c, ns, "", "enabled", d.cfg.Timeout)
}

type indent struct{ w io.Writer }

func (i indent) Write(p []byte) (int, error) {
	s := strings.TrimRight(string(p), "\n")
	_, err := fmt.Fprintf(i.w, "      %s\n", strings.ReplaceAll(s, "\n", "\n      "))
	return len(p), err
}

func (d *Demo) applyRoute(ctx context.Context, file string) error {
	objs, err := manifest.ReadFile(filepath.Join(d.cfg.Root, manifest.DirSampleRoutes, file))
	if err != nil {
		return err
	}
	if err := d.c.Apply(ctx, objs...); err != nil {
		return err
	}
	// The controller reports the route Accepted once the waypoint serves it.
	if err := mesh.WaitRouteAccepted(ctx, d.c, ns, "reviews", 30*time.Second); err != nil {
		d.problem("route %s not reported Accepted: %v", file, err)
	}
	return nil
}

func (d *Demo) canary(ctx context.Context, drv *mesh.Driver, page string) {
	n := d.cfg.Requests
	r, err := drv.Run(ctx, url.Values{"url": {page}, "n": {fmt.Sprint(n)}, "c": {"8"}, "field": {"reviews.servedBy.version"}})
	if err != nil {
		d.problem("%v", err)
		return
	}
	d.showLoad(r, "reviews.servedBy.version")
	v2 := r.Fields["reviews.servedBy.version"]["v2"]
	share := float64(v2) / float64(max(r.OK, 1))
	// 10% of n requests: 3 standard deviations of a binomial.
	sd := 3 * math.Sqrt(0.1*0.9/float64(max(r.OK, 1)))
	if r.OK != int64(n) || share < 0.1-sd || share > 0.1+sd {
		d.problem("measured split %.1f%% to v2, want 10%% ± %.1f%% with every request OK", 100*share, 100*sd)
	} else {
		d.say("measured %.1f%% to v2: within 10%% ± %.1f%% (3σ for %d requests)", 100*share, 100*sd, r.OK)
	}
}

func (d *Demo) header(ctx context.Context, drv *mesh.Driver, page string) {
	n := d.cfg.Requests / 4
	r, err := drv.Run(ctx, url.Values{"url": {page}, "n": {fmt.Sprint(n)}, "c": {"4"}, "h": {"end-user: jason"}, "field": {"reviews.servedBy.version"}})
	if err != nil {
		d.problem("%v", err)
		return
	}
	d.say("as end-user jason:")
	d.showLoad(r, "reviews.servedBy.version")
	if v2 := r.Fields["reviews.servedBy.version"]["v2"]; v2 != int64(n) {
		d.problem("jason got v2 in %d of %d requests, want all", v2, n)
	}
}

func (d *Demo) showRequestMetrics(ctx context.Context) {
	ms, err := mesh.ScrapeAll(ctx, d.c, ns, "gateway.networking.k8s.io/gateway-name=waypoint", mesh.PortMetrics)
	if err != nil {
		d.problem("waypoint metrics: %v", err)
		return
	}
	type row struct {
		src, dst, ver, code, principal, sec string
		n                                   float64
	}
	var rows []row
	for _, m := range ms {
		for _, s := range m.Series("istio_requests_total", nil) {
			l := s.Labels
			rows = append(rows, row{l["source_workload"], l["destination_service_name"], l["destination_version"], l["response_code"], l["source_principal"], l["connection_security_policy"], s.Value})
		}
	}
	if len(rows) == 0 {
		d.problem("the waypoint reports no istio_requests_total")
		return
	}
	sort.Slice(rows, func(i, j int) bool { return rows[i].n > rows[j].n })
	tw := tabwriter.NewWriter(d.out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "    SOURCE\tSOURCE PRINCIPAL\tDESTINATION\tVERSION\tCODE\tSECURITY\tREQUESTS")
	for _, r := range rows {
		fmt.Fprintf(tw, "    %s\t%s\t%s\t%s\t%s\t%s\t%.0f\n", r.src, r.principal, r.dst, r.ver, r.code, r.sec, r.n)
	}
	tw.Flush()
}
