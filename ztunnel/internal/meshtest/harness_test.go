package meshtest

import (
	"bufio"
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/amesh-dev/amesh/api/bearer"
	"github.com/amesh-dev/amesh/api/ca"
	"github.com/amesh-dev/amesh/api/capture"
	discoveryv1 "github.com/amesh-dev/amesh/api/discovery/v1"
	"github.com/amesh-dev/amesh/api/xds"
	"github.com/amesh-dev/amesh/api/zds"
	zdsv1 "github.com/amesh-dev/amesh/api/zds/v1"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/amesh-dev/amesh/ztunnel/internal/netns"
	"github.com/amesh-dev/amesh/ztunnel/internal/testnet"
)

const (
	controllerName = "amesh-controller.amesh-system.svc"
	controllerAddr = "10.99.0.1:15012" // node1's end of the wire
	trustDomain    = "cluster.local"
)

// ztunnelBin is the ztunnel binary built once by TestMain.
var ztunnelBin string

func TestMain(m *testing.M) {
	os.Exit(runMain(m))
}

func runMain(m *testing.M) int {
	if spec := os.Getenv(relayEnv); spec != "" {
		return runRelay(spec)
	}
	if os.Geteuid() == 0 {
		dir, err := os.MkdirTemp("", "ztunnel-bin-")
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		defer os.RemoveAll(dir)
		bin := filepath.Join(dir, "ztunnel")
		// Built as it ships (the Dockerfile): static, without symbol
		// tables, without gRPC's tracing.
		cmd := exec.Command("go", "build", "-trimpath", "-tags", "grpcnotrace", "-ldflags=-s -w", "-o", bin, "../../cmd/ztunnel")
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		out, err := cmd.CombinedOutput()
		if err != nil {
			fmt.Fprintf(os.Stderr, "building ztunnel: %v\n%s", err, out)
			return 1
		}
		ztunnelBin = bin
	}
	return m.Run()
}

// Mesh is the test world: two nodes joined by a wire, a fake controller
// (the api module's real xDS and CA servers) on node1's wire address, one
// fake node agent per node, and a ztunnel process per node.
type Mesh struct {
	t     testing.TB
	dir   string
	Nodes []*testnet.Node
	Ctl   *Controller
	Agent map[*testnet.Node]*Agent
	Zt    map[*testnet.Node]*Ztunnel
}

// NewMesh builds the topology and starts the controller (no ztunnels).
func NewMesh(t testing.TB) *Mesh {
	testnet.RequireRoot(t)
	if ztunnelBin == "" {
		t.Skip("ztunnel binary not built")
	}
	m := &Mesh{t: t, dir: t.TempDir(), Agent: map[*testnet.Node]*Agent{}, Zt: map[*testnet.Node]*Ztunnel{}}
	n1, n2 := testnet.NewNode(t, 1), testnet.NewNode(t, 2)
	testnet.LinkNodes(t, n1, n2)
	m.Nodes = []*testnet.Node{n1, n2}
	m.Ctl = newController(t, m.dir, n1)
	for _, n := range m.Nodes {
		m.Agent[n] = newAgent(t, filepath.Join(m.dir, fmt.Sprintf("zds-%d.sock", n.Index)))
		m.Ctl.tokens[fmt.Sprintf("token-node%d", n.Index)] = nodeName(n)
	}
	return m
}

func nodeName(n *testnet.Node) string { return fmt.Sprintf("node%d", n.Index) }

// Pod is a test pod with its discovery workload.
type Pod struct {
	*testnet.Pod
	UID      string
	SA       string
	Enrolled bool
}

// ID is the pod's SPIFFE ID.
func (p *Pod) ID() spiffeid.ID {
	return spiffeid.RequireFromSegments(spiffeid.RequireTrustDomainFromString(trustDomain), "ns", "default", "sa", p.SA)
}

// Workload is the pod's discovery resource.
func (p *Pod) Workload() *discoveryv1.Workload {
	w := &discoveryv1.Workload{
		Uid: p.UID, Name: p.Name, Namespace: "default", ServiceAccount: p.SA, TrustDomain: trustDomain,
		Addresses: [][]byte{p.IP.AsSlice()}, Node: nodeName(p.Node), WorkloadName: p.Name, WorkloadType: "deployment",
		CanonicalName: p.Name, CanonicalRevision: "v1", ClusterId: "Kubernetes",
	}
	if p.Enrolled {
		w.TunnelProtocol = discoveryv1.TunnelProtocol_TUNNEL_PROTOCOL_HBONE
	}
	return w
}

// AddPod creates a pod running the echo app on 8080, publishes its
// workload, and, when enrolled, installs the capture rules and hands it to
// the node's agent.
func (m *Mesh) AddPod(n *testnet.Node, name string, enrolled bool) *Pod {
	m.t.Helper()
	p := &Pod{Pod: n.AddPod(m.t, name), UID: "uid-" + name, SA: name, Enrolled: enrolled}
	p.Echo(m.t, 8080)
	m.Ctl.SetWorkload(p.Workload())
	if enrolled {
		h := p.Open(m.t)
		if err := h.Do(func() error { return capture.Install(capture.Config{}) }); err != nil {
			m.t.Fatalf("capture rules in %s: %v", name, err)
		}
		m.Agent[n].Add(p)
	}
	return p
}

// StartZtunnel starts (or restarts) the node's ztunnel and waits until it
// is ready.
func (m *Mesh) StartZtunnel(n *testnet.Node) *Ztunnel {
	m.t.Helper()
	return m.StartZtunnelBin(n, ztunnelBin)
}

// StartZtunnelBin is StartZtunnel with another ztunnel binary (benchmarks
// compare builds).
func (m *Mesh) StartZtunnelBin(n *testnet.Node, bin string) *Ztunnel {
	m.t.Helper()
	z := startZtunnel(m.t, m.dir, n, m.Agent[n].path, bin)
	m.Zt[n] = z
	if err := z.WaitReady(10 * time.Second); err != nil {
		m.t.Fatalf("ztunnel on %s: %v\n%s", nodeName(n), err, z.Logs())
	}
	return z
}

// ---------------------------------------------------------------------
// Controller

// Controller is the fake control plane: a root CA, the CA service and the
// xDS server, served over TLS inside node1's namespace.
type Controller struct {
	t        testing.TB
	Root     *ca.Authority
	XDS      *xds.Server
	RootFile string

	grpc *grpc.Server

	mu        sync.Mutex
	tokens    map[string]string // bearer token → node name
	workloads map[string]*discoveryv1.Workload
}

// Stop takes the controller away: its server closes every stream.
func (c *Controller) Stop() { c.grpc.Stop() }

func newController(t testing.TB, dir string, host *testnet.Node) *Controller {
	td := spiffeid.RequireTrustDomainFromString(trustDomain)
	root, err := ca.NewRoot(td, 24*time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	c := &Controller{t: t, Root: root, RootFile: filepath.Join(dir, "root.pem"),
		tokens: map[string]string{}, workloads: map[string]*discoveryv1.Workload{}}
	if err := os.WriteFile(c.RootFile, root.RootsPEM(), 0o600); err != nil {
		t.Fatal(err)
	}
	log := zaptest.NewLogger(t, zaptest.Level(zap.WarnLevel))
	c.XDS = xds.NewServer(xds.ServerOptions{Authenticate: c.authenticate, Logger: log.Named("xds")})
	caSrv := ca.NewServer(root, ca.AuthorizerFunc(c.authorize), ca.ServerOptions{Logger: log.Named("ca")})

	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	chain, err := root.SignServer(key.Public(), []string{controllerName}, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	cert := tls.Certificate{PrivateKey: key, Leaf: chain[0]}
	for _, x := range chain {
		cert.Certificate = append(cert.Certificate, x.Raw)
	}
	g := grpc.NewServer(grpc.Creds(credentials.NewTLS(&tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12})))
	c.XDS.Register(g)
	caSrv.Register(g)
	h, err := netns.Open(host.Path)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	ln, err := h.Listen(context.Background(), "tcp", controllerAddr, netns.SockOpts{})
	if err != nil {
		t.Fatal(err)
	}
	c.grpc = g
	go func() { _ = g.Serve(ln) }()
	t.Cleanup(g.Stop)

	c.publish(discoveryv1.TrustBundleType, &xds.Resource{Name: trustDomain, Body: &discoveryv1.TrustBundle{
		TrustDomain: trustDomain, RootsPem: []string{string(root.RootsPEM())},
	}})
	for _, typ := range []string{discoveryv1.ServiceType, discoveryv1.WorkloadType, discoveryv1.AuthorizationType} {
		if err := c.XDS.Set(typ, nil); err != nil {
			t.Fatal(err)
		}
	}
	return c
}

type subscriber string

func (s subscriber) ID() string                       { return string(s) }
func (subscriber) Visible(string, *xds.Resource) bool { return true }

func (c *Controller) node(ctx context.Context) (string, error) {
	tok, err := bearer.FromIncoming(ctx)
	if err != nil {
		return "", err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	n, ok := c.tokens[tok]
	if !ok {
		return "", status.Error(codes.Unauthenticated, "unknown token")
	}
	return n, nil
}

func (c *Controller) authenticate(ctx context.Context, _ *corev3.Node) (xds.Subscriber, error) {
	n, err := c.node(ctx)
	if err != nil {
		return nil, err
	}
	return subscriber(n), nil
}

// authorize lets a ztunnel obtain the identities of pods on its node.
func (c *Controller) authorize(ctx context.Context, id spiffeid.ID) error {
	n, err := c.node(ctx)
	if err != nil {
		return err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, w := range c.workloads {
		if w.GetNode() == n && id.String() == fmt.Sprintf("spiffe://%s/ns/%s/sa/%s", trustDomain, w.GetNamespace(), w.GetServiceAccount()) {
			return nil
		}
	}
	return status.Errorf(codes.PermissionDenied, "no pod with identity %s on %s", id, n)
}

func (c *Controller) publish(typeURL string, r *xds.Resource) {
	c.t.Helper()
	if err := c.XDS.Update(typeURL, []*xds.Resource{r}, nil); err != nil {
		c.t.Fatal(err)
	}
}

// SetWorkload publishes a workload.
func (c *Controller) SetWorkload(w *discoveryv1.Workload) {
	c.mu.Lock()
	c.workloads[w.GetUid()] = w
	c.mu.Unlock()
	c.publish(discoveryv1.WorkloadType, &xds.Resource{Name: w.GetUid(), Body: w})
}

// Workload returns a copy of a published workload.
func (c *Controller) Workload(uid string) *discoveryv1.Workload {
	c.mu.Lock()
	defer c.mu.Unlock()
	return proto.Clone(c.workloads[uid]).(*discoveryv1.Workload)
}

// SetService publishes a service "default/<name>" with one VIP and port
// 80 → 8080, and makes the pods its endpoints.
func (c *Controller) SetService(name string, vip netip.Addr, pods ...*Pod) {
	c.SetServicePort(name, vip, 80, 8080, pods...)
}

// SetServicePort is SetService with another port mapping.
func (c *Controller) SetServicePort(name string, vip netip.Addr, port, target uint32, pods ...*Pod) {
	host := name + ".default.svc.cluster.local"
	full := "default/" + host
	c.publish(discoveryv1.ServiceType, &xds.Resource{Name: full, Body: &discoveryv1.Service{
		Name: name, Namespace: "default", Hostname: host, Addresses: [][]byte{vip.AsSlice()},
		Ports: []*discoveryv1.ServicePort{{Name: "tcp", ServicePort: port, TargetPort: target}},
	}})
	for _, p := range pods {
		w := p.Workload()
		c.mu.Lock()
		if old, ok := c.workloads[p.UID]; ok {
			w = proto.Clone(old).(*discoveryv1.Workload) // the published one may be in use
		}
		if w.Services == nil {
			w.Services = map[string]*discoveryv1.PortList{}
		}
		w.Services[full] = &discoveryv1.PortList{Ports: []*discoveryv1.Port{{ServicePort: port, TargetPort: target}}}
		c.mu.Unlock()
		c.SetWorkload(w)
	}
}

// SetPolicy publishes an authorization policy.
func (c *Controller) SetPolicy(a *discoveryv1.Authorization) {
	c.publish(discoveryv1.AuthorizationType, &xds.Resource{Name: a.GetNamespace() + "/" + a.GetName(), Body: a})
}

// DeletePolicy removes one.
func (c *Controller) DeletePolicy(name string) {
	c.t.Helper()
	if err := c.XDS.Update(discoveryv1.AuthorizationType, nil, []string{name}); err != nil {
		c.t.Fatal(err)
	}
}

// SetMtls changes a pod's PeerAuthentication mode.
func (c *Controller) SetMtls(p *Pod, mode discoveryv1.MtlsMode) {
	w := c.Workload(p.UID) // a copy: the published one may be in use
	w.MtlsMode = mode
	c.SetWorkload(w)
}

// ---------------------------------------------------------------------
// Node agent

// Agent is a fake node agent: it serves the ZDS socket, sends the current
// pods as a snapshot to every ztunnel that connects, then adds and deletes.
type Agent struct {
	t    testing.TB
	path string
	ln   *zds.Listener

	mu   sync.Mutex
	pods map[string]*Pod
	conn *zds.Conn
}

func newAgent(t testing.TB, path string) *Agent {
	ln, err := zds.Listen(path)
	if err != nil {
		t.Fatal(err)
	}
	a := &Agent{t: t, path: path, ln: ln, pods: map[string]*Pod{}}
	t.Cleanup(func() { ln.Close() })
	go a.serve()
	return a
}

func (a *Agent) serve() {
	for {
		c, err := a.ln.Accept()
		if err != nil {
			return
		}
		_ = c.SetDeadline(time.Now().Add(10 * time.Second))
		if m, err := c.RecvZtunnel(); err != nil || m.GetHello() == nil {
			c.Close()
			continue
		}
		a.mu.Lock()
		if a.conn != nil {
			a.conn.Close()
		}
		var err2 error
		for _, p := range a.pods {
			if err2 = a.sendAdd(c, p); err2 != nil {
				break
			}
		}
		if err2 == nil {
			err2 = exchange(c, &zdsv1.AgentMessage{Payload: &zdsv1.AgentMessage_SnapshotSent{SnapshotSent: &zdsv1.SnapshotSent{}}}, nil)
		}
		if err2 != nil {
			c.Close()
			a.conn = nil
		} else {
			_ = c.SetDeadline(time.Time{})
			a.conn = c
		}
		a.mu.Unlock()
	}
}

func (a *Agent) sendAdd(c *zds.Conn, p *Pod) error {
	f, err := os.Open(p.Path)
	if err != nil {
		return err
	}
	defer f.Close()
	return exchange(c, &zdsv1.AgentMessage{Payload: &zdsv1.AgentMessage_Add{Add: &zdsv1.AddWorkload{
		Uid: p.UID, Info: &zdsv1.WorkloadInfo{Name: p.Name, Namespace: "default", ServiceAccount: p.SA,
			Ips: []string{p.IP.String()}, Node: nodeName(p.Node)},
	}}}, f)
}

// exchange sends one message and waits for its ack.
func exchange(c *zds.Conn, m *zdsv1.AgentMessage, f *os.File) error {
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	if err := c.SendAgent(m, f); err != nil {
		return err
	}
	r, err := c.RecvZtunnel()
	if err != nil {
		return err
	}
	if e := r.GetAck().GetError(); e != "" {
		return errors.New(e)
	}
	return nil
}

// Add enrolls a pod (sent now if a ztunnel is connected, else in the next
// snapshot).
func (a *Agent) Add(p *Pod) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.pods[p.UID] = p
	if a.conn != nil {
		if err := a.sendAdd(a.conn, p); err != nil {
			a.t.Errorf("add %s: %v", p.Name, err)
		}
	}
}

// Delete removes a pod.
func (a *Agent) Delete(p *Pod) {
	a.mu.Lock()
	defer a.mu.Unlock()
	delete(a.pods, p.UID)
	if a.conn != nil {
		if err := exchange(a.conn, &zdsv1.AgentMessage{Payload: &zdsv1.AgentMessage_Delete{Delete: &zdsv1.DeleteWorkload{Uid: p.UID}}}, nil); err != nil {
			a.t.Errorf("delete %s: %v", p.Name, err)
		}
	}
}

// ---------------------------------------------------------------------
// ztunnel processes

// Ztunnel is a ztunnel process running in a node's namespace.
type Ztunnel struct {
	t    testing.TB
	node *testnet.Node
	cmd  *exec.Cmd
	logf string
	done chan struct{}
}

func startZtunnel(t testing.TB, dir string, n *testnet.Node, sock, bin string) *Ztunnel {
	t.Helper()
	tokenFile := filepath.Join(dir, fmt.Sprintf("token-%d", n.Index))
	if err := os.WriteFile(tokenFile, []byte(fmt.Sprintf("token-node%d\n", n.Index)), 0o600); err != nil {
		t.Fatal(err)
	}
	logf := filepath.Join(dir, fmt.Sprintf("ztunnel-%d-%d.log", n.Index, time.Now().UnixNano()))
	out, err := os.Create(logf)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("ip", "netns", "exec", n.Name, bin,
		"-controller", controllerAddr, "-controller-name", controllerName,
		"-root-cert", filepath.Join(dir, "root.pem"), "-token-file", tokenFile,
		"-zds-socket", sock, "-node-name", nodeName(n), "-pod-name", "ztunnel-"+nodeName(n),
		"-pod-namespace", "amesh-system", "-drain-timeout", "2s", "-log-level", "info")
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	z := &Ztunnel{t: t, node: n, cmd: cmd, logf: logf, done: make(chan struct{})}
	go func() {
		_ = cmd.Wait()
		out.Close()
		close(z.done)
	}()
	t.Cleanup(func() {
		z.Stop()
		if t.Failed() {
			t.Logf("ztunnel %s log:\n%s", nodeName(n), z.Logs())
		}
	})
	return z
}

// Logs returns the process output.
func (z *Ztunnel) Logs() string {
	b, _ := os.ReadFile(z.logf)
	return string(b)
}

// HTTP gets a URL path from the ztunnel's namespace (port 15000 admin,
// 15020 metrics, 15021 readiness).
func (z *Ztunnel) HTTP(port int, path string) (int, string, error) {
	h, err := netns.Open(z.node.Path)
	if err != nil {
		return 0, "", err
	}
	defer h.Close()
	cl := &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			return h.Dial(ctx, network, addr, netip.Addr{}, netns.SockOpts{})
		},
	}}
	defer cl.CloseIdleConnections()
	resp, err := cl.Get(fmt.Sprintf("http://127.0.0.1:%d%s", port, path))
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b), err
}

// WaitReady polls the readiness endpoint.
func (z *Ztunnel) WaitReady(timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	var last string
	for time.Now().Before(deadline) {
		select {
		case <-z.done:
			return errors.New("ztunnel exited")
		default:
		}
		code, body, err := z.HTTP(15021, "/healthz/ready")
		if err == nil && code == 200 {
			return nil
		}
		last = fmt.Sprint(code, " ", strings.TrimSpace(body), " ", err)
		time.Sleep(20 * time.Millisecond)
	}
	return fmt.Errorf("not ready after %s: %s", timeout, last)
}

// Kill kills the process with SIGKILL and waits for it.
func (z *Ztunnel) Kill() {
	_ = z.cmd.Process.Kill()
	<-z.done
}

// Stop sends SIGTERM and waits (SIGKILL after 10 s).
func (z *Ztunnel) Stop() {
	select {
	case <-z.done:
		return
	default:
	}
	_ = z.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-z.done:
	case <-time.After(10 * time.Second):
		z.Kill()
	}
}

// Pid is the process id of ztunnel itself (not of the ip wrapper, which
// execs it).
func (z *Ztunnel) Pid() int { return z.cmd.Process.Pid }

// ---------------------------------------------------------------------
// Packet capture

// Capture runs tcpdump on an interface of a namespace.
type Capture struct {
	file string
	cmd  *exec.Cmd
}

// StartCapture starts tcpdump and waits until it listens.
func StartCapture(t testing.TB, ns *testnet.NS, ifname string) *Capture {
	t.Helper()
	if _, err := exec.LookPath("tcpdump"); err != nil {
		t.Skip("needs tcpdump")
	}
	c := &Capture{file: filepath.Join(t.TempDir(), ifname+".pcap")}
	c.cmd = exec.Command("ip", "netns", "exec", ns.Name, "tcpdump", "-i", ifname, "--immediate-mode", "-U", "-s", "0", "-w", c.file, "tcp")
	stderr, err := c.cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := c.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Stop() })
	ready := make(chan struct{})
	go func() {
		sc := bufio.NewScanner(stderr)
		once := sync.Once{}
		for sc.Scan() {
			if strings.Contains(sc.Text(), "listening on") {
				once.Do(func() { close(ready) })
			}
		}
	}()
	select {
	case <-ready:
	case <-time.After(10 * time.Second):
		t.Fatal("tcpdump did not start")
	}
	return c
}

// Stop ends the capture and returns the pcap bytes.
func (c *Capture) Stop() []byte {
	if c.cmd.ProcessState == nil {
		_ = c.cmd.Process.Signal(syscall.SIGINT)
		_ = c.cmd.Wait()
	}
	b, _ := os.ReadFile(c.file)
	return b
}

// Dump renders the captured packets matching a tcpdump filter.
func (c *Capture) Dump(t testing.TB, filter string) string {
	t.Helper()
	out, err := exec.Command("tcpdump", "-nn", "-r", c.file, filter).CombinedOutput()
	if err != nil {
		t.Fatalf("tcpdump -r: %v", err)
	}
	return string(out)
}

// Count counts captured packets matching a tcpdump filter.
func (c *Capture) Count(t testing.TB, filter string) int {
	t.Helper()
	out, err := exec.Command("tcpdump", "-nn", "-r", c.file, filter).Output()
	if err != nil {
		t.Fatalf("tcpdump -r: %v", err)
	}
	return bytes.Count(out, []byte("\n"))
}
