// Package testnet builds throw-away network namespaces, veth pairs and
// addresses for ztunnel's tests. Every namespace gets a random suffix and
// is deleted when the test ends; interfaces are created directly inside
// test namespaces, so nothing touches the host's interfaces.
package testnet

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/amesh-dev/amesh/ztunnel/internal/netns"
)

// RequireRoot skips the test unless it runs as root with the ip tool.
func RequireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: creates network namespaces")
	}
	if _, err := exec.LookPath("ip"); err != nil {
		t.Skip("needs the ip tool (iproute2)")
	}
}

// Suffix returns a short random string for unique names.
func Suffix() string {
	b := make([]byte, 4)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// NS is a named network namespace (ip netns).
type NS struct {
	Name string
	Path string
}

// NewNS creates a namespace named prefix-<random> with loopback up.
func NewNS(t testing.TB, prefix string) *NS {
	t.Helper()
	name := prefix + "-" + Suffix()
	Run(t, "ip", "netns", "add", name)
	n := &NS{Name: name, Path: "/run/netns/" + name}
	t.Cleanup(func() {
		// Kill anything a test left running in it, then delete it.
		if out, err := exec.Command("ip", "netns", "pids", name).Output(); err == nil {
			for _, p := range strings.Fields(string(out)) {
				_ = exec.Command("kill", "-9", p).Run()
			}
		}
		if out, err := exec.Command("ip", "netns", "del", name).CombinedOutput(); err != nil {
			t.Logf("ip netns del %s: %v: %s", name, err, out)
		}
	})
	n.Run(t, "ip", "link", "set", "lo", "up")
	// No duplicate address detection on the test links: link-local
	// addresses are usable at once.
	n.Run(t, "sysctl", "-qw", "net.ipv6.conf.default.accept_dad=0", "net.ipv6.conf.all.accept_dad=0")
	return n
}

// Run runs a command in the namespace and fails the test on error.
func (n *NS) Run(t testing.TB, args ...string) string {
	t.Helper()
	return Run(t, append([]string{"ip", "netns", "exec", n.Name}, args...)...)
}

// Try runs a command in the namespace and returns its error.
func (n *NS) Try(args ...string) (string, error) {
	out, err := exec.Command("ip", append([]string{"netns", "exec", n.Name}, args...)...).CombinedOutput()
	return string(out), err
}

// Open opens the namespace; the handle is closed when the test ends.
func (n *NS) Open(t testing.TB) *netns.Namespace {
	t.Helper()
	h, err := netns.Open(n.Path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.Close() })
	return h
}

// Run runs a command and fails the test on error.
func Run(t testing.TB, args ...string) string {
	t.Helper()
	out, err := exec.Command(args[0], args[1:]...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

// Veth connects two namespaces with a veth pair created inside a (its peer
// moved to b) and brings both ends up.
func Veth(t testing.TB, a *NS, aIf string, b *NS, bIf string) {
	t.Helper()
	Run(t, "ip", "-n", a.Name, "link", "add", aIf, "type", "veth", "peer", "name", bIf, "netns", b.Name)
	Run(t, "ip", "-n", a.Name, "link", "set", aIf, "up")
	Run(t, "ip", "-n", b.Name, "link", "set", bIf, "up")
}

// AddAddr adds an address (CIDR) to an interface of the namespace.
func (n *NS) AddAddr(t testing.TB, ifname, cidr string) {
	t.Helper()
	Run(t, "ip", "-n", n.Name, "addr", "add", cidr, "dev", ifname)
}

// Iproute runs "ip -n <ns> args...".
func (n *NS) Iproute(t testing.TB, args ...string) string {
	t.Helper()
	return Run(t, append([]string{"ip", "-n", n.Name}, args...)...)
}

// Node is a "node": a namespace routing for the pods attached to it, in
// the pod subnet 10.244.<Index>.0/24 with gateway 10.244.<Index>.1.
type Node struct {
	*NS
	Index int
	pods  int
}

// Pod is a pod namespace attached to a node with a point-to-point veth
// (as the CNI ptp plugin does): eth0 holds IP/32 and routes through the
// node's gateway address.
type Pod struct {
	*NS
	Name string
	IP   netip.Addr
	IP6  netip.Addr // fd00:244:<node>::<n>
	Node *Node
}

// NewNode creates a node namespace with forwarding on.
func NewNode(t testing.TB, index int) *Node {
	t.Helper()
	n := &Node{NS: NewNS(t, fmt.Sprintf("ztn-node%d", index)), Index: index}
	n.Run(t, "sysctl", "-qw", "net.ipv4.ip_forward=1")
	n.Run(t, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
	return n
}

// Gateway6 is the node's IPv6 address toward its pods.
func (n *Node) Gateway6() netip.Addr {
	return netip.MustParseAddr(fmt.Sprintf("fd00:244:%d::1", n.Index))
}

// Gateway is the node's address toward its pods.
func (n *Node) Gateway() netip.Addr { return netip.AddrFrom4([4]byte{10, 244, byte(n.Index), 1}) }

// AddPod creates a pod namespace attached to the node.
func (n *Node) AddPod(t testing.TB, name string) *Pod {
	t.Helper()
	n.pods++
	if n.pods > 250 {
		t.Fatal("too many pods on one node")
	}
	ip := netip.AddrFrom4([4]byte{10, 244, byte(n.Index), byte(n.pods + 1)})
	ip6 := netip.MustParseAddr(fmt.Sprintf("fd00:244:%d::%x", n.Index, n.pods+1))
	p := &Pod{NS: NewNS(t, "ztn-"+name), Name: name, IP: ip, IP6: ip6, Node: n}
	hostIf := fmt.Sprintf("vp%d", n.pods)
	Veth(t, p.NS, "eth0", n.NS, hostIf)
	gw, gw6 := n.Gateway().String(), n.Gateway6().String()
	p.Iproute(t, "addr", "add", ip.String()+"/32", "dev", "eth0")
	p.Iproute(t, "route", "add", gw, "dev", "eth0", "scope", "link")
	p.Iproute(t, "route", "add", "default", "via", gw, "dev", "eth0")
	p.Iproute(t, "-6", "addr", "add", ip6.String()+"/128", "dev", "eth0", "nodad")
	p.Iproute(t, "-6", "route", "add", gw6, "dev", "eth0")
	p.Iproute(t, "-6", "route", "add", "default", "via", gw6, "dev", "eth0")
	n.Iproute(t, "addr", "add", gw+"/32", "dev", hostIf)
	n.Iproute(t, "route", "add", ip.String()+"/32", "dev", hostIf, "scope", "link")
	n.Iproute(t, "-6", "addr", "add", gw6+"/128", "dev", hostIf, "nodad")
	n.Iproute(t, "-6", "route", "add", ip6.String()+"/128", "dev", hostIf)
	return p
}

// HostIf is the node-side interface name of the pod's veth.
func (p *Pod) HostIf() string {
	return fmt.Sprintf("vp%d", int(p.IP.As4()[3])-1)
}

// LinkNodes joins two nodes with a veth (10.99.0.1 on a, 10.99.0.2 on b)
// and routes each one's pod subnet through it. The interface on a is
// named "wire".
func LinkNodes(t testing.TB, a, b *Node) {
	t.Helper()
	Veth(t, a.NS, "wire", b.NS, "wire")
	a.AddAddr(t, "wire", "10.99.0.1/30")
	b.AddAddr(t, "wire", "10.99.0.2/30")
	a.Iproute(t, "route", "add", fmt.Sprintf("10.244.%d.0/24", b.Index), "via", "10.99.0.2")
	b.Iproute(t, "route", "add", fmt.Sprintf("10.244.%d.0/24", a.Index), "via", "10.99.0.1")
}

// Echo serves an echo application inside the namespace on port: it first
// writes "hello <client ip>\n", echoes everything until the client
// half-closes, then writes "bye\n" and closes. It stops at the end of the
// test.
func (n *NS) Echo(t testing.TB, port int) {
	t.Helper()
	h, err := netns.Open(n.Path)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	ln, err := h.Listen(context.Background(), "tcp", fmt.Sprintf(":%d", port), netns.SockOpts{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				ra := c.RemoteAddr().(*net.TCPAddr).AddrPort().Addr().Unmap()
				fmt.Fprintf(c, "hello %s\n", ra)
				_, _ = io.Copy(c, c)
				_, _ = io.WriteString(c, "bye\n")
			}()
		}
	}()
}

// Converse connects from inside the namespace (an application socket: no
// mark) to addr, reads the greeting, sends payload, half-closes and reads
// the rest. It returns the client IP the server saw and the echoed bytes.
func (n *NS) Converse(addr string, payload []byte) (seen string, echoed []byte, err error) {
	h, err := netns.Open(n.Path)
	if err != nil {
		return "", nil, err
	}
	defer h.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := h.Dial(ctx, "tcp", addr, netip.Addr{}, netns.SockOpts{})
	if err != nil {
		return "", nil, err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	r := bufio.NewReader(c)
	line, err := r.ReadString('\n')
	if err != nil {
		return "", nil, fmt.Errorf("greeting: %w", err)
	}
	seen = strings.TrimPrefix(strings.TrimSpace(line), "hello ")
	werr := make(chan error, 1)
	go func() {
		_, err := c.Write(payload)
		if err == nil {
			err = c.(*net.TCPConn).CloseWrite()
		}
		werr <- err
	}()
	rest, err := io.ReadAll(r)
	if err != nil {
		return seen, nil, fmt.Errorf("reading echo: %w", err)
	}
	if err := <-werr; err != nil {
		return seen, nil, fmt.Errorf("writing: %w", err)
	}
	if !bytes.HasSuffix(rest, []byte("bye\n")) {
		return seen, rest, fmt.Errorf("no bye after half-close (got %d bytes)", len(rest))
	}
	return seen, bytes.TrimSuffix(rest, []byte("bye\n")), nil
}
