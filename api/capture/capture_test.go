package capture

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"runtime"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// Test topology: a "pod" netns and a "node" netns joined by a veth pair.
// Every address lives only inside these two namespaces.
var (
	nodeIP  = netip.MustParseAddr("198.18.0.1")
	podIP   = netip.MustParseAddr("198.18.0.2")
	otherIP = netip.MustParseAddr("198.18.0.3") // a second address of the node netns
	nodeIP6 = netip.MustParseAddr("fd00:a5e5::1")
	podIP6  = netip.MustParseAddr("fd00:a5e5::2")
)

func needRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: creates network namespaces and nftables rules")
	}
}

// inNS runs fn on a fresh locked OS thread that has entered ns. The thread
// is never unlocked, so Go discards it afterwards.
func inNS(ns netns.NsHandle, fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		if err := netns.Set(ns); err != nil {
			errc <- fmt.Errorf("setns: %w", err)
			return
		}
		errc <- fn()
	}()
	return <-errc
}

func newNS(t testing.TB) netns.NsHandle {
	t.Helper()
	var h netns.NsHandle
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread dies with the goroutine
		n, err := netns.New()
		h = n
		errc <- err
	}()
	if err := <-errc; err != nil {
		t.Fatalf("new netns: %v", err)
	}
	t.Cleanup(func() { h.Close() })
	return h
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

func prefix(a netip.Addr, bits int) *netlink.Addr {
	return &netlink.Addr{IPNet: &net.IPNet{IP: a.AsSlice(), Mask: net.CIDRMask(bits, a.BitLen())}, Flags: unix.IFA_F_NODAD}
}

// topology returns (pod, node) namespaces wired with a veth pair.
func topology(t *testing.T) (pod, node netns.NsHandle) {
	t.Helper()
	pod, node = newNS(t), newNS(t)
	must(t, inNS(node, func() error {
		lo, err := netlink.LinkByName("lo")
		if err != nil {
			return err
		}
		return netlink.LinkSetUp(lo)
	}))
	must(t, inNS(pod, func() error {
		lo, err := netlink.LinkByName("lo")
		if err != nil {
			return err
		}
		if err := netlink.LinkSetUp(lo); err != nil {
			return err
		}
		veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "eth0"}, PeerName: "veth0", PeerNamespace: netlink.NsFd(node)}
		if err := netlink.LinkAdd(veth); err != nil {
			return fmt.Errorf("veth: %w", err)
		}
		eth, err := netlink.LinkByName("eth0")
		if err != nil {
			return err
		}
		for _, a := range []*netlink.Addr{prefix(podIP, 24), prefix(podIP6, 64)} {
			if err := netlink.AddrAdd(eth, a); err != nil {
				return err
			}
		}
		if err := netlink.LinkSetUp(eth); err != nil {
			return err
		}
		for _, gw := range []netip.Addr{nodeIP, nodeIP6} {
			if err := netlink.RouteAdd(&netlink.Route{LinkIndex: eth.Attrs().Index, Gw: gw.AsSlice()}); err != nil {
				return fmt.Errorf("default route via %v: %w", gw, err)
			}
		}
		return nil
	}))
	must(t, inNS(node, func() error {
		peer, err := netlink.LinkByName("veth0")
		if err != nil {
			return err
		}
		for _, a := range []*netlink.Addr{prefix(nodeIP, 24), prefix(otherIP, 24), prefix(nodeIP6, 64)} {
			if err := netlink.AddrAdd(peer, a); err != nil {
				return err
			}
		}
		return netlink.LinkSetUp(peer)
	}))
	return pod, node
}

// serve accepts on ln until it is closed and answers every connection with
// one line: "<name> <original destination or -> <remote address>". (A
// connection that was not redirected reports its own destination as the
// original one: conntrack tracks it too.)
func serve(t *testing.T, ln net.Listener, name string) {
	t.Helper()
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			od := "-"
			if a, err := OriginalDestination(c.(*net.TCPConn)); err == nil {
				od = a.String()
			}
			fmt.Fprintf(c, "%s %s %s\n", name, od, c.RemoteAddr())
			c.Close()
		}
	}()
}

func listen(t *testing.T, ns netns.NsHandle, addr, name string) {
	t.Helper()
	var ln net.Listener
	must(t, inNS(ns, func() (err error) {
		ln, err = net.Listen("tcp", addr)
		return err
	}))
	serve(t, ln, name)
}

// ask connects from inside ns to addr (with the dialer d) and returns the
// answering listener's line.
func ask(ns netns.NsHandle, d *net.Dialer, addr string) (string, error) {
	var c net.Conn
	if err := inNS(ns, func() (err error) {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		c, err = d.DialContext(ctx, "tcp", addr)
		return err
	}); err != nil {
		return "", err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(2 * time.Second))
	line, err := bufio.NewReader(c).ReadString('\n')
	return strings.TrimSpace(line), err
}

func TestInstallCheckRemove(t *testing.T) {
	needRoot(t)
	pod, _ := topology(t)
	cfg := Config{ProbeSources: []netip.Addr{nodeIP, nodeIP6}, ProbePorts: []uint16{8081, 9000}}
	other := Config{ProbeSources: []netip.Addr{nodeIP}, ProbePorts: []uint16{8081}}
	steps := []struct {
		name string
		do   func() error
		// expected Check results for cfg and other afterwards
		cfgErr, otherErr error
	}{
		{"initially absent", func() error { return nil }, ErrNotInstalled, ErrNotInstalled},
		{"remove absent", Remove, ErrNotInstalled, ErrNotInstalled},
		{"install", func() error { return Install(cfg) }, nil, ErrMismatch},
		{"install again", func() error { return Install(cfg) }, nil, ErrMismatch},
		{"install reordered duplicates", func() error {
			return Install(Config{ProbeSources: []netip.Addr{nodeIP6, nodeIP, nodeIP}, ProbePorts: []uint16{9000, 8081, 9000}})
		}, nil, ErrMismatch},
		{"replace", func() error { return Install(other) }, ErrMismatch, nil},
		{"remove", Remove, ErrNotInstalled, ErrNotInstalled},
		{"remove again", Remove, ErrNotInstalled, ErrNotInstalled},
		{"install after remove", func() error { return Install(cfg) }, nil, ErrMismatch},
	}
	for _, s := range steps {
		must(t, inNS(pod, func() error {
			if err := s.do(); err != nil {
				return fmt.Errorf("%s: %w", s.name, err)
			}
			if err := Check(cfg); !errors.Is(err, s.cfgErr) {
				return fmt.Errorf("%s: Check(cfg) = %v, want %v", s.name, err, s.cfgErr)
			}
			if err := Check(other); !errors.Is(err, s.otherErr) {
				return fmt.Errorf("%s: Check(other) = %v, want %v", s.name, err, s.otherErr)
			}
			return nil
		}))
	}
	// After a final Remove nothing of ours is left: no table, rule or route.
	must(t, inNS(pod, func() error {
		if err := Remove(); err != nil {
			return err
		}
		for _, fam := range []int{netlink.FAMILY_V4, netlink.FAMILY_V6} {
			rules, err := netlink.RuleList(fam)
			if err != nil {
				return err
			}
			for _, r := range rules {
				if r.Table == RouteTable {
					return fmt.Errorf("rule left behind: %v", r)
				}
			}
			routes, err := netlink.RouteListFiltered(fam, &netlink.Route{Table: RouteTable}, netlink.RT_FILTER_TABLE)
			if err != nil {
				return err
			}
			if len(routes) > 0 {
				return fmt.Errorf("routes left behind: %v", routes)
			}
		}
		return nil
	}))
}

func TestCheckDetectsTampering(t *testing.T) {
	needRoot(t)
	pod, _ := topology(t)
	cfg := Config{ProbeSources: []netip.Addr{nodeIP}, ProbePorts: []uint16{8081}}
	must(t, inNS(pod, func() error {
		if err := Install(cfg); err != nil {
			return err
		}
		// Someone deletes the reply-routing rule: Check notices.
		if err := netlink.RuleDel(replyRule(unix.AF_INET)); err != nil {
			return err
		}
		if err := Check(cfg); !errors.Is(err, ErrMismatch) {
			return fmt.Errorf("Check after rule deletion = %v, want ErrMismatch", err)
		}
		if err := Install(cfg); err != nil {
			return err
		}
		return Check(cfg)
	}))
}

func TestValidate(t *testing.T) {
	for _, tc := range []struct {
		name string
		cfg  Config
		ok   bool
	}{
		{"zero", Config{}, true},
		{"probes", Config{ProbeSources: []netip.Addr{nodeIP, nodeIP6}, ProbePorts: []uint16{80}}, true},
		{"invalid source", Config{ProbeSources: []netip.Addr{{}}}, false},
		{"unspecified source", Config{ProbeSources: []netip.Addr{netip.IPv4Unspecified()}}, false},
		{"port 0", Config{ProbePorts: []uint16{0}}, false},
		{"hbone port", Config{ProbePorts: []uint16{InboundHBONEPort}}, false},
		{"outbound port", Config{ProbePorts: []uint16{OutboundPort}}, false},
	} {
		if err := tc.cfg.Validate(); (err == nil) != tc.ok {
			t.Errorf("%s: Validate() = %v, want ok=%v", tc.name, err, tc.ok)
		}
	}
}

func hostPort(a netip.Addr, p uint16) string { return netip.AddrPortFrom(a, p).String() }

func TestOutboundCapture(t *testing.T) {
	needRoot(t)
	pod, node := topology(t)
	must(t, inNS(pod, func() error { return Install(Config{}) }))
	listen(t, pod, fmt.Sprintf("[::]:%d", OutboundPort), "ztunnel-outbound")
	listen(t, pod, "127.0.0.1:9090", "pod-local")
	listen(t, node, "[::]:8080", "node-app")

	plain := &net.Dialer{}
	marked := &net.Dialer{Control: MarkSocket}
	for _, tc := range []struct {
		name   string
		dialer *net.Dialer
		addr   string
		want   string // prefix of the answer
	}{
		{"outbound v4 captured", plain, hostPort(nodeIP, 8080), "ztunnel-outbound " + hostPort(nodeIP, 8080)},
		{"outbound v6 captured", plain, hostPort(nodeIP6, 8080), "ztunnel-outbound " + hostPort(nodeIP6, 8080)},
		{"outbound other port captured", plain, hostPort(nodeIP, 443), "ztunnel-outbound " + hostPort(nodeIP, 443)},
		{"marked socket bypasses", marked, hostPort(nodeIP, 8080), "node-app "},
		{"marked socket bypasses v6", marked, hostPort(nodeIP6, 8080), "node-app "},
		{"loopback not captured", plain, "127.0.0.1:9090", "pod-local "},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := ask(pod, tc.dialer, tc.addr)
			if err != nil {
				t.Fatalf("connect %s: %v", tc.addr, err)
			}
			if !strings.HasPrefix(got, tc.want) {
				t.Fatalf("connect %s answered %q, want prefix %q", tc.addr, got, tc.want)
			}
		})
	}

	// Without the rules the same connection reaches the node directly.
	must(t, inNS(pod, Remove))
	got, err := ask(pod, plain, hostPort(nodeIP, 8080))
	if err != nil || !strings.HasPrefix(got, "node-app") {
		t.Fatalf("after Remove: %q, %v; want node-app", got, err)
	}
}

func TestInboundCapture(t *testing.T) {
	needRoot(t)
	pod, node := topology(t)
	cfg := Config{ProbeSources: []netip.Addr{nodeIP, nodeIP6}, ProbePorts: []uint16{8081}}
	must(t, inNS(pod, func() error { return Install(cfg) }))
	listen(t, pod, fmt.Sprintf("[::]:%d", InboundPlaintextPort), "ztunnel-inbound")
	listen(t, pod, fmt.Sprintf("[::]:%d", InboundHBONEPort), "ztunnel-hbone")
	listen(t, pod, "[::]:8081", "app-probe")
	listen(t, pod, "[::]:8082", "app")

	from := func(a netip.Addr) *net.Dialer {
		return &net.Dialer{LocalAddr: &net.TCPAddr{IP: a.AsSlice()}}
	}
	for _, tc := range []struct {
		name   string
		dialer *net.Dialer
		addr   string
		want   string
	}{
		{"app port captured", from(nodeIP), hostPort(podIP, 8082), "ztunnel-inbound " + hostPort(podIP, 8082)},
		{"app port captured v6", from(nodeIP6), hostPort(podIP6, 8082), "ztunnel-inbound " + hostPort(podIP6, 8082)},
		{"hbone not captured", from(nodeIP), hostPort(podIP, InboundHBONEPort), "ztunnel-hbone "},
		{"probe from node passes", from(nodeIP), hostPort(podIP, 8081), "app-probe "},
		{"probe from node passes v6", from(nodeIP6), hostPort(podIP6, 8081), "app-probe "},
		{"probe port from elsewhere captured", from(otherIP), hostPort(podIP, 8081), "ztunnel-inbound " + hostPort(podIP, 8081)},
		{"other port from node captured", from(nodeIP), hostPort(podIP, 8082), "ztunnel-inbound"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := ask(node, tc.dialer, tc.addr)
			if err != nil {
				t.Fatalf("connect %s: %v", tc.addr, err)
			}
			if !strings.HasPrefix(got, tc.want) {
				t.Fatalf("connect %s answered %q, want prefix %q", tc.addr, got, tc.want)
			}
		})
	}
}

// transparentDialer dials like ztunnel's inbound path: marked, with the
// original client's address as source (IP_TRANSPARENT).
func transparentDialer(src netip.Addr) *net.Dialer {
	return &net.Dialer{
		LocalAddr: &net.TCPAddr{IP: src.AsSlice()},
		Control: func(network, address string, c syscall.RawConn) error {
			if err := MarkSocket(network, address, c); err != nil {
				return err
			}
			var serr error
			err := c.Control(func(fd uintptr) {
				if strings.HasSuffix(network, "6") {
					serr = unix.SetsockoptInt(int(fd), unix.SOL_IPV6, unix.IPV6_TRANSPARENT, 1)
				} else {
					serr = unix.SetsockoptInt(int(fd), unix.SOL_IP, unix.IP_TRANSPARENT, 1)
				}
			})
			if err != nil {
				return err
			}
			return serr
		},
	}
}

func TestReplyRouting(t *testing.T) {
	needRoot(t)
	pod, _ := topology(t)
	must(t, inNS(pod, func() error { return Install(Config{}) }))
	listen(t, pod, "[::]:7000", "app")

	// ztunnel connects to the app with the remote client's address; the
	// app sees that address and its answer comes back to ztunnel.
	for _, tc := range []struct {
		src, dst netip.Addr
	}{{nodeIP, podIP}, {nodeIP6, podIP6}} {
		got, err := ask(pod, transparentDialer(tc.src), hostPort(tc.dst, 7000))
		if err != nil {
			t.Fatalf("transparent connect from %v: %v", tc.src, err)
		}
		fields := strings.Fields(got)
		if len(fields) != 3 || fields[0] != "app" {
			t.Fatalf("answer %q", got)
		}
		if ap, err := netip.ParseAddrPort(fields[2]); err != nil || ap.Addr().Unmap() != tc.src {
			t.Fatalf("app saw client %s, want %v", fields[2], tc.src)
		}
	}

	// Without the rules the app's answer leaves through eth0 and the
	// transparent connection cannot complete.
	must(t, inNS(pod, Remove))
	if got, err := ask(pod, transparentDialer(nodeIP), hostPort(podIP, 7000)); err == nil {
		t.Fatalf("transparent connect without reply routing succeeded: %q", got)
	}
}

func TestIPv6Disabled(t *testing.T) {
	needRoot(t)
	pod := newNS(t)
	must(t, inNS(pod, func() error {
		for _, f := range []string{"all", "default", "lo"} {
			if err := os.WriteFile("/proc/sys/net/ipv6/conf/"+f+"/disable_ipv6", []byte("1"), 0o644); err != nil {
				return err
			}
		}
		if err := Install(Config{}); err != nil {
			return err
		}
		if err := Check(Config{}); err != nil {
			return err
		}
		if err := Remove(); err != nil {
			return err
		}
		if err := Check(Config{}); !errors.Is(err, ErrNotInstalled) {
			return fmt.Errorf("Check after Remove = %v", err)
		}
		return nil
	}))
}

// greet accepts on ln until it is closed; every connection gets one line,
// "<name> <original destination or ->", and stays open until the peer
// closes it.
func greet(t *testing.T, ln net.Listener, name string) {
	t.Helper()
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				od := "-"
				if a, err := OriginalDestination(c.(*net.TCPConn)); err == nil {
					od = a.String()
				}
				if _, err := fmt.Fprintf(c, "%s %s\n", name, od); err != nil {
					return
				}
				_, _ = io.Copy(io.Discard, c)
			}()
		}
	}()
}

// flow is one long-lived TCP connection whose two ends the test holds.
type flow struct {
	name           string
	client, server net.Conn
}

// openFlow listens on listen ("" = addr) inside serverNS, connects to
// addr from inside clientNS with d and returns both ends.
func openFlow(t *testing.T, name string, clientNS, serverNS netns.NsHandle, d *net.Dialer, listen, addr string) *flow {
	t.Helper()
	if listen == "" {
		listen = addr
	}
	var ln net.Listener
	must(t, inNS(serverNS, func() (err error) {
		ln, err = net.Listen("tcp", listen)
		return err
	}))
	defer ln.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			close(accepted)
			return
		}
		accepted <- c
	}()
	var c net.Conn
	must(t, inNS(clientNS, func() (err error) {
		// Generous: the first IPv6 SYN on a fresh veth may be lost while
		// neighbour discovery settles (retransmitted after 1s).
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		c, err = d.DialContext(ctx, "tcp", addr)
		return err
	}))
	t.Cleanup(func() { c.Close() })
	s, ok := <-accepted
	if !ok {
		t.Fatalf("%s: accept failed", name)
	}
	t.Cleanup(func() { s.Close() })
	return &flow{name: name, client: c, server: s}
}

// send writes one line from one end and reads it at the other.
func send(from, to net.Conn, msg string) error {
	deadline := time.Now().Add(2 * time.Second)
	_ = from.SetDeadline(deadline)
	_ = to.SetDeadline(deadline)
	if _, err := fmt.Fprintf(from, "%s\n", msg); err != nil {
		return fmt.Errorf("write: %w", err)
	}
	got, err := bufio.NewReader(to).ReadString('\n')
	if err != nil {
		return fmt.Errorf("read: %w", err)
	}
	if got = strings.TrimSpace(got); got != msg {
		return fmt.Errorf("received %q, want %q", got, msg)
	}
	return nil
}

// exchange sends a line each way, the server first when serverFirst: the
// first packet conntrack sees of a flow may come from either end.
func (f *flow) exchange(msg string, serverFirst bool) error {
	a, b := f.client, f.server
	if serverFirst {
		a, b = b, a
	}
	if err := send(a, b, msg); err != nil {
		return err
	}
	return send(b, a, msg+" (reply)")
}

// TestOpenConnectionsSurviveInstall: connections a pod had open before
// its capture rules arrived keep their path (they are neither redirected
// nor reset mid-stream), whichever end speaks first afterwards, while
// new connections are captured. Every flow, captured or not, keeps
// working when the rules are replaced (Install again, another Config).
func TestOpenConnectionsSurviveInstall(t *testing.T) {
	needRoot(t)
	pod, node := topology(t)
	from := func(a netip.Addr) *net.Dialer { return &net.Dialer{LocalAddr: &net.TCPAddr{IP: a.AsSlice()}} }
	var old []*flow
	for i, f := range []struct {
		name           string
		client, server netns.NsHandle
		d              *net.Dialer
		listen, addr   string
	}{
		{"outbound v4", pod, node, &net.Dialer{}, "", hostPort(nodeIP, 8080)},
		{"outbound v6", pod, node, &net.Dialer{}, "", hostPort(nodeIP6, 8081)},
		{"inbound v4", node, pod, from(nodeIP), "", hostPort(podIP, 8082)},
		{"inbound v6", node, pod, from(nodeIP6), "", hostPort(podIP6, 8083)},
		// An IPv6 socket of the pod carrying IPv4 (v4-mapped addresses).
		{"inbound v4 to a dual-stack listener", node, pod, from(otherIP), "[::]:8084", hostPort(podIP, 8084)},
		{"outbound v4, server speaks first", pod, node, &net.Dialer{}, "", hostPort(nodeIP, 8085)},
		{"inbound v6, server speaks first", node, pod, from(nodeIP6), "", hostPort(podIP6, 8086)},
	} {
		fl := openFlow(t, f.name, f.client, f.server, f.d, f.listen, f.addr)
		if err := fl.exchange(fmt.Sprint("before ", i), false); err != nil {
			t.Fatalf("%s before Install: %v", f.name, err)
		}
		old = append(old, fl)
	}

	must(t, inNS(pod, func() error {
		return Install(Config{ProbeSources: []netip.Addr{nodeIP, nodeIP6}, ProbePorts: []uint16{8081}})
	}))
	for _, f := range old {
		serverFirst := strings.Contains(f.name, "server speaks first")
		if err := f.exchange("after install", serverFirst); err != nil {
			t.Errorf("%s, opened before Install: %v", f.name, err)
		}
	}

	// New connections are captured, with their original destination.
	for _, port := range []int{OutboundPort, InboundPlaintextPort} {
		var ln net.Listener
		must(t, inNS(pod, func() (err error) {
			ln, err = net.Listen("tcp", fmt.Sprintf("[::]:%d", port))
			return err
		}))
		greet(t, ln, fmt.Sprint("ztunnel-", port))
	}
	type captured struct {
		c    net.Conn
		want string
	}
	var fresh []captured
	for _, f := range []struct {
		ns   netns.NsHandle
		d    *net.Dialer
		addr string
		want string
	}{
		{pod, &net.Dialer{}, hostPort(nodeIP, 8080), fmt.Sprint("ztunnel-", OutboundPort, " ", hostPort(nodeIP, 8080))},
		{node, from(nodeIP), hostPort(podIP, 8082), fmt.Sprint("ztunnel-", InboundPlaintextPort, " ", hostPort(podIP, 8082))},
	} {
		var c net.Conn
		must(t, inNS(f.ns, func() (err error) {
			c, err = f.d.Dial("tcp", f.addr)
			return err
		}))
		t.Cleanup(func() { c.Close() })
		_ = c.SetDeadline(time.Now().Add(2 * time.Second))
		line, err := bufio.NewReader(c).ReadString('\n')
		if got := strings.TrimSpace(line); err != nil || got != f.want {
			t.Errorf("new connection to %s: %q, %v; want %q", f.addr, got, err, f.want)
		}
		fresh = append(fresh, captured{c, f.want})
	}

	// Replacing the rules keeps every flow where it is.
	must(t, inNS(pod, func() error { return Install(Config{ProbeSources: []netip.Addr{nodeIP}, ProbePorts: []uint16{9000}}) }))
	for _, f := range old {
		if err := f.exchange("after reinstall", false); err != nil {
			t.Errorf("%s after the rules were replaced: %v", f.name, err)
		}
	}
	for _, f := range fresh {
		// The greeter reads and discards: a write succeeds, and the
		// connection is still open (no reset) when read from.
		_ = f.c.SetDeadline(time.Now().Add(300 * time.Millisecond))
		if _, err := f.c.Write([]byte("still there\n")); err != nil {
			t.Errorf("captured connection (%s) after the rules were replaced: %v", f.want, err)
		}
		var b [1]byte
		if _, err := f.c.Read(b[:]); !errors.Is(err, os.ErrDeadlineExceeded) {
			t.Errorf("captured connection (%s) after the rules were replaced: read %v, want a timeout (open, silent)", f.want, err)
		}
	}
}

// sniffer collects every frame seen on one interface of a namespace (an
// AF_PACKET socket), to prove what did or did not go on the wire.
type sniffer struct {
	fd   int
	mu   sync.Mutex
	data []byte
	done chan struct{}
}

func sniff(t *testing.T, ns netns.NsHandle, ifname string) *sniffer {
	t.Helper()
	s := &sniffer{done: make(chan struct{})}
	proto := int(htons(unix.ETH_P_ALL))
	must(t, inNS(ns, func() error {
		link, err := netlink.LinkByName(ifname)
		if err != nil {
			return err
		}
		fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, proto)
		if err != nil {
			return fmt.Errorf("packet socket: %w", err)
		}
		s.fd = fd
		if err := unix.Bind(fd, &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_ALL), Ifindex: link.Attrs().Index}); err != nil {
			return fmt.Errorf("bind packet socket: %w", err)
		}
		tv := unix.NsecToTimeval((50 * time.Millisecond).Nanoseconds())
		return unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv)
	}))
	go func() {
		defer close(s.done)
		buf := make([]byte, 65536)
		for {
			n, _, err := unix.Recvfrom(s.fd, buf, 0)
			if err != nil && !errors.Is(err, unix.EAGAIN) && !errors.Is(err, unix.EINTR) {
				return
			}
			if n > 0 {
				s.mu.Lock()
				s.data = append(s.data, buf[:n]...)
				s.mu.Unlock()
			}
		}
	}()
	t.Cleanup(func() { unix.Shutdown(s.fd, unix.SHUT_RDWR); unix.Close(s.fd); <-s.done })
	return s
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }

// saw reports whether marker appeared in any frame so far.
func (s *sniffer) saw(marker string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return bytes.Contains(s.data, []byte(marker))
}

// TestCapturedConnectionFailsClosed: a captured connection whose
// conntrack entry is gone (flushed here; in life it expires, say while
// the application holds a half-closed connection) is never sent on to its
// original destination in plaintext: its next packet is captured again —
// the connection carries on through ztunnel while ztunnel holds it, and
// is reset once ztunnel has closed it. A connection open before Install
// keeps its direct path through the same loss.
func TestCapturedConnectionFailsClosed(t *testing.T) {
	needRoot(t)
	pod, node := topology(t)
	pre := openFlow(t, "pre-existing", pod, node, &net.Dialer{}, "", hostPort(nodeIP, 8088))
	must(t, inNS(pod, func() error { return Install(Config{}) }))
	// ztunnel's outbound listener: it keeps every accepted connection.
	var zln net.Listener
	must(t, inNS(pod, func() (err error) {
		zln, err = net.Listen("tcp", fmt.Sprintf("[::]:%d", OutboundPort))
		return err
	}))
	t.Cleanup(func() { zln.Close() })
	accepted := make(chan net.Conn, 4)
	go func() {
		for {
			c, err := zln.Accept()
			if err != nil {
				return
			}
			t.Cleanup(func() { c.Close() })
			accepted <- c
		}
	}()
	listen(t, node, hostPort(nodeIP, 8080), "node-app") // the original destination
	wire := sniff(t, node, "veth0")
	dialCaptured := func() (app, zt net.Conn) {
		t.Helper()
		must(t, inNS(pod, func() (err error) {
			app, err = net.DialTimeout("tcp", hostPort(nodeIP, 8080), 2*time.Second)
			return err
		}))
		t.Cleanup(func() { app.Close() })
		select {
		case zt = <-accepted:
		case <-time.After(2 * time.Second):
			t.Fatal("the connection was not captured")
		}
		return app, zt
	}
	flush := func() {
		t.Helper()
		must(t, inNS(pod, func() error { return netlink.ConntrackTableFlush(netlink.ConntrackTable) }))
	}

	// A captured connection that ztunnel still holds carries on.
	app, zt := dialCaptured()
	if err := send(app, zt, "before the flush"); err != nil {
		t.Fatal(err)
	}
	flush()
	if err := send(app, zt, "secret-held-by-ztunnel"); err != nil {
		t.Errorf("captured connection after its conntrack entry was lost: %v", err)
	}
	if err := send(zt, app, "answer"); err != nil {
		t.Errorf("captured connection after its conntrack entry was lost, answer: %v", err)
	}

	// ztunnel closed its end (the upstream went away); the application
	// holds the half-closed connection, loses its conntrack entry, and
	// writes: reset, not sent to the original destination.
	app2, zt2 := dialCaptured()
	if err := send(app2, zt2, "before the close"); err != nil {
		t.Fatal(err)
	}
	zt2.Close()
	_ = app2.SetReadDeadline(time.Now().Add(2 * time.Second))
	if _, err := app2.Read(make([]byte, 1)); !errors.Is(err, io.EOF) {
		t.Fatalf("application read after ztunnel closed = %v, want EOF", err)
	}
	flush()
	const marker = "secret-after-close-and-flush"
	_ = app2.SetDeadline(time.Now().Add(2 * time.Second))
	if _, err := app2.Write([]byte(marker)); err != nil {
		t.Fatalf("first write on the half-closed connection: %v", err)
	}
	// The reset comes back; the next write reports it.
	time.Sleep(100 * time.Millisecond)
	if _, err := app2.Write([]byte("again")); !errors.Is(err, unix.ECONNRESET) && !errors.Is(err, unix.EPIPE) {
		t.Errorf("write on a lost half-closed captured connection after the first one = %v, want a reset", err)
	}

	// The pre-existing connection keeps its direct path through the loss.
	if err := pre.exchange("after the flush", false); err != nil {
		t.Errorf("connection open before Install, after the flush: %v", err)
	}
	time.Sleep(100 * time.Millisecond)
	for _, m := range []string{"secret-held-by-ztunnel", marker} {
		if wire.saw(m) {
			t.Errorf("%q went on the wire toward the original destination in plaintext", m)
		}
	}
	if !wire.saw("after the flush") {
		t.Error("the sniffer saw nothing of the direct connection (is it working?)")
	}
}

// TestReusedTupleIsCaptured: a new connection that happens to reuse the
// addresses and ports of a connection that was open before Install is
// captured like any other: only a mid-stream packet is exempt.
func TestReusedTupleIsCaptured(t *testing.T) {
	needRoot(t)
	pod, node := topology(t)
	src := &net.TCPAddr{IP: podIP.AsSlice(), Port: 40123}
	f := openFlow(t, "pre-existing", pod, node, &net.Dialer{LocalAddr: src}, "", hostPort(nodeIP, 8080))
	must(t, inNS(pod, func() error { return Install(Config{}) }))
	if err := f.exchange("after install", false); err != nil {
		t.Fatal(err)
	}
	// The server closes first (its side keeps TIME_WAIT), then the pod:
	// the pod's port is free again.
	f.server.Close()
	_ = f.client.SetReadDeadline(time.Now().Add(2 * time.Second))
	if _, err := f.client.Read(make([]byte, 1)); !errors.Is(err, io.EOF) {
		t.Fatalf("read after the server closed = %v, want EOF", err)
	}
	f.client.Close()
	listen(t, pod, fmt.Sprintf("[::]:%d", OutboundPort), "ztunnel-outbound")
	var got string
	deadline := time.Now().Add(3 * time.Second)
	for {
		var err error
		got, err = ask(pod, &net.Dialer{LocalAddr: src}, hostPort(nodeIP, 8080))
		if err == nil || time.Now().After(deadline) {
			if err != nil {
				t.Fatalf("new connection from %v: %v", src, err)
			}
			break
		}
		time.Sleep(50 * time.Millisecond) // the pod's end may still be closing
	}
	if want := "ztunnel-outbound " + hostPort(nodeIP, 8080); !strings.HasPrefix(got, want) {
		t.Fatalf("new connection on the reused tuple answered %q, want prefix %q", got, want)
	}
}

// keeper accepts on ln until it is closed and hands every connection
// over (a stand-in for ztunnel, which holds what it accepts).
func keeper(t *testing.T, ln net.Listener) <-chan net.Conn {
	t.Helper()
	t.Cleanup(func() { ln.Close() })
	out := make(chan net.Conn, 8)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			t.Cleanup(func() { c.Close() })
			out <- c
		}
	}()
	return out
}

func has(conns []Conn, local, remote string) bool {
	return slices.ContainsFunc(conns, func(c Conn) bool { return c.Local.String() == local && c.Remote.String() == remote })
}

// TestDrain: a pod leaving the mesh. Drain stops capturing new
// connections, while those ztunnel carries — outbound (redirected) and
// inbound (ztunnel's transparent connection to the app, reply-routed) —
// keep working, also through a loss of their conntrack entries; it lists
// them (not the connections open before Install, not loopback ones);
// StillOpen follows them as they end, Reset aborts the rest; then Remove
// leaves nothing. No payload of a captured connection ever reaches the
// wire in plaintext.
func TestDrain(t *testing.T) {
	needRoot(t)
	pod, node := topology(t)
	must(t, inNS(pod, func() error {
		conns, err := Drain()
		if err != nil || conns != nil {
			return fmt.Errorf("Drain without rules = %v, %v; want nothing", conns, err)
		}
		if err := Check(Config{}); !errors.Is(err, ErrNotInstalled) {
			return fmt.Errorf("Drain without rules installed something: Check = %v", err)
		}
		return nil
	}))
	pre := openFlow(t, "pre-existing", pod, node, &net.Dialer{}, "", hostPort(nodeIP, 8088))
	must(t, inNS(pod, func() error { return Install(Config{}) }))
	var zln, appLn, loLn net.Listener
	must(t, inNS(pod, func() (err error) {
		if zln, err = net.Listen("tcp", fmt.Sprintf("[::]:%d", OutboundPort)); err != nil {
			return err
		}
		if appLn, err = net.Listen("tcp", "[::]:7000"); err != nil {
			return err
		}
		loLn, err = net.Listen("tcp", "127.0.0.1:9090")
		return err
	}))
	ztunnel, app, lo := keeper(t, zln), keeper(t, appLn), keeper(t, loLn)
	listen(t, node, hostPort(nodeIP, 8080), "node-app")
	wire := sniff(t, node, "veth0")
	dial := func(d *net.Dialer, addr string, accepted <-chan net.Conn) (client, server net.Conn) {
		t.Helper()
		must(t, inNS(pod, func() (err error) {
			client, err = d.Dial("tcp", addr)
			return err
		}))
		t.Cleanup(func() { client.Close() })
		select {
		case server = <-accepted:
		case <-time.After(2 * time.Second):
			t.Fatalf("connection to %s not accepted where expected", addr)
		}
		return client, server
	}
	// Outbound, captured: the app's socket ↔ ztunnel.
	outApp, outZt := dial(&net.Dialer{}, hostPort(nodeIP, 8080), ztunnel)
	// Inbound: ztunnel connects to the app as the remote client.
	inZt, inApp := dial(transparentDialer(nodeIP), hostPort(podIP, 7000), app)
	// Loopback: never captured.
	loClient, _ := dial(&net.Dialer{}, "127.0.0.1:9090", lo)
	for _, f := range []*flow{{"outbound", outApp, outZt}, {"inbound", inZt, inApp}} {
		if err := f.exchange("before drain", false); err != nil {
			t.Fatalf("%s before Drain: %v", f.name, err)
		}
	}

	var conns []Conn
	must(t, inNS(pod, func() (err error) {
		conns, err = Drain()
		return err
	}))
	t.Logf("captured connections: %v", conns)
	if !has(conns, outApp.LocalAddr().String(), hostPort(nodeIP, 8080)) {
		t.Errorf("Drain did not list the captured outbound connection %s", outApp.LocalAddr())
	}
	if !has(conns, hostPort(podIP, 7000), inZt.LocalAddr().String()) {
		t.Errorf("Drain did not list the app's end of the inbound connection from %s", inZt.LocalAddr())
	}
	if has(conns, pre.client.LocalAddr().String(), hostPort(nodeIP, 8088)) {
		t.Error("Drain listed the connection open before Install")
	}
	if has(conns, loClient.LocalAddr().String(), "127.0.0.1:9090") {
		t.Error("Drain listed a loopback connection")
	}

	// New connections go direct now.
	if got, err := ask(pod, &net.Dialer{}, hostPort(nodeIP, 8080)); err != nil || !strings.HasPrefix(got, "node-app") {
		t.Errorf("new connection while draining: %q, %v; want node-app directly", got, err)
	}
	// Captured ones carry on, also after losing their conntrack entries.
	for _, flushFirst := range []bool{false, true} {
		if flushFirst {
			must(t, inNS(pod, func() error { return netlink.ConntrackTableFlush(netlink.ConntrackTable) }))
		}
		for _, f := range []*flow{{"outbound", outApp, outZt}, {"inbound", inZt, inApp}} {
			if err := f.exchange(fmt.Sprint("secret-while-draining-", flushFirst), false); err != nil {
				t.Errorf("%s while draining (conntrack flushed: %t): %v", f.name, flushFirst, err)
			}
		}
	}
	if err := pre.exchange("while draining", false); err != nil {
		t.Errorf("connection open before Install, while draining: %v", err)
	}

	// The outbound one ends; the inbound one outlives the wait: reset.
	outApp.Close()
	outZt.Close()
	var left []Conn
	must(t, inNS(pod, func() (err error) {
		left, err = StillOpen(conns)
		return err
	}))
	if has(left, outApp.LocalAddr().String(), hostPort(nodeIP, 8080)) || !has(left, hostPort(podIP, 7000), inZt.LocalAddr().String()) {
		t.Fatalf("StillOpen = %v; want the inbound connection only", left)
	}
	must(t, inNS(pod, func() error { return Reset(left) }))
	_ = inApp.SetReadDeadline(time.Now().Add(2 * time.Second))
	if _, err := inApp.Read(make([]byte, 1)); !errors.Is(err, unix.ECONNABORTED) {
		t.Errorf("the app's end after Reset: %v, want ECONNABORTED", err)
	}
	_ = inZt.SetReadDeadline(time.Now().Add(2 * time.Second))
	if _, err := inZt.Read(make([]byte, 1)); !errors.Is(err, unix.ECONNRESET) {
		t.Errorf("ztunnel's end after Reset: %v, want ECONNRESET", err)
	}
	must(t, inNS(pod, func() (err error) {
		if left, err = StillOpen(conns); err != nil || len(left) != 0 {
			return fmt.Errorf("StillOpen after Reset = %v, %v; want none", left, err)
		}
		if err := Reset(conns); err != nil {
			return fmt.Errorf("Reset of sockets already gone: %v", err)
		}
		if err := Remove(); err != nil {
			return err
		}
		if err := Check(Config{}); !errors.Is(err, ErrNotInstalled) {
			return fmt.Errorf("Check after Remove = %v", err)
		}
		return nil
	}))
	if err := pre.exchange("after remove", false); err != nil {
		t.Errorf("connection open before Install, after Remove: %v", err)
	}
	time.Sleep(100 * time.Millisecond)
	for _, m := range []string{"secret-while-draining-false", "secret-while-draining-true"} {
		if wire.saw(m) {
			t.Errorf("%q went on the wire in plaintext", m)
		}
	}
}
