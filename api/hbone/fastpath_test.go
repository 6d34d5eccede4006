package hbone

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"io"
	"math/rand/v2"
	"net"
	"sync"
	"testing"
	"time"
)

// The fast paths: Stream.Write writing to the socket itself when the
// connection's writer is idle (writeDirectLocked), and the read loop writing
// DATA straight into the TCP socket of a waiting WriteTo (sinkLocked).

// TestSlowSink: a backend that stops reading fills its socket, so the read
// loop's non-blocking writes come up short and WriteTo takes over; the data
// must arrive complete and in order, and the stalled tunnel must not stall
// the read loop (another stream on the same connection keeps working).
func TestSlowSink(t *testing.T) {
	const size = 24 << 20 // several stream windows and socket buffers
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	release := make(chan struct{})
	sum := make(chan []byte, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		<-release
		h := sha256.New()
		// Read in small bites with pauses: the socket fills and drains
		// many times.
		buf := make([]byte, 7000)
		for i := 0; ; i++ {
			n, err := c.Read(buf)
			h.Write(buf[:n])
			if err != nil {
				break
			}
			if i%500 == 0 {
				time.Sleep(time.Millisecond)
			}
		}
		sum <- h.Sum(nil)
	}()
	e := newEnv(t, forward)
	bulk := e.dial(t, ln.Addr().String())
	defer bulk.Close()
	other := e.dial(t, echoServer(t))
	defer other.Close()
	if bulk.c != other.c {
		t.Fatal("the two streams do not share a connection")
	}

	sent := make(chan []byte, 1)
	go func() {
		rng := rand.NewChaCha8([32]byte{7})
		h := sha256.New()
		buf := make([]byte, 100<<10)
		for n := 0; n < size; n += len(buf) {
			_, _ = rng.Read(buf)
			h.Write(buf)
			if _, err := bulk.Write(buf); err != nil {
				t.Errorf("bulk write: %v", err)
				break
			}
		}
		_ = bulk.CloseWrite()
		sent <- h.Sum(nil)
	}()

	// While the backend does not read, the bulk stream's window fills; the
	// other stream still gets answers.
	time.Sleep(200 * time.Millisecond)
	msg := []byte("still moving")
	for range 20 {
		if _, err := other.Write(msg); err != nil {
			t.Fatal(err)
		}
		got := make([]byte, len(msg))
		_ = other.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := io.ReadFull(other, got); err != nil || !bytes.Equal(got, msg) {
			t.Fatalf("other stream while the sink is stalled: %q, %v", got, err)
		}
	}
	close(release)
	want := <-sent
	select {
	case got := <-sum:
		if !bytes.Equal(got, want) {
			t.Fatal("the backend received different bytes than were sent")
		}
	case <-time.After(30 * time.Second):
		t.Fatal("the backend did not receive everything")
	}
}

// TestBackendResetMidStream: when the backend resets its connection while
// data is still arriving, Splice must abort and the client see the reset,
// and nothing may hang.
func TestBackendResetMidStream(t *testing.T) {
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
		_, _ = io.ReadFull(c, make([]byte, 1<<20))
		_ = c.(*net.TCPConn).SetLinger(0)
		c.Close() // RST while the client keeps sending
	}()
	e := newEnv(t, forward)
	s := e.dial(t, ln.Addr().String())
	defer s.Close()
	buf := make([]byte, 32<<10)
	deadline := time.Now().Add(10 * time.Second)
	for {
		_, err := s.Write(buf)
		if err != nil {
			if !errors.Is(err, ErrReset) {
				t.Fatalf("write after the backend reset: %v; want a reset", err)
			}
			return
		}
		if time.Now().After(deadline) {
			t.Fatal("writes still succeed 10s after the backend reset")
		}
	}
}

// TestDirectWriteFairness: a stream writing in bulk from its own goroutine
// (the direct path) must not starve another stream of the same
// connection: once the other stream queues data the writer goroutine takes
// over and serves both in turn.
func TestDirectWriteFairness(t *testing.T) {
	e := newEnv(t, func(context.Context, *Request) (func(net.Conn), error) {
		return func(c net.Conn) { _, _ = io.Copy(c, c) }, nil // echo without half-close
	})
	bulk := e.dial(t, "10.0.0.1:80")
	small := e.dial(t, "10.0.0.2:80")
	if bulk.c != small.c {
		t.Fatal("the two streams do not share a connection")
	}
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Go(func() { _, _ = io.Copy(io.Discard, bulk) })
	wg.Go(func() {
		buf := make([]byte, 1<<20)
		for ctx.Err() == nil {
			if _, err := bulk.Write(buf); err != nil {
				return
			}
		}
	})
	defer func() {
		cancel()
		bulk.Close()
		small.Close()
		wg.Wait()
	}()
	time.Sleep(50 * time.Millisecond) // bulk is streaming
	msg := make([]byte, 1024)
	start := time.Now()
	for i := range 50 {
		_ = small.SetDeadline(time.Now().Add(5 * time.Second))
		if _, err := small.Write(msg); err != nil {
			t.Fatalf("round trip %d write: %v", i, err)
		}
		if _, err := io.ReadFull(small, msg); err != nil {
			t.Fatalf("round trip %d read: %v", i, err)
		}
	}
	t.Logf("50 round trips beside a bulk stream in %v", time.Since(start))
}

// TestSinkWriteError: the read loop's write into WriteTo's socket fails
// (here: the socket was closed under a parked WriteTo). WriteTo returns the
// error, and the stream's flow-control credit is not lost: the peer can
// keep sending on other streams.
func TestSinkWriteError(t *testing.T) {
	send := make(chan []byte)
	e := newEnv(t, func(context.Context, *Request) (func(net.Conn), error) {
		return func(c net.Conn) {
			for b := range send {
				if _, err := c.Write(b); err != nil {
					return
				}
			}
		}, nil
	})
	defer close(send)
	s := e.dial(t, "10.0.0.1:80")
	defer s.Close()
	app, inner := tcpPair(t)
	defer app.Close()
	type result struct {
		n   int64
		err error
	}
	done := make(chan result, 1)
	go func() {
		n, err := s.WriteTo(inner)
		done <- result{n, err}
	}()
	// One message through the read loop's direct write.
	send <- []byte("hello")
	got := make([]byte, 5)
	_ = app.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadFull(app, got); err != nil || string(got) != "hello" {
		t.Fatalf("first message: %q, %v", got, err)
	}
	waitParked(t, s)
	inner.Close()
	send <- []byte("lost")
	select {
	case r := <-done:
		if !errors.Is(r.err, net.ErrClosed) || r.n != 5 {
			t.Fatalf("WriteTo after its socket closed: %d, %v; want 5, net.ErrClosed", r.n, r.err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("WriteTo did not return after its socket failed")
	}
	c := s.c
	c.mu.Lock()
	held := connWindow - c.recvWindow - c.recvUnacked // received, not consumed
	c.mu.Unlock()
	if held != 0 {
		t.Fatalf("%d bytes of connection credit not returned", held)
	}
}

// waitParked waits until s's WriteTo waits for data with an empty buffer.
func waitParked(t *testing.T, s *Stream) {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(time.Millisecond) {
		s.c.mu.Lock()
		parked := s.sinkParked
		s.c.mu.Unlock()
		if parked {
			return
		}
	}
	t.Fatal("WriteTo never parked")
}
