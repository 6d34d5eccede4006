package bench

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"regexp"
	"runtime"
	"runtime/metrics"
	"runtime/pprof"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/amesh-dev/amesh/api/ca"
	discoveryv1 "github.com/amesh-dev/amesh/api/discovery/v1"
	"github.com/amesh-dev/amesh/api/hbone"
	"github.com/amesh-dev/amesh/api/identity"
	"github.com/amesh-dev/amesh/waypoint/internal/catalog"
	"github.com/amesh-dev/amesh/waypoint/internal/proxy"
	"github.com/amesh-dev/amesh/waypoint/internal/telemetry"
	"github.com/amesh-dev/amesh/waypoint/internal/tunnel"
	"github.com/amesh-dev/amesh/waypoint/internal/upstream"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"go.uber.org/zap"
	"google.golang.org/protobuf/proto"
)

const (
	childEnv      = "WAYPOINT_BENCH_CHILD"
	childHBONEEnv = "WAYPOINT_BENCH_HBONE_DIR"
	// childUpstreamEnv, with childHBONEEnv, makes the waypoint child reach
	// the backend over HBONE through the stand-in ztunnel at this address.
	childUpstreamEnv = "WAYPOINT_BENCH_UPSTREAM_HBONE"
	// ztunnelEnv runs the child as the destination's stand-in ztunnel in
	// front of this backend (credentials in childHBONEEnv's directory).
	ztunnelEnv = "WAYPOINT_BENCH_ZTUNNEL"
	// upstreamHBONEMark follows the address a waypoint child prints when
	// its upstream leg is HBONE, so that a baseline binary that predates
	// the mode (and would dial the backend in plain TCP) is not mistaken
	// for one.
	upstreamHBONEMark = " upstream=hbone"
)

func TestMain(m *testing.M) {
	if backend := os.Getenv(ztunnelEnv); backend != "" {
		if err := ztunnel(backend, os.Getenv(childHBONEEnv)); err != nil {
			fmt.Fprintln(os.Stderr, "bench ztunnel:", err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	if backend := os.Getenv(childEnv); backend != "" {
		if err := child(backend); err != nil {
			fmt.Fprintln(os.Stderr, "bench child:", err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// benchTD is the trust domain of the benchmark's identities.
var benchTD = spiffeid.RequireTrustDomainFromString("cluster.local")

// loadCredentials reads name.pem, name-key.pem and roots.pem from dir.
func loadCredentials(dir, name string) (*tls.Certificate, *identity.Bundle, error) {
	cert, err := tls.LoadX509KeyPair(filepath.Join(dir, name+".pem"), filepath.Join(dir, name+"-key.pem"))
	if err != nil {
		return nil, nil, err
	}
	roots, err := os.ReadFile(filepath.Join(dir, "roots.pem"))
	if err != nil {
		return nil, nil, err
	}
	bundle := identity.NewBundle()
	if err := bundle.SetPEM(benchTD, roots); err != nil {
		return nil, nil, err
	}
	return &cert, bundle, nil
}

// ztunnel stands in for the destination pod's ztunnel (DESIGN.md §4
// "Inbound"): an HBONE server with the destination workload's identity
// that refuses any authority but the backend's, connects to the backend
// before answering 200 and splices. It leaves out what the real one adds
// per connection (L4 authorization, IP_TRANSPARENT, metrics, access log),
// so its CPU is a lower bound of ztunnel's. It prints its address and
// serves until stdin closes.
func ztunnel(backend, dir string) error {
	bap, err := netip.ParseAddrPort(backend)
	if err != nil {
		return err
	}
	cert, bundle, err := loadCredentials(dir, "ztunnel")
	if err != nil {
		return err
	}
	ctx, cancel := signal.NotifyContext(context.Background(), syscall.SIGTERM)
	defer cancel()
	go func() { _, _ = io.Copy(io.Discard, os.Stdin); cancel() }()
	var d net.Dialer
	hs := hbone.NewServer(hbone.ServerConfig{
		Certificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) { return cert, nil },
		Bundle:      bundle, TrustDomain: benchTD,
		Handler: func(ctx context.Context, r *hbone.Request) (func(net.Conn), error) {
			if r.Authority != bap {
				return nil, fmt.Errorf("%w: %s", hbone.ErrBadTarget, r.Authority)
			}
			app, err := d.DialContext(ctx, "tcp", backend)
			if err != nil {
				return nil, fmt.Errorf("%w: %w", hbone.ErrUnreachable, err)
			}
			return func(stream net.Conn) {
				_, _, _ = hbone.Splice(stream, app)
				app.Close()
			}, nil
		},
	})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	fmt.Println(ln.Addr().String())
	return hs.Serve(ctx, ln)
}

// child runs the waypoint's L7 path (tunnel server, proxy with metrics,
// JSON access log and trace propagation) in its own process, in front of
// backend. Without childHBONEEnv each accepted TCP connection stands for
// one tunnel; with it the child terminates HBONE with the waypoint's
// identity. Its upstream leg is plain TCP to the backend, or, with
// childUpstreamEnv, HBONE with the waypoint's identity to the stand-in
// ztunnel there, as dialEndpoint in internal/app does for a workload in
// the mesh. It prints its address and serves until stdin closes.
func child(backend string) error {
	bap, err := netip.ParseAddrPort(backend)
	if err != nil {
		return err
	}
	dir, upstreamZtunnel := os.Getenv(childHBONEEnv), os.Getenv(childUpstreamEnv)
	var (
		cert   *tls.Certificate
		bundle *identity.Bundle
	)
	if dir != "" {
		if cert, bundle, err = loadCredentials(dir, "waypoint"); err != nil {
			return err
		}
	}
	var d net.Dialer
	dial := func(ctx context.Context, ep *upstream.Endpoint) (net.Conn, error) {
		return d.DialContext(ctx, "tcp", ep.Addr.String())
	}
	tunnelProtocol := discoveryv1.TunnelProtocol_TUNNEL_PROTOCOL_NONE
	if upstreamZtunnel != "" {
		if cert == nil {
			return fmt.Errorf("%s needs %s", childUpstreamEnv, childHBONEEnv)
		}
		ztAddr, err := netip.ParseAddrPort(upstreamZtunnel)
		if err != nil {
			return err
		}
		self, err := identity.ID(benchTD.Name(), "default", "waypoint")
		if err != nil {
			return err
		}
		hc := hbone.NewClient(hbone.ClientConfig{
			Certificates: func(context.Context, spiffeid.ID) (*tls.Certificate, error) { return cert, nil },
			Bundle:       bundle,
		})
		defer hc.Close()
		// As App.dialEndpoint, with the stand-in ztunnel's port for 15008
		// (it shares the workload's address, 127.0.0.1).
		dial = func(ctx context.Context, ep *upstream.Endpoint) (net.Conn, error) {
			if !ep.HBONE {
				return nil, fmt.Errorf("endpoint %s is not in the mesh", ep.Addr)
			}
			want, err := spiffeid.FromString(ep.Identity)
			if err != nil {
				return nil, fmt.Errorf("endpoint identity %q: %w", ep.Identity, err)
			}
			return hc.Dial(ctx, hbone.DialRequest{Source: self, Expected: []spiffeid.ID{want},
				Proxy: netip.AddrPortFrom(ep.Addr.Addr(), ztAddr.Port()), Target: ep.Addr})
		}
		tunnelProtocol = discoveryv1.TunnelProtocol_TUNNEL_PROTOCOL_HBONE
	}
	log := zap.NewNop()
	cat := catalog.New(catalog.Options{Dial: dial, Logger: log})
	cat.MarkSynced() // the state below is complete
	vip := netip.MustParseAddrPort("10.96.0.1:80")
	v4, b4 := vip.Addr().As4(), bap.Addr().As4()
	key := "default/bench.default.svc.cluster.local"
	if err := cat.Update([]proto.Message{
		&discoveryv1.Service{Name: "bench", Namespace: "default", Hostname: "bench.default.svc.cluster.local", Addresses: [][]byte{v4[:]},
			Ports: []*discoveryv1.ServicePort{{ServicePort: 80, TargetPort: uint32(bap.Port()), AppProtocol: "http"}}},
		&discoveryv1.Workload{Uid: "b", Name: "bench", Namespace: "default", Addresses: [][]byte{b4[:]}, ServiceAccount: "bench",
			TunnelProtocol: tunnelProtocol, Services: map[string]*discoveryv1.PortList{key: {}}},
		&discoveryv1.WaypointService{Service: key, HttpRoutes: []*discoveryv1.HTTPRoute{{Namespace: "default", Name: "r",
			Rules: []*discoveryv1.HTTPRouteRule{
				{Matches: []*discoveryv1.HTTPRouteMatch{{Path: &discoveryv1.PathMatch{Value: "/api"}}}, Backends: []*discoveryv1.BackendRef{{Service: key, Port: 80, Weight: 1}}},
				{Backends: []*discoveryv1.BackendRef{{Service: key, Port: 80, Weight: 1}},
					Filters: []*discoveryv1.HTTPFilter{{Kind: &discoveryv1.HTTPFilter_RequestHeaderModifier{RequestHeaderModifier: &discoveryv1.HeaderModifier{
						Set: []*discoveryv1.Header{{Name: "x-via", Value: "waypoint"}}}}}}},
			}}},
			Authorizations: []*discoveryv1.Authorization{{Namespace: "default", Name: "allow", Rules: []*discoveryv1.Rule{{
				To: []*discoveryv1.Operation{{Methods: []string{"GET", "POST"}}}}}}}},
	}, nil); err != nil {
		return err
	}
	reg := prometheus.NewRegistry()
	m := telemetry.NewMetrics(reg)
	tr, err := telemetry.NewTracer(context.Background(), telemetry.TracingConfig{SampleRatio: 0.01, ServiceName: "bench"})
	if err != nil {
		return err
	}
	// The access log is written as in production (buffered), to /dev/null.
	devNull, err := os.OpenFile(os.DevNull, os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	defer devNull.Close()
	access, stopAccess := telemetry.NewAccessLog(devNull)
	defer func() { _ = stopAccess() }()
	popts := proxy.Options{Catalog: cat, Metrics: m, Tracer: tr, AccessLog: access, Logger: log}
	// Profiling knobs: switch parts of the telemetry off to see their cost.
	if os.Getenv("WAYPOINT_BENCH_NOTRACE") != "" {
		popts.Tracer = nil
	}
	if os.Getenv("WAYPOINT_BENCH_NOACCESS") != "" {
		popts.AccessLog = nil
	}
	if os.Getenv("WAYPOINT_BENCH_NOMETRICS") != "" {
		popts.Metrics = nil
	}
	p := proxy.New(popts)
	srv := tunnel.New(tunnel.Options{Catalog: cat, Proxy: p, Metrics: m, Logger: log})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	ctx, cancel := signal.NotifyContext(context.Background(), syscall.SIGTERM)
	defer cancel()
	go func() { _, _ = io.Copy(io.Discard, os.Stdin); cancel() }()
	if os.Getenv("WAYPOINT_BENCH_HEAPPROFILE") != "" {
		runtime.MemProfileRate = 4096
	}
	if os.Getenv("WAYPOINT_BENCH_MEMSTATS") != "" {
		var before runtime.MemStats
		runtime.ReadMemStats(&before)
		// Peaks of the memory classes, sampled (each sample stops the world
		// briefly: diagnosis only).
		var peakHeap, peakStack, peakSys, peakIdle, peakLive uint64
		live := []metrics.Sample{{Name: "/gc/heap/live:bytes"}}
		var nG int
		stop := make(chan struct{})
		sampled := make(chan struct{})
		go func() {
			defer close(sampled)
			t := time.NewTicker(100 * time.Millisecond)
			defer t.Stop()
			for {
				select {
				case <-stop:
					return
				case <-t.C:
				}
				var m runtime.MemStats
				runtime.ReadMemStats(&m)
				// The path may hold %d for the PID (both children see it).
				if path := os.Getenv("WAYPOINT_BENCH_HEAPPROFILE"); path != "" && m.HeapInuse > peakHeap {
					if strings.Contains(path, "%d") {
						path = fmt.Sprintf(path, os.Getpid())
					}
					if f, err := os.Create(path); err == nil {
						_ = pprof.Lookup("heap").WriteTo(f, 0)
						f.Close()
					}
				}
				peakHeap, peakStack = max(peakHeap, m.HeapInuse), max(peakStack, m.StackInuse)
				peakSys, peakIdle = max(peakSys, m.Sys), max(peakIdle, m.HeapIdle-m.HeapReleased)
				nG = max(nG, runtime.NumGoroutine())
				metrics.Read(live)
				peakLive = max(peakLive, live[0].Value.Uint64())
			}
		}()
		defer func() {
			close(stop)
			<-sampled
			var after runtime.MemStats
			runtime.ReadMemStats(&after)
			fmt.Fprintf(os.Stderr, "mallocs %d bytes %d gcs %d\n", after.Mallocs-before.Mallocs,
				after.TotalAlloc-before.TotalAlloc, after.NumGC-before.NumGC)
			fmt.Fprintf(os.Stderr, "peak heap-live %.1f MB heap-inuse %.1f MB stack-inuse %.1f MB heap-idle-unreleased %.1f MB sys %.1f MB goroutines %d\n",
				float64(peakLive)/(1<<20), float64(peakHeap)/(1<<20), float64(peakStack)/(1<<20), float64(peakIdle)/(1<<20), float64(peakSys)/(1<<20), nG)
		}()
	}
	if path := os.Getenv("WAYPOINT_BENCH_CPUPROFILE"); path != "" {
		if strings.Contains(path, "%d") { // both children see it
			path = fmt.Sprintf(path, os.Getpid())
		}
		f, err := os.Create(path)
		if err != nil {
			return err
		}
		if err := pprof.StartCPUProfile(f); err != nil {
			return err
		}
		defer func() { pprof.StopCPUProfile(); f.Close() }()
	}
	if cert != nil {
		// HBONE mode: terminate mTLS + HTTP/2 CONNECT like the real waypoint.
		hs := hbone.NewServer(hbone.ServerConfig{
			Certificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) { return cert, nil },
			Bundle:      bundle, TrustDomain: benchTD,
			Handler: func(ctx context.Context, r *hbone.Request) (func(net.Conn), error) {
				return srv.Accept(ctx, r.Peer.String(), r.RemoteAddr.Addr(), r.Authority)
			},
		})
		go func() { _ = hs.Serve(ctx, ln) }()
		if upstreamZtunnel != "" {
			fmt.Println(ln.Addr().String() + upstreamHBONEMark)
		} else {
			fmt.Println(ln.Addr().String())
		}
		return srv.Run(ctx)
	}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				src := netip.MustParseAddrPort(c.RemoteAddr().String()).Addr()
				fn, err := srv.Accept(ctx, "spiffe://cluster.local/ns/load/sa/wrk", src, vip)
				if err != nil {
					c.Close()
					return
				}
				fn(c)
			}()
		}
	}()
	if path := os.Getenv("WAYPOINT_BENCH_MEMPROFILE"); path != "" {
		runtime.MemProfileRate = 4096
		defer func() {
			if f, err := os.Create(path); err == nil {
				_ = pprof.Lookup("allocs").WriteTo(f, 0)
				f.Close()
			}
		}()
	}
	fmt.Println(ln.Addr().String())
	err = srv.Run(ctx)
	ln.Close()
	return err
}

func freePort(b *testing.B) int {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

// startNginx runs nginx with a backend server (a fixed 200) and a reverse
// proxy to it with upstream keep-alive. It returns both addresses and the
// PIDs of the proxy's processes (master and workers).
func startNginx(b *testing.B) (backend, proxyAddr string, pids func() []int) {
	nginx, err := exec.LookPath("nginx")
	if err != nil {
		if _, err2 := os.Stat("/usr/sbin/nginx"); err2 != nil {
			b.Skip("nginx not installed (hack/deps.sh installs nginx-light)")
		}
		nginx = "/usr/sbin/nginx"
	}
	dir := b.TempDir()
	for _, d := range []string{"logs", "tmp"} {
		_ = os.MkdirAll(filepath.Join(dir, d), 0o755)
	}
	bp, pp := freePort(b), freePort(b)
	// Two instances so the proxy's CPU and RSS are measured apart from the
	// backend's.
	backendConf := fmt.Sprintf(`worker_processes 1; pid %[1]s/backend.pid; error_log %[1]s/logs/b.log warn; daemon off;
events { worker_connections 4096; }
http { access_log off; client_body_temp_path %[1]s/tmp; proxy_temp_path %[1]s/tmp; fastcgi_temp_path %[1]s/tmp; uwsgi_temp_path %[1]s/tmp; scgi_temp_path %[1]s/tmp;
  keepalive_requests 1000000;
  server { listen 127.0.0.1:%[2]d; location / { return 200 "hello from the backend\n"; } } }`, dir, bp)
	proxyConf := fmt.Sprintf(`worker_processes auto; pid %[1]s/proxy.pid; error_log %[1]s/logs/p.log warn; daemon off;
events { worker_connections 4096; }
http { access_log off; client_body_temp_path %[1]s/tmp; proxy_temp_path %[1]s/tmp; fastcgi_temp_path %[1]s/tmp; uwsgi_temp_path %[1]s/tmp; scgi_temp_path %[1]s/tmp;
  keepalive_requests 1000000;
  upstream be { server 127.0.0.1:%[2]d; keepalive 128; }
  server { listen 127.0.0.1:%[3]d; location / { proxy_pass http://be; proxy_http_version 1.1; proxy_set_header Connection ""; proxy_set_header X-Via nginx; } } }`, dir, bp, pp)
	var procs []*exec.Cmd
	for _, c := range []struct{ name, conf string }{{"backend", backendConf}, {"proxy", proxyConf}} {
		path := filepath.Join(dir, c.name+".conf")
		if err := os.WriteFile(path, []byte(c.conf), 0o644); err != nil {
			b.Fatal(err)
		}
		cmd := exec.Command(nginx, "-p", dir, "-c", path, "-e", filepath.Join(dir, "logs", c.name+".err"))
		cmd.Stderr = os.Stderr
		if err := cmd.Start(); err != nil {
			b.Fatal(err)
		}
		procs = append(procs, cmd)
	}
	b.Cleanup(func() {
		for _, c := range procs {
			_ = c.Process.Signal(syscall.SIGQUIT)
			done := make(chan struct{})
			go func() { _ = c.Wait(); close(done) }()
			select {
			case <-done:
			case <-time.After(5 * time.Second):
				_ = c.Process.Kill()
				<-done
			}
		}
	})
	backend = fmt.Sprintf("127.0.0.1:%d", bp)
	proxyAddr = fmt.Sprintf("127.0.0.1:%d", pp)
	waitListening(b, backend)
	waitListening(b, proxyAddr)
	master := procs[1].Process.Pid
	return backend, proxyAddr, func() []int { return append([]int{master}, childrenOf(master)...) }
}

func childrenOf(pid int) []int {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%d/children", pid, pid))
	if err != nil {
		return nil
	}
	var out []int
	for _, f := range strings.Fields(string(b)) {
		if n, err := strconv.Atoi(f); err == nil {
			out = append(out, n)
		}
	}
	return out
}

func waitListening(b *testing.B, addr string) {
	for range 100 {
		if c, err := net.Dial("tcp", addr); err == nil {
			c.Close()
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	b.Fatalf("%s never listened", addr)
}

// startChild runs bin (a build of this test binary: os.Args[0], or a
// baseline's) as a child process with env added, and returns the line it
// prints first (its address, perhaps with a mark) and its PID.
func startChild(b *testing.B, bin string, env ...string) (string, int) {
	cmd := exec.Command(bin, "-test.run=^$")
	cmd.Env = append(os.Environ(), env...)
	stdin, err := cmd.StdinPipe()
	if err != nil {
		b.Fatal(err)
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		b.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() {
		stdin.Close()
		done := make(chan struct{})
		go func() { _ = cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(30 * time.Second):
			_ = cmd.Process.Kill()
			<-done
		}
	})
	line, err := bufio.NewReader(out).ReadString('\n')
	if err != nil {
		b.Fatalf("bench child: %v", err)
	}
	return strings.TrimSpace(line), cmd.Process.Pid
}

// startWaypoint runs bin as the waypoint child; with hboneDir set the
// child terminates HBONE with the credentials there, and with zt (a
// stand-in ztunnel's address) set as well its upstream leg is HBONE to zt.
// ok is false if bin cannot do what was asked (a baseline that predates
// the mode).
func startWaypoint(b *testing.B, bin, backend, hboneDir, zt string) (addr string, pid int, ok bool) {
	line, pid := startChild(b, bin, childEnv+"="+backend, childHBONEEnv+"="+hboneDir, childUpstreamEnv+"="+zt)
	addr, marked := strings.CutSuffix(line, upstreamHBONEMark)
	waitListening(b, addr)
	return addr, pid, marked == (zt != "")
}

// startZtunnel runs the destination's stand-in ztunnel (see ztunnel) in
// front of backend, with the credentials in hboneDir.
func startZtunnel(b *testing.B, backend, hboneDir string) (string, int) {
	addr, pid := startChild(b, os.Args[0], ztunnelEnv+"="+backend, childHBONEEnv+"="+hboneDir)
	waitListening(b, addr)
	return addr, pid
}

// cpuSeconds is utime+stime of the processes.
func cpuSeconds(pids []int) float64 {
	var total float64
	for _, pid := range pids {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		if err != nil {
			continue
		}
		s := string(b)
		f := strings.Fields(s[strings.LastIndexByte(s, ')')+2:])
		ut, _ := strconv.ParseFloat(f[11], 64)
		st, _ := strconv.ParseFloat(f[12], 64)
		total += (ut + st) / 100 // USER_HZ
	}
	return total
}

// rssMB is the summed resident set of the processes.
func rssMB(pids []int, field string) float64 {
	var kb float64
	for _, pid := range pids {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
		if err != nil {
			continue
		}
		for _, l := range strings.Split(string(b), "\n") {
			if strings.HasPrefix(l, field+":") {
				v, _ := strconv.ParseFloat(strings.Fields(l)[1], 64)
				kb += v
			}
		}
	}
	return kb / 1024
}

var wrkRPS = regexp.MustCompile(`Requests/sec:\s+([0-9.]+)`)

func wrk(b *testing.B, addr string, conns int, d time.Duration) float64 {
	out, err := exec.Command("wrk", "-t2", fmt.Sprintf("-c%d", conns), fmt.Sprintf("-d%ds", int(d.Seconds())), "http://"+addr+"/").CombinedOutput()
	if err != nil {
		b.Fatalf("wrk: %v\n%s", err, out)
	}
	m := wrkRPS.FindSubmatch(out)
	if m == nil {
		b.Fatalf("wrk output without Requests/sec:\n%s", out)
	}
	v, _ := strconv.ParseFloat(string(m[1]), 64)
	if strings.Contains(string(out), "Non-2xx") || strings.Contains(string(out), "Socket errors") {
		b.Fatalf("wrk saw errors:\n%s", out)
	}
	return v
}

func fortioPath(b *testing.B) string {
	if p, err := exec.LookPath("fortio"); err == nil {
		return p
	}
	p, _ := filepath.Abs("../../../bin/tools/fortio")
	if _, err := os.Stat(p); err != nil {
		b.Skip("fortio not built (make tools)")
	}
	return p
}

type fortioResult struct {
	ActualQPS         float64
	DurationHistogram struct {
		Percentiles []struct{ Percentile, Value float64 }
	}
	RetCodes           map[string]int
	ErrorsDurationHist struct{ Count int }
}

// fixedRate runs fortio at qps for d and returns p50 and p99 in ms.
func fixedRate(b *testing.B, addr string, qps int, d time.Duration) (p50, p99, actual float64) {
	out := filepath.Join(b.TempDir(), "fortio.json")
	cmd := exec.Command(fortioPath(b), "load", "-quiet", "-qps", strconv.Itoa(qps), "-c", "16", "-t", d.String(), "-json", out, "http://"+addr+"/")
	if o, err := cmd.CombinedOutput(); err != nil {
		b.Fatalf("fortio: %v\n%s", err, o)
	}
	raw, err := os.ReadFile(out)
	if err != nil {
		b.Fatal(err)
	}
	var r fortioResult
	if err := json.Unmarshal(raw, &r); err != nil {
		b.Fatal(err)
	}
	for code, n := range r.RetCodes {
		if code != "200" && n > 0 {
			b.Fatalf("fortio saw %d × %s", n, code)
		}
	}
	for _, p := range r.DurationHistogram.Percentiles {
		switch p.Percentile {
		case 50:
			p50 = p.Value * 1000
		case 99:
			p99 = p.Value * 1000
		}
	}
	return p50, p99, r.ActualQPS
}

// hboneCredentials issues the waypoint's, the destination workload's (for
// the stand-in ztunnel) and a client's certificates from a fresh CA and
// writes the first two to a directory for the children.
func hboneCredentials(b *testing.B) (string, *tls.Certificate, *identity.Bundle) {
	auth, err := ca.NewRoot(benchTD, time.Hour)
	if err != nil {
		b.Fatal(err)
	}
	issue := func(ns, sa string) (*tls.Certificate, []byte, []byte) {
		id, _ := identity.ID("cluster.local", ns, sa)
		key, err := identity.NewKey()
		if err != nil {
			b.Fatal(err)
		}
		csr, _ := identity.NewCSR(key, id)
		chain, err := auth.Sign(csr, id, time.Hour)
		if err != nil {
			b.Fatal(err)
		}
		der, _ := x509.MarshalECPrivateKey(key)
		keyPEM := pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: der})
		certPEM := ca.EncodeCertsPEM(chain)
		c, err := tls.X509KeyPair(certPEM, keyPEM)
		if err != nil {
			b.Fatal(err)
		}
		return &c, certPEM, keyPEM
	}
	dir := b.TempDir()
	_, wc, wk := issue("default", "waypoint")
	_, zc, zk := issue("default", "bench") // the backend workload's service account
	for name, data := range map[string][]byte{"waypoint.pem": wc, "waypoint-key.pem": wk,
		"ztunnel.pem": zc, "ztunnel-key.pem": zk, "roots.pem": auth.RootsPEM()} {
		if err := os.WriteFile(filepath.Join(dir, name), data, 0o600); err != nil {
			b.Fatal(err)
		}
	}
	client, _, _ := issue("load", "wrk")
	bundle := identity.NewBundle()
	bundle.Set(benchTD, auth.Roots())
	return dir, client, bundle
}

// hboneShim plays the client's ztunnel: it accepts plain TCP from the load
// generator and tunnels each connection over HBONE to the waypoint.
func hboneShim(b *testing.B, waypoint string, cert *tls.Certificate, bundle *identity.Bundle) string {
	wpID, _ := identity.ID("cluster.local", "default", "waypoint")
	src, _ := identity.ID("cluster.local", "load", "wrk")
	hc := hbone.NewClient(hbone.ClientConfig{
		Certificates: func(context.Context, spiffeid.ID) (*tls.Certificate, error) { return cert, nil },
		Bundle:       bundle,
	})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { ln.Close(); hc.Close() })
	proxyAddr := netip.MustParseAddrPort(waypoint)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				up, err := hc.Dial(context.Background(), hbone.DialRequest{Source: src, Expected: []spiffeid.ID{wpID},
					Proxy: proxyAddr, Target: netip.MustParseAddrPort("10.96.0.1:80")})
				if err != nil {
					c.Close()
					return
				}
				_, _, _ = hbone.Splice(c, up)
			}()
		}
	}()
	return ln.Addr().String()
}

// BenchmarkProxies compares, in one run: the backend directly, nginx as a
// reverse proxy, and the waypoint's L7 path (and, with BENCH_BASELINE set
// to a test binary built from an earlier commit, that commit's waypoint).
// The waypoint runs in three set-ups: "waypoint" with each downstream TCP
// connection standing for a tunnel and plain TCP to the backend,
// "waypoint-hbone" behind inbound HBONE (a client-ztunnel shim in this
// process) and still plain TCP to the backend, and "waypoint-hbone-mesh"
// with both legs HBONE as in production — client → HBONE → waypoint →
// HBONE (waypoint identity) → stand-in destination ztunnel (its own
// process) → backend. Metrics per target: req/s at 64 connections; p50/p99
// at 1,000 req/s and the p50/p99 added over direct; CPU cores the proxy
// used per 1,000 req/s and its peak RSS, and the same of the stand-in
// ztunnel where there is one.
func BenchmarkProxies(b *testing.B) {
	for _, tool := range []string{"wrk"} {
		if _, err := exec.LookPath(tool); err != nil {
			b.Skipf("%s not installed", tool)
		}
	}
	backend, nginxAddr, nginxPIDs := startNginx(b)
	dir, clientCert, bundle := hboneCredentials(b)
	type target struct {
		name    string
		addr    string
		pids    func() []int // the proxy's processes
		ztunnel []int        // the stand-in destination ztunnel's
	}
	waypoints := func(bin, suffix string) []target {
		wpAddr, wpPID, _ := startWaypoint(b, bin, backend, "", "")
		wpHBONE, wpHBONEPID, _ := startWaypoint(b, bin, backend, dir, "")
		shim := hboneShim(b, wpHBONE, clientCert, bundle)
		ts := []target{
			{"waypoint" + suffix, wpAddr, func() []int { return []int{wpPID} }, nil},
			{"waypoint-hbone" + suffix, shim, func() []int { return []int{wpHBONEPID} }, nil},
		}
		zt, ztPID := startZtunnel(b, backend, dir)
		wpMesh, wpMeshPID, ok := startWaypoint(b, bin, backend, dir, zt)
		if !ok {
			b.Logf("%s: its waypoint has no HBONE upstream mode; no waypoint-hbone-mesh%s", bin, suffix)
			return ts
		}
		meshShim := hboneShim(b, wpMesh, clientCert, bundle)
		return append(ts, target{"waypoint-hbone-mesh" + suffix, meshShim, func() []int { return []int{wpMeshPID} }, []int{ztPID}})
	}
	dur := 5 * time.Second // per phase and round
	if s := os.Getenv("BENCH_SECONDS"); s != "" {
		if n, err := strconv.Atoi(s); err == nil {
			dur = time.Duration(n) * time.Second
		}
	}
	targets := []target{{name: "direct", addr: backend}, {name: "nginx", addr: nginxAddr, pids: nginxPIDs}}
	current := waypoints(os.Args[0], "")
	if base := os.Getenv("BENCH_BASELINE"); base != "" {
		// A baseline build of this benchmark (go test -c of an earlier
		// commit) runs its waypoint next to the current one, each pair
		// measured back to back so that both see the same machine.
		before := waypoints(base, "-before")
		for i, t := range current {
			if i < len(before) {
				targets = append(targets, before[i])
			}
			targets = append(targets, t)
		}
	} else {
		targets = append(targets, current...)
	}
	only := os.Getenv("BENCH_TARGETS") // comma-separated subset, for profiling
	targets = slices.DeleteFunc(targets, func(t target) bool {
		return only != "" && t.name != "direct" && !slices.Contains(strings.Split(only, ","), t.name)
	})
	rounds := 3
	if s := os.Getenv("BENCH_ROUNDS"); s != "" {
		if n, err := strconv.Atoi(s); err == nil && n > 0 {
			rounds = n
		}
	}
	// The machine is shared and its load drifts within seconds, so the
	// targets are measured in rounds, each round visiting every target in
	// turn: all of them see the same conditions. Throughput is the total
	// over the rounds, latency the median of the rounds' percentiles, CPU
	// the total over the fixed-rate phases.
	type acc struct {
		reqs, secs, cpu, ztCPU, served float64
		p50s, p99s                     []float64
	}
	res := make([]acc, len(targets))
	for _, t := range targets {
		wrk(b, t.addr, 64, time.Second) // warm up pools and caches
	}
	for range rounds {
		for i, t := range targets {
			rps := wrk(b, t.addr, 64, dur)
			res[i].reqs += rps * dur.Seconds()
			res[i].secs += dur.Seconds()
			var cpu0, ztCPU0 float64
			if t.pids != nil {
				cpu0, ztCPU0 = cpuSeconds(t.pids()), cpuSeconds(t.ztunnel)
			}
			start := time.Now()
			p50, p99, actual := fixedRate(b, t.addr, 1000, dur)
			elapsed := time.Since(start).Seconds()
			res[i].p50s, res[i].p99s = append(res[i].p50s, p50), append(res[i].p99s, p99)
			if t.pids != nil {
				res[i].cpu += cpuSeconds(t.pids()) - cpu0
				res[i].ztCPU += cpuSeconds(t.ztunnel) - ztCPU0
				res[i].served += actual * elapsed
			}
		}
	}
	median := func(v []float64) float64 {
		v = slices.Clone(v)
		slices.Sort(v)
		n := len(v)
		if n%2 == 1 {
			return v[n/2]
		}
		return (v[n/2-1] + v[n/2]) / 2
	}
	directP50, directP99 := median(res[0].p50s), median(res[0].p99s)
	for i, t := range targets {
		r := res[i]
		b.Run(t.name, func(b *testing.B) {
			p50, p99 := median(r.p50s), median(r.p99s)
			b.ReportMetric(r.reqs/r.secs, "req/s@64c")
			b.ReportMetric(p50, "p50-ms@1krps")
			b.ReportMetric(p99, "p99-ms@1krps")
			if t.name != "direct" {
				b.ReportMetric(p50-directP50, "added-p50-ms")
				b.ReportMetric(p99-directP99, "added-p99-ms")
			}
			if t.pids != nil {
				b.ReportMetric(r.cpu/(r.served/1000), "cores/1krps")
				b.ReportMetric(rssMB(t.pids(), "VmHWM"), "peak-RSS-MB")
				b.ReportMetric(rssMB(t.pids(), "VmRSS"), "RSS-MB")
			}
			if t.ztunnel != nil {
				b.ReportMetric(r.ztCPU/(r.served/1000), "ztunnel-cores/1krps")
				b.ReportMetric(rssMB(t.ztunnel, "VmHWM"), "ztunnel-peak-RSS-MB")
			}
		})
	}
}
