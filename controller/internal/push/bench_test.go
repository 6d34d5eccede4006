package push

import (
	"bufio"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"runtime"
	"runtime/metrics"
	"runtime/pprof"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/intstr"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/amesh-dev/amesh/api/ca"
	pb "github.com/amesh-dev/amesh/api/discovery/v1"
	"github.com/amesh-dev/amesh/api/xds"
	"github.com/amesh-dev/amesh/api/xds/xdsclient"
	securityv1alpha1 "github.com/amesh-dev/amesh/controller/apis/security/v1alpha1"
	"github.com/amesh-dev/amesh/controller/internal/label"
)

// Issue 3 targets.
const (
	targetFullPush = 2 * time.Second
	targetP99      = 100 * time.Millisecond
	targetHeapMiB  = 500
)

// BenchmarkPush measures the controller's push path end to end: objects
// as the informers hold them → translation → xDS server → 100 real xDS
// clients over gRPC/TLS on loopback, running in a separate process so that
// the heap measured is the controller's alone. It reports the full push
// (every subscriber holds every resource), the latency of an incremental
// pod update until every subscriber has it (p50/p99 over many updates;
// debounce not included), the controller's CPU time for both, and its
// live heap after the full push and the peak during it, for the issue's
// scale (10,000 pods / 1,000 services) next to a tenth of it as the
// baseline. Each size runs twice: with the server's default response
// bounds (responses=split: a push of more than 1,000 resources or 1 MiB
// travels as several responses) and, as the baseline, with one response
// per type and push (responses=whole). Run with -benchtime=1x: each
// scenario runs once.
func BenchmarkPush(b *testing.B) {
	for _, sz := range []struct{ pods, services, subs, updates int }{
		{1000, 100, 100, 200},
		{10000, 1000, 100, 200},
	} {
		for _, split := range []bool{false, true} {
			name := fmt.Sprintf("pods=%d/services=%d/subscribers=%d/responses=whole", sz.pods, sz.services, sz.subs)
			opts := xds.ServerOptions{MaxResponseResources: -1, MaxResponseBytes: -1}
			if split {
				name = strings.TrimSuffix(name, "whole") + "split"
				opts = xds.ServerOptions{}
			}
			benchPush(b, name, opts, sz.pods, sz.services, sz.subs, sz.updates)
		}
	}
}

// benchPush runs one scenario and reports its numbers; the heap target is
// checked on the peak (the live heap after the push is far lower).
func benchPush(b *testing.B, name string, opts xds.ServerOptions, pods, services, subs, updates int) {
	b.Run(name, func(b *testing.B) {
		for b.Loop() {
			r := runPushScenario(b, opts, pods, services, subs, updates)
			b.ReportMetric(r.full.Seconds(), "full-push-s")
			b.ReportMetric(float64(r.p50.Microseconds())/1000, "incr-p50-ms")
			b.ReportMetric(float64(r.p99.Microseconds())/1000, "incr-p99-ms")
			b.ReportMetric(float64(r.heap)/(1<<20), "heap-MiB")
			b.ReportMetric(float64(r.peak)/(1<<20), "peak-heap-MiB")
			b.ReportMetric(r.fullCPU.Seconds(), "full-push-cpu-s")
			b.ReportMetric(r.subscribersCPU.Seconds(), "subscribers-cpu-s")
			b.ReportMetric(float64(r.incrCPU.Microseconds())/1000, "incr-cpu-ms")
			if pods == 10000 && (r.full > targetFullPush || r.p99 > targetP99 || r.peak > targetHeapMiB<<20) {
				b.Logf("over target: full %v (≤ %v), p99 %v (≤ %v), peak heap %d MiB (≤ %d)",
					r.full, targetFullPush, r.p99, targetP99, r.peak>>20, targetHeapMiB)
			}
		}
	})
}

type pushResult struct {
	full, p50, p99 time.Duration
	// CPU time (user+system) of the controller side.
	fullCPU, incrCPU time.Duration
	// CPU time of the subscriber process for the full push.
	subscribersCPU time.Duration
	heap, peak     uint64
}

// cpuTime is this process's CPU time so far.
func cpuTime() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// samplePeakHeap records the largest heap (live and not yet collected
// objects) seen every 5ms until the returned function is called.
func samplePeakHeap(peak *uint64) (stop func()) {
	done := make(chan struct{})
	var wg sync.WaitGroup
	wg.Go(func() {
		s := []metrics.Sample{{Name: "/memory/classes/heap/objects:bytes"}}
		t := time.NewTicker(5 * time.Millisecond)
		defer t.Stop()
		for {
			metrics.Read(s)
			*peak = max(*peak, s[0].Value.Uint64())
			select {
			case <-done:
				return
			case <-t.C:
			}
		}
	})
	return func() {
		close(done)
		wg.Wait()
	}
}

func runPushScenario(b *testing.B, opts xds.ServerOptions, pods, services, subs, updates int) pushResult {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()

	// TLS as in production: a serving certificate from the mesh CA.
	authority, err := ca.NewRoot(spiffeid.RequireTrustDomainFromString("cluster.local"), time.Hour)
	if err != nil {
		b.Fatal(err)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		b.Fatal(err)
	}
	chain, err := authority.SignServer(key.Public(), []string{"amesh-controller.amesh-system.svc"}, time.Hour)
	if err != nil {
		b.Fatal(err)
	}
	cert := tls.Certificate{PrivateKey: key, Leaf: chain[0], Certificate: [][]byte{chain[0].Raw}}
	opts.Authenticate = func(_ context.Context, node *corev3.Node) (xds.Subscriber, error) {
		return NewSubscriber(node.GetId(), ""), nil
	}
	srv := xds.NewServer(opts)
	gs := grpc.NewServer(grpc.Creds(credentials.NewTLS(&tls.Config{Certificates: []tls.Certificate{cert}})), xds.Codec())
	srv.Register(gs)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	var serveWG sync.WaitGroup
	serveWG.Go(func() { _ = gs.Serve(lis) })
	defer func() {
		gs.Stop()
		serveWG.Wait()
	}()

	l := New(Options{Publisher: srv, Roots: func() []string { return []string{string(authority.RootsPEM())} }})
	objs := scaleObjects(pods, services)
	for _, o := range objs.all {
		l.store.put(o)
	}
	target := objs.pods[0]

	// The subscribers, in another process.
	cmd := exec.CommandContext(ctx, os.Args[0], "-test.run=^TestSubscriberProcess$", "-test.v")
	cmd.Env = append(os.Environ(),
		"AMESH_BENCH_ADDR="+lis.Addr().String(),
		"AMESH_BENCH_ROOT="+string(authority.RootsPEM()),
		"AMESH_BENCH_CLIENTS="+strconv.Itoa(subs),
		"AMESH_BENCH_WORKLOADS="+strconv.Itoa(pods),
		"AMESH_BENCH_TARGET="+string(target.UID),
	)
	out, err := cmd.StdoutPipe()
	if err != nil {
		b.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		b.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	defer func() {
		_ = stdin.Close() // the child exits when its stdin closes
		_ = cmd.Wait()
	}()
	lines := make(chan string, 64)
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			if t, ok := strings.CutPrefix(sc.Text(), "EVENT "); ok {
				lines <- t
			}
		}
		close(lines)
	}()
	// await waits for an event line starting with want and returns the
	// rest of it.
	await := func(want string, d time.Duration) string {
		b.Helper()
		timer := time.NewTimer(d)
		defer timer.Stop()
		for {
			select {
			case l, ok := <-lines:
				if !ok {
					b.Fatalf("subscriber process ended before %q", want)
				}
				if rest, ok := strings.CutPrefix(l, want); ok && (rest == "" || rest[0] == ' ') {
					return strings.TrimSpace(rest)
				}
			case <-timer.C:
				b.Fatalf("no %q within %v", want, d)
			}
		}
	}
	var connectCPU time.Duration
	if rest := await("connected", 60*time.Second); rest != "" {
		var ns int64
		if _, err := fmt.Sscanf(rest, "cpu=%d", &ns); err != nil {
			b.Fatal(err)
		}
		connectCPU = time.Duration(ns)
	}

	var r pushResult
	stopPeak := samplePeakHeap(&r.peak)
	cpu0 := cpuTime()
	if path := os.Getenv("AMESH_BENCH_CPUPROFILE"); path != "" {
		f, err := os.Create(path)
		if err != nil {
			b.Fatal(err)
		}
		if err := pprof.StartCPUProfile(f); err != nil {
			b.Fatal(err)
		}
		defer f.Close()
	}
	start := time.Now()
	if !l.publish() {
		b.Fatal("publish failed")
	}
	var childCPU int64
	if _, err := fmt.Sscanf(await("synced", 60*time.Second), "cpu=%d", &childCPU); err != nil {
		b.Fatal(err)
	}
	r.full = time.Since(start)
	r.subscribersCPU = time.Duration(childCPU) - connectCPU
	r.fullCPU = cpuTime() - cpu0
	if os.Getenv("AMESH_BENCH_CPUPROFILE") != "" {
		pprof.StopCPUProfile()
	}
	stopPeak()

	// Twice: buffers parked in sync.Pools survive one collection.
	runtime.GC()
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	r.heap = ms.HeapAlloc
	if path := os.Getenv("AMESH_BENCH_HEAPPROFILE"); path != "" {
		f, err := os.Create(path)
		if err != nil {
			b.Fatal(err)
		}
		if err := pprof.WriteHeapProfile(f); err != nil {
			b.Fatal(err)
		}
		f.Close()
	}

	lat := make([]time.Duration, 0, updates)
	cpu0 = cpuTime()
	for i := range updates {
		p := target.DeepCopy()
		p.Labels["version"] = fmt.Sprintf("v%d", i+1)
		l.store.put(p)
		t0 := time.Now()
		if !l.publish() {
			b.Fatal("publish failed")
		}
		await(fmt.Sprintf("rev v%d", i+1), 10*time.Second)
		lat = append(lat, time.Since(t0))
	}
	r.incrCPU = (cpuTime() - cpu0) / time.Duration(updates)
	slices.Sort(lat)
	r.p50 = lat[len(lat)/2]
	r.p99 = lat[(len(lat)*99+99)/100-1]
	return r
}

// TestSubscriberProcess is the subscriber side of BenchmarkPush, run in a
// child process; it does nothing in a normal test run.
func TestSubscriberProcess(t *testing.T) {
	addr := os.Getenv("AMESH_BENCH_ADDR")
	if addr == "" {
		t.Skip("only run by BenchmarkPush")
	}
	if path := os.Getenv("AMESH_BENCH_SUBSCRIBER_CPUPROFILE"); path != "" {
		f, err := os.Create(path)
		if err != nil {
			t.Fatal(err)
		}
		if err := pprof.StartCPUProfile(f); err != nil {
			t.Fatal(err)
		}
		defer func() {
			pprof.StopCPUProfile()
			f.Close()
		}()
	}
	n, _ := strconv.Atoi(os.Getenv("AMESH_BENCH_CLIENTS"))
	want, _ := strconv.Atoi(os.Getenv("AMESH_BENCH_WORKLOADS"))
	target := os.Getenv("AMESH_BENCH_TARGET")
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM([]byte(os.Getenv("AMESH_BENCH_ROOT"))) {
		t.Fatal("no root")
	}
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{
		RootCAs: roots, ServerName: "amesh-controller.amesh-system.svc",
	})))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()

	var (
		mu      sync.Mutex
		synced  int
		revSeen = map[string]int{}
		stdout  = bufio.NewWriter(os.Stdout)
	)
	emit := func(s string) {
		fmt.Fprintf(stdout, "EVENT %s\n", s)
		_ = stdout.Flush()
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var wg sync.WaitGroup
	var connected atomic.Int32
	for i := range n {
		held := map[string]bool{}
		done := false
		h := xdsclient.HandlerFunc(func(typeURL string, upserts []*xds.Resource, removes []string) error {
			if typeURL != pb.WorkloadType {
				return nil
			}
			for _, r := range upserts {
				held[r.Name] = true
				if r.Name == target {
					rev := r.Body.(*pb.Workload).CanonicalRevision
					mu.Lock()
					revSeen[rev]++
					if revSeen[rev] == n {
						emit("rev " + rev)
						delete(revSeen, rev)
					}
					mu.Unlock()
				}
			}
			for _, name := range removes {
				delete(held, name)
			}
			if !done && len(held) >= want {
				done = true
				mu.Lock()
				synced++
				if synced == n {
					emit(fmt.Sprintf("synced cpu=%d", cpuTime()))
				}
				mu.Unlock()
			}
			return nil
		})
		c := xdsclient.New(xdsclient.Options{
			Conn:     conn,
			Node:     &xdsclient.Node{ID: fmt.Sprintf("bench-%d", i)},
			TypeURLs: []string{pb.WorkloadType, pb.ServiceType, pb.AuthorizationType, pb.TrustBundleType},
			Handler:  h,
		})
		wg.Go(func() { _ = c.Run(ctx) })
		if connected.Add(1) == int32(n) {
			emit(fmt.Sprintf("connected cpu=%d", cpuTime()))
		}
	}
	// Run until the parent closes our stdin.
	_, _ = io.Copy(io.Discard, os.Stdin)
	cancel()
	wg.Wait()
}

// scaleObjects builds a mesh: 50 enrolled namespaces, services each
// selecting pods/services pods through a named target port, one ALLOW
// policy per service.
func scaleObjects(pods, services int) (out struct {
	all  []client.Object
	pods []*corev1.Pod
}) {
	const namespaces = 50
	isController := true
	for n := range namespaces {
		out.all = append(out.all, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{
			Name: fmt.Sprintf("team-%d", n), Labels: map[string]string{label.DataplaneMode: label.DataplaneModeAmbient},
		}})
	}
	for s := range services {
		ns, app := fmt.Sprintf("team-%d", s%namespaces), fmt.Sprintf("app-%d", s)
		out.all = append(out.all, &corev1.Service{
			ObjectMeta: metav1.ObjectMeta{Name: app, Namespace: ns},
			Spec: corev1.ServiceSpec{
				Selector:  map[string]string{"app": app},
				ClusterIP: fmt.Sprintf("10.96.%d.%d", s/250, s%250+1),
				Ports:     []corev1.ServicePort{{Name: "http", Port: 80, TargetPort: intstr.FromString("http")}},
			},
		}, &securityv1alpha1.AuthorizationPolicy{
			ObjectMeta: metav1.ObjectMeta{Name: app, Namespace: ns},
			Spec: securityv1alpha1.AuthorizationPolicySpec{
				Selector: &securityv1alpha1.WorkloadSelector{MatchLabels: map[string]string{"app": app}},
				Rules: []securityv1alpha1.Rule{{From: []securityv1alpha1.RuleFrom{{Source: securityv1alpha1.Source{
					Principals: []string{"cluster.local/ns/" + ns + "/sa/client"},
				}}}}},
			},
		})
	}
	for p := range pods {
		s := p % services
		pod := &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{
				Name:      fmt.Sprintf("app-%d-7d9f8c6b5-%05d", s, p),
				Namespace: fmt.Sprintf("team-%d", s%namespaces),
				UID:       types.UID(fmt.Sprintf("0b6f8a9e-%04x-4c1d-9f1e-%012x", p%65536, p)),
				Labels:    map[string]string{"app": fmt.Sprintf("app-%d", s), "version": "v0", "pod-template-hash": "7d9f8c6b5"},
				Annotations: map[string]string{
					label.Redirection: label.RedirectionEnabled,
				},
				OwnerReferences: []metav1.OwnerReference{{
					APIVersion: "apps/v1", Kind: "ReplicaSet", Name: fmt.Sprintf("app-%d-7d9f8c6b5", s),
					UID: "rs", Controller: &isController,
				}},
			},
			Spec: corev1.PodSpec{
				NodeName:           fmt.Sprintf("node-%d", p%100),
				ServiceAccountName: fmt.Sprintf("app-%d", s),
				Containers: []corev1.Container{{Name: "app", Image: "registry.example/app:1.0", Ports: []corev1.ContainerPort{
					{Name: "http", ContainerPort: 8080},
				}}},
			},
			Status: corev1.PodStatus{
				Phase:      corev1.PodRunning,
				PodIP:      fmt.Sprintf("10.%d.%d.%d", 1+p/65536, (p/256)%256, p%256),
				PodIPs:     []corev1.PodIP{{IP: fmt.Sprintf("10.%d.%d.%d", 1+p/65536, (p/256)%256, p%256)}},
				Conditions: []corev1.PodCondition{{Type: corev1.PodReady, Status: corev1.ConditionTrue}},
			},
		}
		out.all = append(out.all, pod)
		out.pods = append(out.pods, pod)
	}
	return out
}
