package agentapi

import (
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

type fakeAgent struct{ ready error }

func (f fakeAgent) Add(_ context.Context, r *PodRequest) (bool, error) {
	switch r.PodNamespace {
	case "mesh":
		return true, nil
	case "broken":
		return true, errors.New("netns gone")
	}
	return false, nil
}
func (f fakeAgent) Del(context.Context, *PodRequest) error           { return nil }
func (f fakeAgent) Check(context.Context, *PodRequest) (bool, error) { return false, nil }
func (f fakeAgent) Ready() error                                     { return f.ready }

func serveFake(t *testing.T, h Handler) string {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "a.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- Serve(ctx, ln, h, time.Second) }()
	t.Cleanup(func() { cancel(); <-done })
	return sock
}

func TestProtocol(t *testing.T) {
	sock := serveFake(t, fakeAgent{})
	c := NewClient(sock, 2*time.Second)
	ctx := context.Background()
	req := func(ns string) *PodRequest { return &PodRequest{ContainerID: "c", PodName: "p", PodNamespace: ns} }
	if r, err := c.Add(ctx, req("mesh")); err != nil || !r.Enrolled {
		t.Fatalf("Add mesh = %+v, %v", r, err)
	}
	if r, err := c.Add(ctx, req("plain")); err != nil || r.Enrolled {
		t.Fatalf("Add plain = %+v, %v", r, err)
	}
	_, err := c.Add(ctx, req("broken"))
	var ae *AgentError
	if !errors.As(err, &ae) || ae.Status != 500 || !strings.Contains(ae.Msg, "netns gone") {
		t.Fatalf("Add broken = %v", err)
	}
	if _, err := c.Add(ctx, &PodRequest{ContainerID: "c"}); !errors.As(err, &ae) || ae.Status != 400 {
		t.Fatalf("Add without pod = %v, want 400", err)
	}
	if err := c.Status(ctx); err != nil {
		t.Fatal(err)
	}

	notReady := NewClient(serveFake(t, fakeAgent{ready: ErrNotReady}), time.Second)
	if err := notReady.Status(ctx); !errors.As(err, &ae) || ae.Status != 503 {
		t.Fatalf("Status not ready = %v, want 503", err)
	}
	gone := NewClient(filepath.Join(t.TempDir(), "nobody.sock"), time.Second)
	if _, err := gone.Add(ctx, req("mesh")); !errors.Is(err, ErrUnreachable) {
		t.Fatalf("Add without agent = %v, want ErrUnreachable", err)
	}
}

func TestState(t *testing.T) {
	p := filepath.Join(t.TempDir(), "state.json")
	if _, err := ReadState(p); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("ReadState missing = %v", err)
	}
	if err := WriteState(p, &State{ExcludedNamespaces: []string{"a", "b"}}); err != nil {
		t.Fatal(err)
	}
	s, err := ReadState(p)
	if err != nil || !s.Excluded("a") || s.Excluded("c") {
		t.Fatalf("ReadState = %+v, %v", s, err)
	}
	if err := os.WriteFile(p, []byte("{"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := ReadState(p); err == nil {
		t.Fatal("corrupt state accepted")
	}
}
