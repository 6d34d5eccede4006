package hbone

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"sync"
	"testing"
	"time"
)

// hashServer is a TCP backend that reads until EOF and answers with the
// SHA-256 of what it read, then closes.
func hashServer(t testing.TB) netip.AddrPort {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	t.Cleanup(func() { ln.Close(); wg.Wait() })
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Go(func() {
				defer c.Close()
				h := sha256.New()
				if _, err := io.Copy(h, c); err != nil {
					return
				}
				_, _ = c.Write(h.Sum(nil))
			})
		}
	})
	return ln.Addr().(*net.TCPAddr).AddrPort()
}

// forward is a handler that connects to the authority and splices.
func forward(ctx context.Context, r *Request) (func(net.Conn), error) {
	var d net.Dialer
	up, err := d.DialContext(ctx, "tcp", r.Authority.String())
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrUnreachable, err)
	}
	return func(s net.Conn) {
		defer up.Close()
		_, _, _ = Splice(s, up)
	}, nil
}

// TestBulkHash sends bulkSize bytes (1 GiB, 64 MiB under -race) through one
// stream into a TCP backend (stream → Splice → TCP) and checks the backend's
// SHA-256 that comes back the other way after the half-close.
func TestBulkHash(t *testing.T) {
	backend := hashServer(t)
	e := newEnv(t, forward)
	s := e.dial(t, backend.String())
	defer s.Close()

	rng := rand.NewChaCha8([32]byte{1, 2, 3})
	h := sha256.New()
	buf := make([]byte, 256<<10)
	start := time.Now()
	for sent := 0; sent < bulkSize; sent += len(buf) {
		_, _ = rng.Read(buf)
		h.Write(buf)
		if _, err := s.Write(buf); err != nil {
			t.Fatalf("after %d bytes: %v", sent, err)
		}
	}
	if err := s.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(s)
	if err != nil {
		t.Fatal(err)
	}
	if want := h.Sum(nil); !bytes.Equal(got, want) {
		t.Fatalf("backend hash %x, want %x", got, want)
	}
	t.Logf("%d MiB in %v (%.0f MB/s)", bulkSize>>20, time.Since(start), float64(bulkSize)/time.Since(start).Seconds()/1e6)
}

// TestBulkDownload moves bulkSize/4 bytes server→client and checks the hash,
// exercising the client's receive path and window updates.
func TestBulkDownload(t *testing.T) {
	const size = bulkSize / 4
	sum := make(chan []byte, 1)
	e := newEnv(t, func(context.Context, *Request) (func(net.Conn), error) {
		return func(c net.Conn) {
			rng := rand.NewChaCha8([32]byte{9})
			h := sha256.New()
			buf := make([]byte, 128<<10)
			for sent := 0; sent < size; sent += len(buf) {
				_, _ = rng.Read(buf)
				h.Write(buf)
				if _, err := c.Write(buf); err != nil {
					t.Errorf("server write: %v", err)
					return
				}
			}
			sum <- h.Sum(nil)
			_ = c.(*Stream).CloseWrite()
			_, _ = io.Copy(io.Discard, c)
		}, nil
	})
	s := e.dial(t, "10.0.0.1:80")
	defer s.Close()
	h := sha256.New()
	n, err := io.Copy(h, s)
	if err != nil || n != size {
		t.Fatalf("read %d bytes: %v", n, err)
	}
	if !bytes.Equal(h.Sum(nil), <-sum) {
		t.Fatal("hash mismatch")
	}
	_ = s.CloseWrite()
}

func TestConcurrentStreams(t *testing.T) {
	const n = 1000
	e := newEnv(t, echo)
	streams := make([]*Stream, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			c, err := e.client.Dial(ctx, e.req(fmt.Sprintf("10.0.%d.%d:80", i/250, i%250+1)))
			if err != nil {
				t.Errorf("dial %d: %v", i, err)
				return
			}
			streams[i] = c.(*Stream)
		})
	}
	wg.Wait()
	if t.Failed() {
		for _, s := range streams {
			if s != nil {
				s.Close()
			}
		}
		t.FailNow()
	}
	// All 1000 are open at once: the pool needs exactly 10 connections.
	if got := e.ln.n.Load(); got != n/100 {
		t.Errorf("%d connections for %d concurrent streams; want %d", got, n, n/100)
	}
	for i, s := range streams {
		wg.Go(func() {
			defer s.Close()
			msg := bytes.Repeat([]byte{byte(i)}, 1000+i)
			if _, err := s.Write(msg); err != nil {
				t.Errorf("stream %d write: %v", i, err)
				return
			}
			_ = s.CloseWrite()
			back, err := io.ReadAll(s)
			if err != nil || !bytes.Equal(back, msg) {
				t.Errorf("stream %d: %d bytes back, %v", i, len(back), err)
			}
		})
	}
	wg.Wait()
}

func TestHalfClose(t *testing.T) {
	t.Run("client first", func(t *testing.T) {
		e := newEnv(t, func(context.Context, *Request) (func(net.Conn), error) {
			return func(c net.Conn) {
				got, err := io.ReadAll(c) // until the client's END_STREAM
				if err != nil {
					t.Errorf("server read: %v", err)
				}
				// The server can still write after the client half-closed.
				_, _ = fmt.Fprintf(c, "got %d bytes", len(got))
				_ = c.(*Stream).CloseWrite()
			}, nil
		})
		s := e.dial(t, "10.0.0.1:80")
		defer s.Close()
		_, _ = s.Write(make([]byte, 100000))
		if err := s.CloseWrite(); err != nil {
			t.Fatal(err)
		}
		if _, err := s.Write([]byte("x")); err == nil {
			t.Fatal("write after CloseWrite succeeded")
		}
		back, err := io.ReadAll(s)
		if err != nil || string(back) != "got 100000 bytes" {
			t.Fatalf("read %q, %v", back, err)
		}
	})
	t.Run("server first", func(t *testing.T) {
		got := make(chan string, 1)
		e := newEnv(t, func(context.Context, *Request) (func(net.Conn), error) {
			return func(c net.Conn) {
				_, _ = c.Write([]byte("banner"))
				_ = c.(*Stream).CloseWrite()
				b, err := io.ReadAll(c)
				if err != nil {
					t.Errorf("server read after its CloseWrite: %v", err)
				}
				got <- string(b)
			}, nil
		})
		s := e.dial(t, "10.0.0.1:80")
		defer s.Close()
		b, err := io.ReadAll(s) // EOF from the server's END_STREAM
		if err != nil || string(b) != "banner" {
			t.Fatalf("read %q, %v", b, err)
		}
		// The client can still write after the server half-closed.
		if _, err := s.Write([]byte("late reply")); err != nil {
			t.Fatal(err)
		}
		_ = s.CloseWrite()
		if g := <-got; g != "late reply" {
			t.Fatalf("server got %q", g)
		}
	})
	t.Run("through splice to TCP", func(t *testing.T) {
		// backend: reads to EOF (the FIN Splice sends on END_STREAM), then
		// answers and closes.
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		done := make(chan struct{})
		go func() {
			defer close(done)
			c, err := ln.Accept()
			if err != nil {
				return
			}
			defer c.Close()
			b, _ := io.ReadAll(c)
			_, _ = fmt.Fprintf(c, "backend read %q", b)
		}()
		e := newEnv(t, forward)
		s := e.dial(t, ln.Addr().String())
		defer s.Close()
		_, _ = s.Write([]byte("ping"))
		_ = s.CloseWrite()
		b, err := io.ReadAll(s)
		if err != nil || string(b) != `backend read "ping"` {
			t.Fatalf("read %q, %v", b, err)
		}
		<-done
	})
}

func TestDeadlines(t *testing.T) {
	hold := make(chan struct{})
	e := newEnv(t, func(context.Context, *Request) (func(net.Conn), error) {
		return func(c net.Conn) {
			<-hold // neither read nor write until released
			_, _ = c.Write([]byte("late"))
			_, _ = io.Copy(io.Discard, c)
		}, nil
	})
	s := e.dial(t, "10.0.0.1:80")
	defer s.Close()

	_ = s.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
	start := time.Now()
	if _, err := s.Read(make([]byte, 10)); !isTimeout(err) || !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("read: %v; want deadline exceeded", err)
	}
	if d := time.Since(start); d < 40*time.Millisecond || d > 2*time.Second {
		t.Fatalf("read deadline fired after %v", d)
	}
	// A past deadline fails at once; a blocked Read is woken by a new deadline.
	_ = s.SetReadDeadline(time.Now().Add(-time.Second))
	if _, err := s.Read(make([]byte, 10)); !isTimeout(err) {
		t.Fatalf("past deadline: %v", err)
	}
	_ = s.SetReadDeadline(time.Time{})
	errc := make(chan error, 1)
	go func() { _, err := s.Read(make([]byte, 10)); errc <- err }()
	time.Sleep(20 * time.Millisecond)
	_ = s.SetReadDeadline(time.Now())
	if err := <-errc; !isTimeout(err) {
		t.Fatalf("woken read: %v", err)
	}

	// Writes block once the peer's 4 MiB stream window is full.
	_ = s.SetWriteDeadline(time.Now().Add(time.Second))
	big := make([]byte, 8<<20)
	n, err := s.Write(big)
	if !isTimeout(err) || n < streamWindow-maxFrame || n >= len(big) {
		t.Fatalf("write: %d, %v; want a timeout after about %d bytes", n, err, streamWindow)
	}
	// The stream is still usable after the deadlines are cleared.
	_ = s.SetDeadline(time.Time{})
	close(hold)
	buf := make([]byte, 4)
	if _, err := io.ReadFull(s, buf); err != nil || string(buf) != "late" {
		t.Fatalf("after deadlines: %q, %v", buf, err)
	}
	if _, err := s.Write([]byte("more")); err != nil {
		t.Fatal(err)
	}
}

func TestReset(t *testing.T) {
	got := make(chan error, 1)
	e := newEnv(t, func(context.Context, *Request) (func(net.Conn), error) {
		return func(c net.Conn) {
			_, err := io.ReadAll(c)
			got <- err
		}, nil
	})
	s := e.dial(t, "10.0.0.1:80")
	_, _ = s.Write([]byte("partial"))
	if err := s.Reset(); err != nil {
		t.Fatal(err)
	}
	err := <-got
	var re *ResetError
	if !errors.As(err, &re) || !re.Remote || re.Code != 0xa /* CONNECT_ERROR */ {
		t.Fatalf("server read after client reset: %v", err)
	}
	if _, err := s.Write([]byte("x")); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("write after Reset: %v", err)
	}
}

// TestSpliceAbort: a backend that resets its TCP connection makes Splice
// reset the HBONE stream, and the client sees the reset.
func TestSpliceAbort(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		_, _ = c.Read(make([]byte, 4))
		_ = c.(*net.TCPConn).SetLinger(0)
		c.Close() // RST
	}()
	e := newEnv(t, forward)
	s := e.dial(t, ln.Addr().String())
	defer s.Close()
	_, _ = s.Write([]byte("ping"))
	_ = s.SetReadDeadline(time.Now().Add(5 * time.Second))
	_, err = io.ReadAll(s)
	if !errors.Is(err, ErrReset) {
		t.Fatalf("client read: %v; want a reset", err)
	}
}

// TestCloseUnblocks: Close wakes a Read and a Write blocked on the same
// stream (the net.Conn contract), and the peer sees the stream end.
func TestCloseUnblocks(t *testing.T) {
	hold := make(chan struct{})
	peerErr := make(chan error, 1)
	e := newEnv(t, func(context.Context, *Request) (func(net.Conn), error) {
		return func(c net.Conn) {
			<-hold // do not read: the client's writes stall on flow control
			_, err := io.Copy(io.Discard, c)
			peerErr <- err
		}, nil
	})
	defer close(hold)
	s := e.dial(t, "10.0.0.1:80")
	rerr, werr := make(chan error, 1), make(chan error, 1)
	go func() { _, err := s.Read(make([]byte, 1)); rerr <- err }()
	go func() { _, err := s.Write(make([]byte, 16<<20)); werr <- err }()
	time.Sleep(100 * time.Millisecond)
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	for name, ch := range map[string]chan error{"read": rerr, "write": werr} {
		select {
		case err := <-ch:
			if !errors.Is(err, net.ErrClosed) {
				t.Errorf("%s after Close: %v", name, err)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("%s still blocked after Close", name)
		}
	}
	hold <- struct{}{}
	select {
	case err := <-peerErr:
		// END_STREAM then RST_STREAM(NO_ERROR): the peer reads what was
		// sent, then EOF.
		if err != nil {
			t.Fatalf("peer: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("peer did not see the stream end")
	}
}
