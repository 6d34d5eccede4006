package hbone

import (
	"context"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"
)

func TestServeDrains(t *testing.T) {
	e := newEnv(t, echo, func(s *ServerConfig, _ *ClientConfig) { s.DrainTimeout = 5 * time.Second })
	s := e.dial(t, "10.0.0.1:80")
	echoOnce(t, s, "before")
	e.stop() // Serve's context ends: stop accepting, GOAWAY, drain
	waitFor(t, "GOAWAY", func() bool { return !s.c.usable() })
	select {
	case err := <-e.served:
		t.Fatalf("Serve returned with a stream in flight: %v", err)
	case <-time.After(100 * time.Millisecond):
	}
	echoOnce(t, s, "during drain") // the stream in flight still works
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	if _, err := e.client.Dial(ctx, e.req("10.0.0.1:80")); err == nil {
		t.Fatal("new stream accepted while draining")
	}
	cancel()
	_ = s.CloseWrite()
	_, _ = io.ReadAll(s)
	s.Close()
	select {
	case err := <-e.served:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Serve did not return after the last stream ended")
	}
	e.stop = nil
}

func TestServeDrainTimeout(t *testing.T) {
	handlerDone := make(chan error, 1)
	e := newEnv(t, func(ctx context.Context, r *Request) (func(net.Conn), error) {
		return func(c net.Conn) {
			_, err := io.ReadAll(c) // never ends by itself
			handlerDone <- err
		}, nil
	}, func(s *ServerConfig, _ *ClientConfig) { s.DrainTimeout = 200 * time.Millisecond })
	s := e.dial(t, "10.0.0.1:80")
	defer s.Close()
	start := time.Now()
	e.stop()
	if err := <-e.served; err != nil {
		t.Fatal(err)
	}
	e.stop = nil
	if d := time.Since(start); d < 200*time.Millisecond || d > 3*time.Second {
		t.Fatalf("Serve returned after %v; want about the drain timeout", d)
	}
	if err := <-handlerDone; err == nil {
		t.Fatal("handler's stream did not fail when the drain timed out")
	}
	_ = s.SetReadDeadline(time.Now().Add(2 * time.Second))
	if _, err := s.Read(make([]byte, 1)); err == nil || isTimeout(err) {
		t.Fatalf("client read after the server stopped: %v", err)
	}
}

func TestHeaders(t *testing.T) {
	got := make(chan http.Header, 1)
	e := newEnv(t, func(ctx context.Context, r *Request) (func(net.Conn), error) {
		select {
		case got <- r.Header:
		default:
		}
		return echo(ctx, r)
	})
	r := e.req("10.0.0.1:80")
	r.Header = http.Header{
		"Forwarded":   {`for="10.0.0.9"`},
		"Traceparent": {"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"},
		"Baggage":     {"a=1", "b=2"},
		"Connection":  {"close"}, // hop-by-hop: not forwarded
	}
	s, err := e.client.Dial(context.Background(), r)
	if err != nil {
		t.Fatal(err)
	}
	s.Close()
	h := <-got
	if h.Get("Forwarded") != `for="10.0.0.9"` || h.Get("Traceparent") == "" || len(h.Values("Baggage")) != 2 || h.Get("Connection") != "" {
		t.Fatalf("handler saw headers %v", h)
	}

	r.Header = http.Header{"Bad\nName": {"x"}}
	if _, err := e.client.Dial(context.Background(), r); err == nil {
		t.Fatal("invalid header name accepted")
	}
	r.Header = http.Header{"X-Ok": {"line\r\nbreak"}}
	if _, err := e.client.Dial(context.Background(), r); err == nil {
		t.Fatal("invalid header value accepted")
	}
	// Over the server's advertised header list limit: refused locally.
	r.Header = http.Header{"X-Big": {strings.Repeat("a", 20<<10)}}
	if _, err = e.client.Dial(context.Background(), r); err == nil || !strings.Contains(err.Error(), "exceed the server's limit") {
		t.Fatalf("oversized headers: %v", err)
	}
	r.Header = http.Header{"X-Big": {strings.Repeat("a", 15<<10)}}
	if s, err = e.client.Dial(context.Background(), r); err != nil {
		t.Fatalf("large headers under the limit: %v", err)
	}
	s.Close()
	// The connection survives all of that.
	s2 := e.dial(t, "10.0.0.1:80")
	echoOnce(t, s2, "ok")
	s2.Close()
}
