package hbone

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"testing"
	"time"
)

func TestEcho(t *testing.T) {
	var got *Request
	e := newEnv(t, func(ctx context.Context, r *Request) (func(net.Conn), error) {
		got = r
		return echo(ctx, r)
	})
	s := e.dial(t, "10.1.2.3:8080")
	defer s.Close()
	msg := []byte("hello through the tunnel")
	if _, err := s.Write(msg); err != nil {
		t.Fatal(err)
	}
	if err := s.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	back, err := io.ReadAll(s)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(back, msg) {
		t.Fatalf("echo %q", back)
	}
	if got.Peer != e.cliID || got.Authority.String() != "10.1.2.3:8080" || got.RemoteAddr.Addr().String() != "127.0.0.1" {
		t.Fatalf("handler saw %+v", got)
	}
	if s.Peer() != e.srvID {
		t.Fatalf("client peer %v", s.Peer())
	}
}

func TestHandlerStatuses(t *testing.T) {
	for _, tc := range []struct {
		err    error
		code   int
		target error
	}{
		{ErrDenied, 401, ErrDenied},
		{ErrBadTarget, 400, ErrBadTarget},
		{ErrUnreachable, 503, ErrUnreachable},
		{errors.New("boom"), 503, ErrUnreachable},
	} {
		e := newEnv(t, func(context.Context, *Request) (func(net.Conn), error) { return nil, tc.err })
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		_, err := e.client.Dial(ctx, e.req("10.0.0.1:80"))
		cancel()
		var se *StatusError
		if !errors.As(err, &se) || se.Code != tc.code || !errors.Is(err, tc.target) {
			t.Errorf("handler error %v: Dial error %v; want status %d", tc.err, err, tc.code)
		}
	}
}
