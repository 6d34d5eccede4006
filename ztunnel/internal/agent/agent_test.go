package agent

import (
	"context"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"sync"
	"testing"
	"time"

	"github.com/amesh-dev/amesh/api/zds"
	zdsv1 "github.com/amesh-dev/amesh/api/zds/v1"
	"go.uber.org/zap/zaptest"

	"github.com/amesh-dev/amesh/ztunnel/internal/netns"
)

// fakePods records what the client asks for.
type fakePods struct {
	mu   sync.Mutex
	pods map[string]PodInfo
	ino  map[string]uint64
}

func (f *fakePods) AddPod(uid string, info PodInfo, ns *netns.Namespace) error {
	defer ns.Close()
	f.mu.Lock()
	defer f.mu.Unlock()
	f.pods[uid] = info
	f.ino[uid] = ns.Inode()
	return nil
}

func (f *fakePods) HasPod(uid string) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	_, ok := f.pods[uid]
	return ok
}

func (f *fakePods) RemovePod(uid string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	delete(f.pods, uid)
}

func (f *fakePods) PodUIDs() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []string
	for k := range f.pods {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

// fakeAgent is the node agent side of one connection.
type fakeAgent struct {
	t    *testing.T
	conn *zds.Conn
}

func (a *fakeAgent) send(m *zdsv1.AgentMessage, withNetns bool) string {
	a.t.Helper()
	var f *os.File
	if withNetns {
		var err error
		if f, err = os.Open("/proc/self/ns/net"); err != nil {
			a.t.Fatal(err)
		}
		defer f.Close()
	}
	if err := a.conn.SendAgent(m, f); err != nil {
		a.t.Fatal(err)
	}
	_ = a.conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	r, err := a.conn.RecvZtunnel()
	if err != nil {
		a.t.Fatalf("waiting for ack: %v", err)
	}
	if r.GetAck() == nil {
		a.t.Fatalf("got %v, want an ack", r)
	}
	return r.GetAck().GetError()
}

func add(uid string, ips ...string) *zdsv1.AgentMessage {
	return &zdsv1.AgentMessage{Payload: &zdsv1.AgentMessage_Add{Add: &zdsv1.AddWorkload{Uid: uid, Info: &zdsv1.WorkloadInfo{
		Name: uid, Namespace: "default", ServiceAccount: "sa", Ips: ips, Node: "node1",
	}}}}
}

func keep(uid string) *zdsv1.AgentMessage {
	return &zdsv1.AgentMessage{Payload: &zdsv1.AgentMessage_Keep{Keep: &zdsv1.KeepWorkload{Uid: uid}}}
}

func del(uid string) *zdsv1.AgentMessage {
	return &zdsv1.AgentMessage{Payload: &zdsv1.AgentMessage_Delete{Delete: &zdsv1.DeleteWorkload{Uid: uid}}}
}

var snapshotSent = &zdsv1.AgentMessage{Payload: &zdsv1.AgentMessage_SnapshotSent{SnapshotSent: &zdsv1.SnapshotSent{}}}

func accept(t *testing.T, ln *zds.Listener) *fakeAgent {
	t.Helper()
	type res struct {
		c   *zds.Conn
		err error
	}
	ch := make(chan res, 1)
	go func() {
		c, err := ln.Accept()
		ch <- res{c, err}
	}()
	select {
	case r := <-ch:
		if r.err != nil {
			t.Fatal(r.err)
		}
		_ = r.c.SetReadDeadline(time.Now().Add(5 * time.Second))
		hello, err := r.c.RecvZtunnel()
		if err != nil || hello.GetHello().GetVersion() != zdsv1.Version_VERSION_V1 {
			t.Fatalf("hello = %v, %v", hello, err)
		}
		return &fakeAgent{t: t, conn: r.c}
	case <-time.After(10 * time.Second):
		t.Fatal("ztunnel did not connect")
		return nil
	}
}

func TestSessions(t *testing.T) {
	path := filepath.Join(t.TempDir(), "zds.sock")
	ln, err := zds.Listen(path)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	pods := &fakePods{pods: map[string]PodInfo{}, ino: map[string]uint64{}}
	c := New(path, pods, zaptest.NewLogger(t))
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- c.Run(ctx) }()

	a := accept(t, ln)
	if c.Ready() == nil {
		t.Fatal("ready before the snapshot")
	}
	steps := []struct {
		name      string
		msg       *zdsv1.AgentMessage
		netns     bool
		wantError bool
		wantPods  []string
	}{
		{"add a", add("a", "10.0.0.1"), true, false, []string{"a"}},
		{"add b", add("b", "10.0.0.2", "fd00::2"), true, false, []string{"a", "b"}},
		{"add again is fine", add("a", "10.0.0.1"), true, false, []string{"a", "b"}},
		{"add without ips", add("c"), true, true, []string{"a", "b"}},
		{"add with a bad ip", add("c", "nope"), true, true, []string{"a", "b"}},
		{"keep unknown", keep("zz"), false, true, []string{"a", "b"}},
		{"keep known", keep("a"), false, false, []string{"a", "b"}},
		{"snapshot sent", snapshotSent, false, false, []string{"a", "b"}},
		{"second snapshot_sent is an error", snapshotSent, false, true, []string{"a", "b"}},
		{"add after snapshot", add("c", "10.0.0.3"), true, false, []string{"a", "b", "c"}},
		{"delete", del("a"), false, false, []string{"b", "c"}},
		{"delete unknown", del("a"), false, false, []string{"b", "c"}},
	}
	for _, s := range steps {
		errStr := a.send(s.msg, s.netns)
		if (errStr != "") != s.wantError {
			t.Fatalf("%s: ack error %q, want error=%v", s.name, errStr, s.wantError)
		}
		if got := pods.PodUIDs(); !slices.Equal(got, s.wantPods) {
			t.Fatalf("%s: pods %v, want %v", s.name, got, s.wantPods)
		}
	}
	if err := c.Ready(); err != nil {
		t.Fatalf("not ready after the snapshot: %v", err)
	}
	self, _ := netns.Open("/proc/self/ns/net")
	defer self.Close()
	if pods.ino["b"] != self.Inode() {
		t.Fatalf("netns inode %d, want %d", pods.ino["b"], self.Inode())
	}
	if got := pods.pods["b"].IPs; len(got) != 2 || got[1].String() != "fd00::2" {
		t.Fatalf("ips = %v", got)
	}

	// The agent restarts: ztunnel reconnects and the new snapshot drops c.
	a.conn.Close()
	a = accept(t, ln)
	if c.Ready() == nil {
		t.Fatal("ready before the new snapshot")
	}
	if e := a.send(keep("b"), false); e != "" {
		t.Fatal(e)
	}
	if e := a.send(snapshotSent, false); e != "" {
		t.Fatal(e)
	}
	if got := pods.PodUIDs(); !slices.Equal(got, []string{"b"}) {
		t.Fatalf("after the new snapshot: %v", got)
	}
	if c.Sessions() != 2 {
		t.Fatalf("sessions = %d", c.Sessions())
	}
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Run did not return")
	}
}
