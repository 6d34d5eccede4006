package meshtest

import (
	"bufio"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/amesh-dev/amesh/ztunnel/internal/netns"
	"github.com/amesh-dev/amesh/ztunnel/internal/testnet"
)

var (
	loadDuration = flag.Duration("load-duration", 10*time.Second, "duration of each fortio and iperf3 run in the benchmarks")
	idleConns    = flag.Int("idle-conns", 1000, "idle tunnelled connections for BenchmarkIdle")
	baselineBin  = flag.String("baseline-ztunnel", "", "another ztunnel build to measure in the same run (mesh-baseline), for before/after comparisons")
	idleDump     = flag.String("idle-dump", "", "directory where BenchmarkIdle saves each idle ztunnel's smaps_rollup, heap profile and metrics")
)

// build is a ztunnel binary the mesh benchmarks measure.
type build struct{ name, bin string }

// builds returns the ztunnel builds to measure: this tree's ("mesh") and,
// with -baseline-ztunnel, another one ("mesh-baseline").
func builds() []build {
	bs := []build{{"mesh", ztunnelBin}}
	if *baselineBin != "" {
		bs = append(bs, build{"mesh-baseline", *baselineBin})
	}
	return bs
}

// use makes both nodes run the given ztunnel build, restarting them if
// they run another one.
func (w *benchWorld) use(b *testing.B, bin string) (src, dst *Ztunnel) {
	b.Helper()
	if w.bin != bin {
		for _, n := range []*testnet.Node{w.n1, w.n2} {
			w.Zt[n].Stop()
			w.StartZtunnelBin(n, bin)
		}
		w.bin = bin
	}
	return w.Zt[w.n1], w.Zt[w.n2]
}

// tool finds a pinned tool: on PATH (make puts bin/tools there) or in the
// repository's bin/tools.
func tool(tb testing.TB, name string) string {
	tb.Helper()
	if p, err := exec.LookPath(name); err == nil {
		return p
	}
	p, _ := filepath.Abs(filepath.Join("..", "..", "..", "bin", "tools", name))
	if _, err := os.Stat(p); err == nil {
		return p
	}
	tb.Skipf("needs %s (make tools / apt-get install)", name)
	return ""
}

// benchWorld: clients on node1, servers on node2; "m" pods are enrolled,
// "d" pods are not (the direct baseline).
type benchWorld struct {
	*Mesh
	n1, n2           *testnet.Node
	clientM, clientD *Pod
	serverM, serverD *Pod
	bin              string // the ztunnel build running
}

var benchVIPEcho = netip.MustParseAddr("10.96.1.1")

func newBenchWorld(b *testing.B) *benchWorld {
	m := NewMesh(b)
	w := &benchWorld{Mesh: m, n1: m.Nodes[0], n2: m.Nodes[1]}
	w.clientM = m.AddPod(w.n1, "cm", true)
	w.clientD = m.AddPod(w.n1, "cd", false)
	w.serverM = m.AddPod(w.n2, "sm", true)
	w.serverD = m.AddPod(w.n2, "sd", false)
	m.Ctl.SetServicePort("echo", benchVIPEcho, 8078, 8078, w.serverM)
	m.StartZtunnel(w.n1)
	m.StartZtunnel(w.n2)
	w.bin = ztunnelBin
	return w
}

// background runs a command inside a namespace until the benchmark ends;
// it is stopped by its process id.
func background(tb testing.TB, ns *testnet.NS, args ...string) {
	tb.Helper()
	cmd := exec.Command("ip", append([]string{"netns", "exec", ns.Name}, args...)...)
	if err := cmd.Start(); err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	})
}

// waitPort waits until something listens on addr, seen from ns.
func waitPort(tb testing.TB, ns *testnet.NS, addr string) {
	tb.Helper()
	h, err := netns.Open(ns.Path)
	if err != nil {
		tb.Fatal(err)
	}
	defer h.Close()
	deadline := time.Now().Add(10 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		c, err := h.Dial(ctx, "tcp", addr, netip.Addr{}, netns.SockOpts{Mark: 0x539}) // marked: not captured
		cancel()
		if err == nil {
			c.Close()
			return
		}
		if time.Now().After(deadline) {
			tb.Fatalf("nothing listens on %s: %v", addr, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

type fortioResult struct {
	ActualQPS         float64
	DurationHistogram struct {
		Count       int64
		Percentiles []struct {
			Percentile float64
			Value      float64
		}
	}
	RetCodes map[string]int64
}

func (r *fortioResult) pct(p float64) float64 {
	for _, x := range r.DurationHistogram.Percentiles {
		if x.Percentile == p {
			return x.Value * 1000 // ms
		}
	}
	return -1
}

func fortioLoad(b *testing.B, from *Pod, target string) *fortioResult {
	b.Helper()
	// -r: 10 µs histogram buckets (the default, 1 ms, makes sub-millisecond
	// percentiles interpolations within one bucket).
	out, err := exec.Command("ip", "netns", "exec", from.NS.Name, tool(b, "fortio"), "load", "-r", "0.00001",
		"-qps", "1000", "-c", "16", "-t", loadDuration.String(), "-payload-size", "1024",
		"-p", "50,90,99", "-json", "-", "-quiet", "-logger-json=false", "tcp://"+target).Output()
	if err != nil {
		var stderr []byte
		if ee, ok := err.(*exec.ExitError); ok {
			stderr = ee.Stderr
		}
		b.Fatalf("fortio: %v\n%s", err, stderr)
	}
	var r fortioResult
	if err := json.Unmarshal(out, &r); err != nil {
		b.Fatalf("fortio output: %v", err)
	}
	if r.RetCodes["OK"] == 0 || int64(len(r.RetCodes)) != 1 {
		b.Fatalf("fortio errors: %v", r.RetCodes)
	}
	return &r
}

// cpuSeconds returns a process's user+system CPU time.
func cpuSeconds(tb testing.TB, pid int) float64 {
	tb.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		tb.Fatal(err)
	}
	s := string(b)
	fields := strings.Fields(s[strings.LastIndexByte(s, ')')+2:])
	ut, _ := strconv.ParseFloat(fields[11], 64)
	st, _ := strconv.ParseFloat(fields[12], 64)
	return (ut + st) / 100 // USER_HZ
}

func rssMB(tb testing.TB, pid int) float64 {
	tb.Helper()
	return statusMB(tb, pid, "VmRSS")
}

// statusMB reads one memory field of /proc/<pid>/status ("VmRSS",
// "RssAnon": the heap, stacks and runtime's memory; "RssFile": the
// binary's pages touched so far, shared and reclaimable).
func statusMB(tb testing.TB, pid int, field string) float64 {
	tb.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		tb.Fatal(err)
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, field+":"); ok {
			kb, _ := strconv.ParseFloat(strings.Fields(v)[0], 64)
			return kb / 1024
		}
	}
	tb.Fatalf("no %s in /proc/%d/status", field, pid)
	return 0
}

// BenchmarkLatency measures fortio's TCP echo latency at 1,000 req/s,
// 16 connections, 1 KiB payloads, across nodes: directly between two pods
// outside the mesh, then through both ztunnels (by service VIP). The mesh
// run reports the added latency and the ztunnels' CPU per 1,000 req/s.
func BenchmarkLatency(b *testing.B) {
	w := newBenchWorld(b)
	fortio := tool(b, "fortio")
	for _, p := range []*Pod{w.serverD, w.serverM} {
		background(b, p.NS, fortio, "tcp-echo", "-tcp-port", "8078", "-logger-json=false")
		waitPort(b, p.NS, p.IP.String()+":8078")
	}
	var direct, relay *fortioResult
	b.Run("direct", func(b *testing.B) {
		direct = fortioLoad(b, w.clientD, w.serverD.IP.String()+":8078")
		report(b, direct)
	})
	// The floor of any user-space L4 proxy on both nodes: the same
	// unenrolled client and server joined by two plain TCP relays (one
	// process per node, a goroutine per direction copying through a
	// buffer), no TLS, no HTTP/2.
	b.Run("relay", func(b *testing.B) {
		const port = 18078
		startRelay(b, w.n2.NS, netip.AddrPortFrom(w.n2.Gateway(), port), netip.AddrPortFrom(w.serverD.IP, 8078))
		startRelay(b, w.n1.NS, netip.AddrPortFrom(w.n1.Gateway(), port), netip.AddrPortFrom(w.n2.Gateway(), port))
		fortioLoad(b, w.clientD, netip.AddrPortFrom(w.n1.Gateway(), port).String()) // warm up
		relay = fortioLoad(b, w.clientD, netip.AddrPortFrom(w.n1.Gateway(), port).String())
		report(b, relay)
		if direct != nil {
			b.ReportMetric(relay.pct(50)-direct.pct(50), "added-p50-ms")
			b.ReportMetric(relay.pct(90)-direct.pct(90), "added-p90-ms")
			b.ReportMetric(relay.pct(99)-direct.pct(99), "added-p99-ms")
		}
	})
	for _, bd := range builds() {
		b.Run(bd.name, func(b *testing.B) {
			z1, z2 := w.use(b, bd.bin)
			fortioLoad(b, w.clientM, benchVIPEcho.String()+":8078") // warm up the pool
			c1, c2, t0 := cpuSeconds(b, z1.Pid()), cpuSeconds(b, z2.Pid()), time.Now()
			r := fortioLoad(b, w.clientM, benchVIPEcho.String()+":8078")
			el := time.Since(t0).Seconds()
			d1, d2 := cpuSeconds(b, z1.Pid())-c1, cpuSeconds(b, z2.Pid())-c2
			b.Logf("ztunnel CPU over %.2fs: source %.2fs, destination %.2fs", el, d1, d2)
			report(b, r)
			if direct != nil {
				b.ReportMetric(r.pct(50)-direct.pct(50), "added-p50-ms")
				b.ReportMetric(r.pct(90)-direct.pct(90), "added-p90-ms")
				b.ReportMetric(r.pct(99)-direct.pct(99), "added-p99-ms")
			}
			if relay != nil {
				b.ReportMetric(r.pct(50)-relay.pct(50), "over-relay-p50-ms")
				b.ReportMetric(r.pct(90)-relay.pct(90), "over-relay-p90-ms")
			}
			perK := 1000 / r.ActualQPS
			b.ReportMetric(d1/el*perK, "src-ztunnel-cores/1krps")
			b.ReportMetric(d2/el*perK, "dst-ztunnel-cores/1krps")
			b.ReportMetric((d1+d2)/el*perK, "both-ztunnels-cores/1krps")
		})
	}
}

// BenchmarkConnect measures what a new connection costs: connect, a 1 KiB
// request and its echo, close, one after another from one client across
// nodes; ns/op is the mean, p50/p90 in ms. Direct, through the two relays
// (the floor of a user-space proxy pair) and through both ztunnels (a
// CONNECT stream on the pooled HBONE connection, the destination's policy
// check and its connection to the application from inside the pod).
func BenchmarkConnect(b *testing.B) {
	w := newBenchWorld(b)
	fortio := tool(b, "fortio")
	for _, p := range []*Pod{w.serverD, w.serverM} {
		background(b, p.NS, fortio, "tcp-echo", "-tcp-port", "8078", "-logger-json=false")
		waitPort(b, p.NS, p.IP.String()+":8078")
	}
	b.Run("direct", func(b *testing.B) { connectLoop(b, w.clientD, w.serverD.IP.String()+":8078") })
	b.Run("relay", func(b *testing.B) {
		const port = 18078
		startRelay(b, w.n2.NS, netip.AddrPortFrom(w.n2.Gateway(), port), netip.AddrPortFrom(w.serverD.IP, 8078))
		startRelay(b, w.n1.NS, netip.AddrPortFrom(w.n1.Gateway(), port), netip.AddrPortFrom(w.n2.Gateway(), port))
		connectLoop(b, w.clientD, netip.AddrPortFrom(w.n1.Gateway(), port).String())
	})
	for _, bd := range builds() {
		b.Run(bd.name, func(b *testing.B) {
			w.use(b, bd.bin)
			connectLoop(b, w.clientM, benchVIPEcho.String()+":8078")
		})
	}
}

// connectLoop runs b.N connections from inside the pod's namespace (one
// locked thread there, so the client adds no namespace switches).
func connectLoop(b *testing.B, from *Pod, target string) {
	h, err := netns.Open(from.Path)
	if err != nil {
		b.Fatal(err)
	}
	defer h.Close()
	one := func(req, resp []byte) error {
		c, err := net.DialTimeout("tcp", target, 5*time.Second)
		if err != nil {
			return err
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(5 * time.Second))
		if _, err := c.Write(req); err != nil {
			return err
		}
		_, err = io.ReadFull(c, resp)
		return err
	}
	var took []time.Duration
	err = h.Do(func() error {
		req, resp := payload(1024), make([]byte, 1024)
		for range 20 { // warm up (the HBONE pool, the relays' threads)
			if err := one(req, resp); err != nil {
				return err
			}
		}
		b.ResetTimer()
		for range b.N {
			t0 := time.Now()
			if err := one(req, resp); err != nil {
				return err
			}
			took = append(took, time.Since(t0))
		}
		b.StopTimer()
		return nil
	})
	if err != nil {
		b.Fatal(err)
	}
	slices.Sort(took)
	b.ReportMetric(float64(took[len(took)/2].Microseconds())/1000, "p50-ms")
	b.ReportMetric(float64(took[len(took)*9/10].Microseconds())/1000, "p90-ms")
}

func report(b *testing.B, r *fortioResult) {
	b.ReportMetric(r.ActualQPS, "req/s")
	b.ReportMetric(r.pct(50), "p50-ms")
	b.ReportMetric(r.pct(90), "p90-ms")
	b.ReportMetric(r.pct(99), "p99-ms")
	b.ReportMetric(0, "ns/op")
}

// BenchmarkThroughput measures single-stream throughput across nodes:
// iperf3 directly between two pods outside the mesh (plain TCP), a TLS 1.3
// stream between the same pods (Go crypto/tls, the baseline for one
// encryption), and iperf3 through both ztunnels (two TLS hops' worth of
// work: encrypt at the source ztunnel, decrypt at the destination).
func BenchmarkThroughput(b *testing.B) {
	w := newBenchWorld(b)
	iperf := tool(b, "iperf3")
	for _, p := range []*Pod{w.serverD, w.serverM} {
		background(b, p.NS, iperf, "-s", "-p", "5201")
		waitPort(b, p.NS, p.IP.String()+":5201")
	}
	var tcp, tlsGbps float64
	b.Run("tcp-direct", func(b *testing.B) {
		tcp = iperfRun(b, iperf, w.clientD, w.serverD.IP.String())
		b.ReportMetric(tcp, "Gbit/s")
		b.ReportMetric(0, "ns/op")
	})
	b.Run("tls-direct", func(b *testing.B) {
		tlsGbps = tlsRun(b, w.clientD, w.serverD)
		b.ReportMetric(tlsGbps, "Gbit/s")
		b.ReportMetric(0, "ns/op")
	})
	for _, bd := range builds() {
		b.Run(bd.name, func(b *testing.B) {
			z1, z2 := w.use(b, bd.bin)
			c1, c2, t0 := cpuSeconds(b, z1.Pid()), cpuSeconds(b, z2.Pid()), time.Now()
			g := iperfRun(b, iperf, w.clientM, w.serverM.IP.String())
			el := time.Since(t0).Seconds()
			d1, d2 := cpuSeconds(b, z1.Pid())-c1, cpuSeconds(b, z2.Pid())-c2
			b.ReportMetric(g, "Gbit/s")
			if tcp > 0 {
				b.ReportMetric(g/tcp, "x-tcp")
			}
			if tlsGbps > 0 {
				b.ReportMetric(g/tlsGbps, "x-tls")
			}
			// CPU of both ztunnels per gigabit moved.
			b.ReportMetric((d1+d2)/(g*el), "ztunnel-cpu-s/Gbit")
			b.ReportMetric(0, "ns/op")
		})
	}
}

func iperfRun(b *testing.B, iperf string, from *Pod, server string) float64 {
	b.Helper()
	secs := strconv.Itoa(max(1, int(loadDuration.Seconds())))
	out, err := exec.Command("ip", "netns", "exec", from.NS.Name, iperf, "-c", server, "-p", "5201", "-t", secs, "-J").Output()
	if err != nil {
		b.Fatalf("iperf3: %v\n%s", err, out)
	}
	var r struct {
		End struct {
			SumReceived struct {
				BitsPerSecond float64 `json:"bits_per_second"`
			} `json:"sum_received"`
		} `json:"end"`
	}
	if err := json.Unmarshal(out, &r); err != nil {
		b.Fatalf("iperf3 output: %v", err)
	}
	return r.End.SumReceived.BitsPerSecond / 1e9
}

// tlsRun streams over one TLS 1.3 connection from a pod to another for
// the load duration and returns what the server received, in Gbit/s.
func tlsRun(b *testing.B, from, to *Pod) float64 {
	b.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		b.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "bench"},
		NotBefore: time.Now(), NotAfter: time.Now().Add(time.Hour), DNSNames: []string{"bench"}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		b.Fatal(err)
	}
	cert := tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
	pool := x509.NewCertPool()
	leaf, _ := x509.ParseCertificate(der)
	pool.AddCert(leaf)

	hs, err := netns.Open(to.Path)
	if err != nil {
		b.Fatal(err)
	}
	defer hs.Close()
	ln, err := hs.Listen(context.Background(), "tcp", to.IP.String()+":5443", netns.SockOpts{})
	if err != nil {
		b.Fatal(err)
	}
	defer ln.Close()
	var received atomic.Int64
	var wg sync.WaitGroup
	wg.Go(func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		tc := tls.Server(c, &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS13})
		defer tc.Close()
		n, _ := io.Copy(io.Discard, tc)
		received.Store(n)
	})
	hc, err := netns.Open(from.Path)
	if err != nil {
		b.Fatal(err)
	}
	defer hc.Close()
	raw, err := hc.Dial(context.Background(), "tcp", to.IP.String()+":5443", netip.Addr{}, netns.SockOpts{})
	if err != nil {
		b.Fatal(err)
	}
	c := tls.Client(raw, &tls.Config{RootCAs: pool, ServerName: "bench", MinVersion: tls.VersionTLS13})
	buf := make([]byte, 128<<10)
	start := time.Now()
	for time.Since(start) < *loadDuration {
		if _, err := c.Write(buf); err != nil {
			b.Fatal(err)
		}
	}
	_ = c.CloseWrite()
	c.Close()
	wg.Wait()
	return float64(received.Load()) * 8 / time.Since(start).Seconds() / 1e9
}

// heapInuse reads HeapInuse from a ztunnel's heap profile after a GC.
func heapInuse(tb testing.TB, z *Ztunnel) float64 {
	tb.Helper()
	code, body, err := z.HTTP(15000, "/debug/pprof/heap?debug=1&gc=1")
	if err != nil || code != 200 {
		tb.Fatalf("heap profile: %d %v", code, err)
	}
	sc := bufio.NewScanner(strings.NewReader(body))
	sc.Buffer(make([]byte, 1<<20), 16<<20)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "# HeapInuse = "); ok {
			n, _ := strconv.ParseFloat(v, 64)
			return n
		}
	}
	tb.Fatal("no HeapInuse in the heap profile")
	return 0
}

// BenchmarkIdle reports each ztunnel's resident memory while idle (two
// pods each, certificates fetched) and the heap each one spends per idle
// tunnelled connection, measured over -idle-conns connections held open
// across nodes.
func BenchmarkIdle(b *testing.B) {
	w := newBenchWorld(b)
	for _, bd := range builds() {
		z1, z2 := w.use(b, bd.bin)
		// Fetch certificates and warm the pool with one conversation.
		converse(b, w.clientM, w.serverM.IP.String()+":8080", w.clientM.IP, 1024)
		time.Sleep(time.Second)
		b.Run(bd.name+"/rss", func(b *testing.B) {
			b.ReportMetric(rssMB(b, z1.Pid()), "src-ztunnel-MB")
			b.ReportMetric(rssMB(b, z2.Pid()), "dst-ztunnel-MB")
			b.ReportMetric(statusMB(b, z1.Pid(), "RssAnon"), "src-anon-MB")
			b.ReportMetric(statusMB(b, z1.Pid(), "RssFile"), "src-file-MB")
			b.ReportMetric(0, "ns/op")
		})
		if *idleDump != "" { // after the measurement: it allocates
			dumpIdle(b, filepath.Join(*idleDump, bd.name+"-src"), z1)
			dumpIdle(b, filepath.Join(*idleDump, bd.name+"-dst"), z2)
		}
		b.Run(bd.name+"/conns", func(b *testing.B) { idleConnsBench(b, w, z1, z2) })
	}
}

// dumpIdle saves what an idle ztunnel's memory is made of under dir:
// smaps_rollup, smaps, the heap profile (go tool pprof -sample_index=inuse_space)
// and its metrics (the Go runtime's memory classes).
func dumpIdle(tb testing.TB, dir string, z *Ztunnel) {
	tb.Helper()
	if err := os.MkdirAll(dir, 0o755); err != nil {
		tb.Fatal(err)
	}
	for _, f := range []string{"smaps_rollup", "smaps", "status"} {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/%s", z.Pid(), f))
		if err != nil {
			tb.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, f), b, 0o644); err != nil {
			tb.Fatal(err)
		}
	}
	for name, url := range map[string]string{
		"heap.pb.gz": "/debug/pprof/heap", "goroutine.txt": "/debug/pprof/goroutine?debug=1",
	} {
		code, body, err := z.HTTP(15000, url)
		if err != nil || code != 200 {
			tb.Fatalf("%s: %d %v", url, code, err)
		}
		if err := os.WriteFile(filepath.Join(dir, name), []byte(body), 0o644); err != nil {
			tb.Fatal(err)
		}
	}
	code, body, err := z.HTTP(15020, "/metrics")
	if err != nil || code != 200 {
		tb.Fatalf("metrics: %d %v", code, err)
	}
	if err := os.WriteFile(filepath.Join(dir, "metrics.txt"), []byte(body), 0o644); err != nil {
		tb.Fatal(err)
	}
}

// idleConnsBench holds -idle-conns tunnelled connections open and reports
// the heap each ztunnel spends per connection.
func idleConnsBench(b *testing.B, w *benchWorld, z1, z2 *Ztunnel) {
	h1, h2 := heapInuse(b, z1), heapInuse(b, z2)
	hc, err := netns.Open(w.clientM.Path)
	if err != nil {
		b.Fatal(err)
	}
	defer hc.Close()
	var conns []net.Conn
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	buf := make([]byte, 64)
	for range *idleConns {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		c, err := hc.Dial(ctx, "tcp", w.serverM.IP.String()+":8080", netip.Addr{}, netns.SockOpts{})
		cancel()
		if err != nil {
			b.Fatal(err)
		}
		conns = append(conns, c)
		_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
		if _, err := c.Read(buf); err != nil { // the greeting: the tunnel is up
			b.Fatal(err)
		}
	}
	time.Sleep(time.Second)
	a1, a2 := heapInuse(b, z1), heapInuse(b, z2)
	n := float64(len(conns))
	b.ReportMetric((a1-h1)/n/1024, "src-heap-KiB/conn")
	b.ReportMetric((a2-h2)/n/1024, "dst-heap-KiB/conn")
	b.ReportMetric(rssMB(b, z1.Pid()), "src-rss-MB")
	b.ReportMetric(rssMB(b, z2.Pid()), "dst-rss-MB")
	b.ReportMetric(0, "ns/op")
}

// relayEnv makes the test binary a TCP relay ("listen-addr target-addr")
// instead of running tests: the latency benchmark's baseline process.
const relayEnv = "AMESH_MESHTEST_RELAY"

// startRelay runs a relay process inside ns until the benchmark ends.
func startRelay(tb testing.TB, ns *testnet.NS, listen, target netip.AddrPort) {
	tb.Helper()
	self, err := os.Executable()
	if err != nil {
		tb.Fatal(err)
	}
	cmd := exec.Command("ip", "netns", "exec", ns.Name, self)
	cmd.Env = append(os.Environ(), relayEnv+"="+listen.String()+" "+target.String())
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	})
	waitPort(tb, ns, listen.String())
}

// runRelay relays every connection accepted on the listen address to the
// target, copying each direction through a buffer in its own goroutine
// (no splice(2): a proxy that terminates TLS has to see the bytes), with
// half-close. It runs until killed.
func runRelay(spec string) int {
	listen, target, ok := strings.Cut(spec, " ")
	if !ok {
		fmt.Fprintf(os.Stderr, "relay: bad %s %q\n", relayEnv, spec)
		return 2
	}
	ln, err := net.Listen("tcp", listen)
	if err != nil {
		fmt.Fprintln(os.Stderr, "relay:", err)
		return 1
	}
	pipe := func(dst, src *net.TCPConn) {
		buf := make([]byte, 32<<10)
		_, _ = io.CopyBuffer(struct{ io.Writer }{dst}, struct{ io.Reader }{src}, buf)
		_ = dst.CloseWrite()
	}
	for {
		c, err := ln.Accept()
		if err != nil {
			fmt.Fprintln(os.Stderr, "relay:", err)
			return 1
		}
		go func() {
			defer c.Close()
			u, err := net.Dial("tcp", target)
			if err != nil {
				return
			}
			defer u.Close()
			done := make(chan struct{})
			go func() { pipe(u.(*net.TCPConn), c.(*net.TCPConn)); close(done) }()
			pipe(c.(*net.TCPConn), u.(*net.TCPConn))
			<-done
		}()
	}
}
