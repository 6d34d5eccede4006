package netns_test

import (
	"context"
	"errors"
	"io"
	"net"
	"net/netip"
	"os/exec"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/amesh-dev/amesh/api/capture"

	"github.com/amesh-dev/amesh/ztunnel/internal/netns"
	"github.com/amesh-dev/amesh/ztunnel/internal/testnet"
)

const mark = 0x539

func accept(t *testing.T, ln net.Listener) <-chan net.Conn {
	ch := make(chan net.Conn, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			close(ch)
			return
		}
		ch <- c
	}()
	return ch
}

func TestListenAndDialInsideNamespace(t *testing.T) {
	testnet.RequireRoot(t)
	ns := testnet.NewNS(t, "ztn-ns")
	h := ns.Open(t)
	ctx := context.Background()

	ln, err := h.Listen(ctx, "tcp", "127.0.0.1:0", netns.SockOpts{Mark: mark, ReusePort: true})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	port := ln.Addr().(*net.TCPAddr).Port

	// A second listener on the same port works thanks to SO_REUSEPORT.
	ln2, err := h.Listen(ctx, "tcp", "127.0.0.1:"+strconv.Itoa(port), netns.SockOpts{Mark: mark, ReusePort: true})
	if err != nil {
		t.Fatalf("SO_REUSEPORT listener: %v", err)
	}
	ln2.Close()

	// The listener lives in the namespace: the ss tool there sees it.
	if out := ns.Run(t, "ss", "-Htln", "sport = :"+strconv.Itoa(port)); out == "" {
		t.Fatalf("listener not visible inside the namespace")
	}
	// From the test's own namespace nobody listens there (unless by chance
	// the same port is in use here, which we check explicitly).
	if c, err := net.DialTimeout("tcp", ln.Addr().String(), time.Second); err == nil {
		c.Close()
		if out, _ := exec.Command("ss", "-Htln", "sport = :"+strconv.Itoa(port)).Output(); len(out) == 0 {
			t.Fatalf("listener reachable from outside its namespace")
		}
	}

	got := accept(t, ln)
	c, err := h.Dial(ctx, "tcp", ln.Addr().String(), netip.Addr{}, netns.SockOpts{Mark: mark})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if m, err := netns.Mark(c); err != nil || m != mark {
		t.Fatalf("mark = %#x, %v", m, err)
	}
	s := <-got
	if s == nil {
		t.Fatal("accept failed")
	}
	defer s.Close()
	if _, err := c.Write([]byte("ping")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 4)
	if _, err := io.ReadFull(s, buf); err != nil || string(buf) != "ping" {
		t.Fatalf("read %q, %v", buf, err)
	}
}

// TestOriginalDst checks that redirected connections accepted by a listener
// opened inside a namespace report their original destination.
func TestOriginalDst(t *testing.T) {
	testnet.RequireRoot(t)
	if _, err := exec.LookPath("iptables"); err != nil {
		t.Skip("needs iptables")
	}
	ns := testnet.NewNS(t, "ztn-od")
	h := ns.Open(t)
	ns.AddAddr(t, "lo", "10.55.0.1/24")
	ns.Iproute(t, "-6", "addr", "add", "fd55::1/64", "dev", "lo", "nodad")
	ns.Run(t, "iptables", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-d", "10.55.0.9", "--dport", "80", "-j", "REDIRECT", "--to-ports", "15001")
	ns.Run(t, "ip6tables", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-d", "fd55::9", "--dport", "80", "-j", "REDIRECT", "--to-ports", "15001")
	ctx := context.Background()
	ln, err := h.Listen(ctx, "tcp", ":15001", netns.SockOpts{Mark: mark})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()

	for _, dst := range []string{"10.55.0.9:80", "[fd55::9]:80"} {
		got := accept(t, ln)
		c, err := h.Dial(ctx, "tcp", dst, netip.Addr{}, netns.SockOpts{})
		if err != nil {
			t.Fatalf("dial %s: %v", dst, err)
		}
		s := <-got
		od, err := capture.OriginalDestination(s.(*net.TCPConn))
		if err != nil {
			t.Fatalf("OriginalDst: %v", err)
		}
		if od != netip.MustParseAddrPort(dst) {
			t.Fatalf("OriginalDst = %s, want %s", od, dst)
		}
		c.Close()
		s.Close()
	}

	// A connection that was not redirected reports its own destination
	// (conntrack's original tuple), which callers recognise as the listener.
	got := accept(t, ln)
	c, err := h.Dial(ctx, "tcp", "10.55.0.1:15001", netip.Addr{}, netns.SockOpts{})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	s := <-got
	defer s.Close()
	if od, err := capture.OriginalDestination(s.(*net.TCPConn)); err == nil && od != unmap(s.LocalAddr().(*net.TCPAddr).AddrPort()) {
		t.Fatalf("OriginalDst of a direct connection = %s, want %s or an error", od, s.LocalAddr())
	}
}

// TestTransparentDial connects with a source address that belongs to no
// interface: the peer sees that address.
func TestTransparentDial(t *testing.T) {
	testnet.RequireRoot(t)
	p := testnet.NewNS(t, "ztn-tp")
	q := testnet.NewNS(t, "ztn-tq")
	testnet.Veth(t, p, "vp", q, "vq")
	p.AddAddr(t, "vp", "10.66.0.1/24")
	q.AddAddr(t, "vq", "10.66.0.2/24")
	// q routes the spoofed range back to p; p delivers it locally (what the
	// capture rules do for marked connections in a pod).
	q.Iproute(t, "route", "add", "10.77.0.0/24", "via", "10.66.0.1")
	p.Iproute(t, "rule", "add", "to", "10.77.0.0/24", "lookup", "177", "pref", "100")
	p.Iproute(t, "route", "add", "local", "10.77.0.0/24", "dev", "lo", "table", "177")

	ctx := context.Background()
	ln, err := q.Open(t).Listen(ctx, "tcp", "10.66.0.2:0", netns.SockOpts{})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	hp := p.Open(t)
	spoof := netip.MustParseAddr("10.77.0.5")

	// Without IP_TRANSPARENT the kernel refuses the foreign address.
	if c, err := hp.Dial(ctx, "tcp", ln.Addr().String(), spoof, netns.SockOpts{}); err == nil {
		c.Close()
		t.Fatal("non-transparent dial from a foreign address succeeded")
	} else if !errors.Is(err, syscall.EADDRNOTAVAIL) {
		t.Fatalf("non-transparent dial: %v, want EADDRNOTAVAIL", err)
	}

	got := accept(t, ln)
	c, err := hp.Dial(ctx, "tcp", ln.Addr().String(), spoof, netns.SockOpts{Transparent: true, Mark: mark})
	if err != nil {
		t.Fatalf("transparent dial: %v", err)
	}
	defer c.Close()
	s := <-got
	if s == nil {
		t.Fatal("accept failed")
	}
	defer s.Close()
	if ra := s.RemoteAddr().(*net.TCPAddr).AddrPort().Addr().Unmap(); ra != spoof {
		t.Fatalf("peer sees %s, want %s", ra, spoof)
	}
}

func TestFromFileRejectsOrdinaryFiles(t *testing.T) {
	if _, err := netns.Open("/proc/self/status"); err == nil {
		t.Fatal("Open accepted a file that is not a namespace")
	}
}

func unmap(ap netip.AddrPort) netip.AddrPort {
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
}

// TestDialOutcomes: Dial connects from inside the namespace and reports
// failures the way net.Dial does: refused, a connect that never completes
// (bounded by the context's deadline), a cancelled context.
func TestDialOutcomes(t *testing.T) {
	testnet.RequireRoot(t)
	ns := testnet.NewNS(t, "ztn-do")
	h := ns.Open(t)
	if _, err := exec.LookPath("iptables"); err != nil {
		t.Skip("needs iptables")
	}
	// A black hole: SYNs to 10.88.0.2 are dropped.
	ns.AddAddr(t, "lo", "10.88.0.1/24")
	ns.Run(t, "iptables", "-A", "OUTPUT", "-p", "tcp", "-d", "10.88.0.2", "-j", "DROP")
	ctx := context.Background()

	ln, err := h.Listen(ctx, "tcp", "127.0.0.1:0", netns.SockOpts{})
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	got := accept(t, ln)
	c, err := h.Dial(ctx, "tcp", addr, netip.Addr{}, netns.SockOpts{Mark: mark})
	if err != nil {
		t.Fatal(err)
	}
	s := <-got
	if s == nil {
		t.Fatal("accept failed")
	}
	if c.RemoteAddr().String() != addr || c.LocalAddr().String() != s.RemoteAddr().String() {
		t.Errorf("addresses: local %s remote %s; the server sees %s at %s", c.LocalAddr(), c.RemoteAddr(), s.RemoteAddr(), addr)
	}
	c.Close()
	s.Close()
	ln.Close() // now nothing listens there

	_, err = h.Dial(ctx, "tcp", addr, netip.Addr{}, netns.SockOpts{})
	var oe *net.OpError
	if !errors.Is(err, syscall.ECONNREFUSED) || !errors.As(err, &oe) || oe.Op != "dial" {
		t.Errorf("dial to a closed port: %v; want a dial OpError with ECONNREFUSED", err)
	}

	tctx, cancel := context.WithTimeout(ctx, 200*time.Millisecond)
	defer cancel()
	start := time.Now()
	_, err = h.Dial(tctx, "tcp", "10.88.0.2:80", netip.Addr{}, netns.SockOpts{})
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("dial into a black hole: %v; want the context's deadline", err)
	}
	if d := time.Since(start); d < 150*time.Millisecond || d > 2*time.Second {
		t.Errorf("dial into a black hole returned after %v; want about 200ms", d)
	}

	cctx, cancel2 := context.WithCancel(ctx)
	time.AfterFunc(100*time.Millisecond, cancel2)
	_, err = h.Dial(cctx, "tcp", "10.88.0.2:80", netip.Addr{}, netns.SockOpts{})
	if !errors.Is(err, context.Canceled) {
		t.Errorf("cancelled dial: %v; want context.Canceled", err)
	}
	if _, err := h.Dial(cctx, "tcp", addr, netip.Addr{}, netns.SockOpts{}); !errors.Is(err, context.Canceled) {
		t.Errorf("dial with a done context: %v; want context.Canceled", err)
	}
}
