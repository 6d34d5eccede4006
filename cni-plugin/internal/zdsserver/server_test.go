package zdsserver

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/containernetworking/plugins/pkg/testutils"
	"go.uber.org/zap/zaptest"
	"golang.org/x/sys/unix"

	"github.com/amesh-dev/amesh/api/zds"
	zdsv1 "github.com/amesh-dev/amesh/api/zds/v1"
)

// ztunnel is a test ztunnel: it opens a listener inside every pod netns it
// is handed, like the real one, and records what it was told.
type ztunnel struct {
	t      *testing.T
	conn   *zds.Conn
	events chan string
	reject map[string]bool // uids to refuse
	stall  atomic.Bool     // never ack

	mu   sync.Mutex
	pods map[string]net.Listener
}

func dialZtunnel(t *testing.T, socket string, reject ...string) *ztunnel {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	var conn *zds.Conn
	var err error
	for ctx.Err() == nil { // the server may still be starting
		if conn, err = zds.Dial(ctx, socket); err == nil {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil {
		t.Fatalf("dial: %v", err)
	}
	z := &ztunnel{t: t, conn: conn, events: make(chan string, 100), reject: map[string]bool{}, pods: map[string]net.Listener{}}
	for _, r := range reject {
		z.reject[r] = true
	}
	if err := conn.SendZtunnel(&zdsv1.ZtunnelMessage{Payload: &zdsv1.ZtunnelMessage_Hello{Hello: &zdsv1.Hello{Version: zdsv1.Version_VERSION_V1}}}); err != nil {
		t.Fatalf("hello: %v", err)
	}
	go z.loop()
	t.Cleanup(z.close)
	return z
}

func (z *ztunnel) close() {
	z.conn.Close()
	z.mu.Lock()
	defer z.mu.Unlock()
	for _, l := range z.pods {
		l.Close()
	}
}

func (z *ztunnel) loop() {
	defer close(z.events)
	for {
		m, fd, err := z.conn.RecvAgent()
		if err != nil {
			return
		}
		var ev, ackErr string
		switch p := m.GetPayload().(type) {
		case *zdsv1.AgentMessage_Add:
			uid := p.Add.GetUid()
			ev = "add " + uid
			if z.reject[uid] {
				ackErr = "refused"
			} else if err := z.listenIn(uid, fd); err != nil {
				ackErr = err.Error()
			}
			fd.Close()
		case *zdsv1.AgentMessage_Keep:
			ev = "keep " + p.Keep.GetUid()
		case *zdsv1.AgentMessage_Delete:
			ev = "delete " + p.Delete.GetUid()
			z.mu.Lock()
			if l := z.pods[p.Delete.GetUid()]; l != nil {
				l.Close()
				delete(z.pods, p.Delete.GetUid())
			}
			z.mu.Unlock()
		case *zdsv1.AgentMessage_SnapshotSent:
			ev = "snapshot_sent"
		}
		z.events <- ev
		if z.stall.Load() {
			continue
		}
		if err := z.conn.SendZtunnel(&zdsv1.ZtunnelMessage{Payload: &zdsv1.ZtunnelMessage_Ack{Ack: &zdsv1.Ack{Error: ackErr}}}); err != nil {
			return
		}
	}
}

// serves reports whether the test ztunnel holds a listener for uid.
func (z *ztunnel) serves(uid string) bool {
	z.mu.Lock()
	defer z.mu.Unlock()
	return z.pods[uid] != nil
}

// listenIn opens 127.0.0.1:15001 inside the namespace fd refers to.
func (z *ztunnel) listenIn(uid string, fd *os.File) error {
	netns, err := ns.GetNS(fmt.Sprintf("/proc/self/fd/%d", fd.Fd()))
	if err != nil {
		return err
	}
	defer netns.Close()
	var l net.Listener
	// SO_REUSEPORT, as ztunnel: two of them may serve a pod at once.
	lc := net.ListenConfig{Control: func(_, _ string, c syscall.RawConn) error {
		var serr error
		if err := c.Control(func(fd uintptr) {
			serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEPORT, 1)
		}); err != nil {
			return err
		}
		return serr
	}}
	if err := netns.Do(func(ns.NetNS) (err error) {
		l, err = lc.Listen(context.Background(), "tcp", "127.0.0.1:15001")
		return err
	}); err != nil {
		return err
	}
	z.mu.Lock()
	defer z.mu.Unlock()
	if old := z.pods[uid]; old != nil {
		old.Close()
	}
	z.pods[uid] = l
	return nil
}

func (z *ztunnel) expect(t *testing.T, want ...string) {
	t.Helper()
	for _, w := range want {
		select {
		case got, ok := <-z.events:
			if !ok {
				t.Fatalf("connection closed, want %q", w)
			}
			if got != w {
				t.Fatalf("ztunnel got %q, want %q", got, w)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("timed out waiting for %q", w)
		}
	}
}

func needRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: creates network namespaces")
	}
}

func newPodNS(t *testing.T) (ns.NetNS, *os.File) {
	t.Helper()
	n, err := testutils.NewNS()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		n.Close()
		if err := testutils.UnmountNS(n); err != nil {
			t.Errorf("cleanup: %v", err)
		}
	})
	if err := n.Do(func(ns.NetNS) error { return exec("ip", "link", "set", "lo", "up") }); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(n.Path())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return n, f
}

// canReach reports whether a connection to 127.0.0.1:15001 inside n succeeds.
func canReach(n ns.NetNS) bool {
	err := n.Do(func(ns.NetNS) error {
		c, err := net.DialTimeout("tcp", "127.0.0.1:15001", time.Second)
		if err == nil {
			c.Close()
		}
		return err
	})
	return err == nil
}

type pods struct {
	mu sync.Mutex
	ws []Workload
}

func (p *pods) set(ws ...Workload) { p.mu.Lock(); p.ws = ws; p.mu.Unlock() }
func (p *pods) get() []Workload {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]Workload(nil), p.ws...)
}

func start(t *testing.T, snap func() []Workload, ack time.Duration) (*Server, string) {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "zds.sock")
	s := New(Config{Socket: sock, Snapshot: snap, AckTimeout: ack, Logger: zaptest.NewLogger(t)})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	})
	return s, sock
}

func waitConnected(t *testing.T, s *Server) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !s.Connected() {
		if time.Now().After(deadline) {
			t.Fatal("ztunnel never connected")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func info(name string) *zdsv1.WorkloadInfo {
	return &zdsv1.WorkloadInfo{Name: name, Namespace: "default", Ips: []string{"10.0.0.1"}}
}

func TestEndToEnd(t *testing.T) {
	needRoot(t)
	podA, fdA := newPodNS(t)
	podB, fdB := newPodNS(t)
	known := &pods{}
	known.set(Workload{UID: "a", Info: info("a"), Netns: fdA})
	s, sock := start(t, known.get, 5*time.Second)

	ctx := context.Background()
	if err := s.Add(ctx, Workload{UID: "b", Info: info("b"), Netns: fdB}); !errors.Is(err, ErrNoZtunnel) {
		t.Fatalf("Add without ztunnel = %v, want ErrNoZtunnel", err)
	}

	// Connect: snapshot of a, then snapshot_sent; ztunnel listens inside a.
	z := dialZtunnel(t, sock)
	z.expect(t, "add a", "snapshot_sent")
	waitConnected(t, s)
	if !canReach(podA) {
		t.Fatal("ztunnel's listener is not inside pod a's netns")
	}
	if canReach(podB) {
		t.Fatal("pod b reachable before it was added")
	}

	// Add b: returns after the ack; the listener is in b's netns.
	if err := s.Add(ctx, Workload{UID: "b", Info: info("b"), Netns: fdB}); err != nil {
		t.Fatal(err)
	}
	z.expect(t, "add b")
	if !canReach(podB) {
		t.Fatal("ztunnel's listener is not inside pod b's netns")
	}
	known.set(Workload{UID: "a", Info: info("a"), Netns: fdA}, Workload{UID: "b", Info: info("b"), Netns: fdB})

	// Delete a.
	if err := s.Delete(ctx, "a"); err != nil {
		t.Fatal(err)
	}
	z.expect(t, "delete a")
	if canReach(podA) {
		t.Fatal("pod a still served after delete")
	}
	known.set(Workload{UID: "b", Info: info("b"), Netns: fdB}, Workload{UID: "c", Info: info("c")})

	// ztunnel restarts: the new connection gets a full snapshot (keep for
	// a pod without netns), the old one is gone.
	z.close()
	z2 := dialZtunnel(t, sock)
	z2.expect(t, "add b", "keep c", "snapshot_sent")
	if !canReach(podB) {
		t.Fatal("after reconnect pod b not served")
	}
	if err := s.Delete(ctx, "b"); err != nil {
		t.Fatal(err)
	}
	z2.expect(t, "delete b")
}

func TestRejectAndTimeout(t *testing.T) {
	needRoot(t)
	_, fd := newPodNS(t)
	s, sock := start(t, nil, 300*time.Millisecond)
	z := dialZtunnel(t, sock, "bad")
	z.expect(t, "snapshot_sent")
	waitConnected(t, s)
	ctx := context.Background()

	err := s.Add(ctx, Workload{UID: "bad", Info: info("bad"), Netns: fd})
	if !errors.Is(err, ErrRejected) {
		t.Fatalf("Add of refused pod = %v, want ErrRejected", err)
	}
	z.expect(t, "add bad")
	if !s.Connected() {
		t.Fatal("a rejection must not disconnect ztunnel")
	}

	// A ztunnel that stops acking is disconnected after AckTimeout.
	z.stall.Store(true)
	start := time.Now()
	err = s.Delete(ctx, "x")
	if !errors.Is(err, ErrNoZtunnel) {
		t.Fatalf("Delete with stalled ztunnel = %v, want ErrNoZtunnel", err)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Fatalf("timeout took %v", d)
	}
	if s.Connected() {
		t.Fatal("stalled ztunnel still connected")
	}
	if err := s.Delete(ctx, "y"); !errors.Is(err, ErrNoZtunnel) {
		t.Fatalf("Delete after disconnect = %v", err)
	}
}

func TestBadHello(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "zds.sock")
	s := New(Config{Socket: sock, HelloTimeout: 200 * time.Millisecond, Logger: zaptest.NewLogger(t)})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx) }()
	defer func() { cancel(); <-done }()
	var c *zds.Conn
	var err error
	for i := 0; i < 100; i++ {
		if c, err = zds.Dial(ctx, sock); err == nil {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	// Wrong version: the server hangs up without installing a session.
	if err := c.SendZtunnel(&zdsv1.ZtunnelMessage{Payload: &zdsv1.ZtunnelMessage_Hello{Hello: &zdsv1.Hello{}}}); err != nil {
		t.Fatal(err)
	}
	if _, _, err := c.RecvAgent(); err == nil {
		t.Fatal("server sent something after a bad hello")
	}
	if s.Connected() {
		t.Fatal("bad hello accepted")
	}
}

// TestHangupNoticed: a ztunnel that goes away between changes is noticed
// without waiting for the next exchange.
func TestHangupNoticed(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "zds.sock")
	s := New(Config{Socket: sock, LivenessInterval: 50 * time.Millisecond, Logger: zaptest.NewLogger(t)})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx) }()
	defer func() { cancel(); <-done }()
	z := dialZtunnel(t, sock)
	z.expect(t, "snapshot_sent")
	waitConnected(t, s)
	time.Sleep(200 * time.Millisecond) // several idle probes
	if !s.Connected() {
		t.Fatal("an idle, live ztunnel was disconnected")
	}
	z.close()
	deadline := time.Now().Add(5 * time.Second)
	for s.Connected() {
		if time.Now().After(deadline) {
			t.Fatal("hang-up not noticed")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestTwoZtunnels: while a new ztunnel replaces an old one, both stay
// connected: each gets its own snapshot and every change, the newest one's
// answer decides, and when the old one leaves the new one carries on.
func TestTwoZtunnels(t *testing.T) {
	needRoot(t)
	podA, fdA := newPodNS(t)
	podB, fdB := newPodNS(t)
	_, fdC := newPodNS(t)
	known := &pods{}
	known.set(Workload{UID: "a", Info: info("a"), Netns: fdA})
	s, sock := start(t, known.get, 500*time.Millisecond)
	ctx := context.Background()

	old := dialZtunnel(t, sock, "only-new-ok")
	old.expect(t, "add a", "snapshot_sent")
	waitConnected(t, s)
	// The replacement connects: a full snapshot of its own; the old one
	// is not disconnected and keeps its listener.
	repl := dialZtunnel(t, sock, "only-old-ok")
	repl.expect(t, "add a", "snapshot_sent")
	if !old.serves("a") || !repl.serves("a") {
		t.Fatal("both ztunnels should serve pod a")
	}
	if !canReach(podA) {
		t.Fatal("pod a not reachable")
	}

	// Changes go to both.
	if err := s.Add(ctx, Workload{UID: "b", Info: info("b"), Netns: fdB}); err != nil {
		t.Fatal(err)
	}
	old.expect(t, "add b")
	repl.expect(t, "add b")
	if !old.serves("b") || !repl.serves("b") || !canReach(podB) {
		t.Fatal("both ztunnels should serve pod b")
	}
	if err := s.Delete(ctx, "a"); err != nil {
		t.Fatal(err)
	}
	old.expect(t, "delete a")
	repl.expect(t, "delete a")
	if canReach(podA) {
		t.Fatal("pod a still served after delete")
	}

	// The newest answer decides.
	if err := s.Add(ctx, Workload{UID: "only-new-ok", Info: info("n"), Netns: fdC}); err != nil {
		t.Fatalf("add accepted by the newest ztunnel (refused by the old one) = %v, want success", err)
	}
	old.expect(t, "add only-new-ok")
	repl.expect(t, "add only-new-ok")
	if err := s.Add(ctx, Workload{UID: "only-old-ok", Info: info("o"), Netns: fdC}); !errors.Is(err, ErrRejected) {
		t.Fatalf("add refused by the newest ztunnel = %v, want ErrRejected", err)
	}
	old.expect(t, "add only-old-ok")
	repl.expect(t, "add only-old-ok")
	if !s.Connected() || len(s.connected()) != 2 {
		t.Fatalf("%d ztunnels connected, want 2 (a refusal disconnects nobody)", len(s.connected()))
	}

	// The old one leaves: the new one carries on alone.
	old.close()
	deadline := time.Now().Add(5 * time.Second)
	for len(s.connected()) != 1 {
		if time.Now().After(deadline) {
			t.Fatal("the old ztunnel's departure was not noticed")
		}
		if err := s.Delete(ctx, "nothing"); err != nil {
			t.Fatalf("delete while the old ztunnel leaves = %v", err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err := s.Delete(ctx, "b"); err != nil {
		t.Fatal(err)
	}
	for ev := range repl.events {
		if ev == "delete b" {
			break
		}
		if ev != "delete nothing" {
			t.Fatalf("unexpected event %q", ev)
		}
	}
	if canReach(podB) {
		t.Fatal("pod b still served after delete")
	}

	// The newest one stops answering mid-change: it is disconnected, and
	// the older one's answer counts.
	known.set()
	newer := dialZtunnel(t, sock)
	newer.expect(t, "snapshot_sent")
	newer.stall.Store(true)
	if err := s.Delete(ctx, "x"); err != nil {
		t.Fatalf("delete acknowledged by the older ztunnel while the newest stalled = %v, want success", err)
	}
	if n := len(s.connected()); n != 1 {
		t.Fatalf("%d ztunnels connected after the newest stalled, want 1", n)
	}
}

// TestSnapshotResult: the caller hears ztunnel's answer to every pod of a
// snapshot — a refused pod is not served and must be retried; the others
// are acknowledged.
func TestSnapshotResult(t *testing.T) {
	needRoot(t)
	_, fdA := newPodNS(t)
	_, fdB := newPodNS(t)
	known := &pods{}
	known.set(Workload{UID: "a", Info: info("a"), Netns: fdA}, Workload{UID: "b", Info: info("b"), Netns: fdB})
	type answer struct {
		uid string
		err error
	}
	answers := make(chan answer, 10)
	sock := filepath.Join(t.TempDir(), "zds.sock")
	s := New(Config{Socket: sock, Snapshot: known.get, Logger: zaptest.NewLogger(t),
		SnapshotResult: func(w Workload, err error) { answers <- answer{w.UID, err} }})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	})
	z := dialZtunnel(t, sock, "b")
	z.expect(t, "add a", "add b", "snapshot_sent")
	got := map[string]error{}
	for range 2 {
		select {
		case a := <-answers:
			got[a.uid] = a.err
		case <-time.After(5 * time.Second):
			t.Fatalf("answers: %v", got)
		}
	}
	if err, ok := got["a"]; !ok || err != nil {
		t.Errorf("pod a: answer %v (reported %v), want acknowledged", err, ok)
	}
	if err := got["b"]; !errors.Is(err, ErrRejected) {
		t.Errorf("pod b: answer %v, want ErrRejected", err)
	}
	if !z.serves("a") || z.serves("b") {
		t.Errorf("ztunnel serves a=%v b=%v, want a only", z.serves("a"), z.serves("b"))
	}
}
