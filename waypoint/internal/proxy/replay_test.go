package proxy

import (
	"bytes"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"net/http"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	discoveryv1 "github.com/amesh-dev/amesh/api/discovery/v1"
	"google.golang.org/protobuf/types/known/durationpb"
)

type testClient struct {
	name string
	c    *http.Client
}

// clients returns an HTTP/1.1 client (a body of unknown length goes out
// chunked) and an h2c client, each with its own connection pool (closed
// when the test ends).
func clients(t testing.TB) []testClient {
	var p http.Protocols
	p.SetUnencryptedHTTP2(true)
	h1, h2 := &http.Transport{}, &http.Transport{Protocols: &p}
	t.Cleanup(func() { h1.CloseIdleConnections(); h2.CloseIdleConnections() })
	return []testClient{
		{"http1", &http.Client{Timeout: 20 * time.Second, Transport: h1}},
		{"h2c", &http.Client{Timeout: 20 * time.Second, Transport: h2}},
	}
}

type attemptBody struct {
	n    int32
	body []byte
	err  error
}

// TestRetryBodyNeverTruncated: a retried request whose body of unknown
// length (HTTP/1.1 chunked, HTTP/2) is still arriving while the first
// attempt fails. Whatever the timing, an upstream that reads a body to its
// end reads the whole body, and the client gets either the success of a
// complete attempt or an error. The retry is decided without waiting for
// the client's next bytes.
func TestRetryBodyNeverTruncated(t *testing.T) {
	full := make([]byte, 140<<10)
	_, _ = rand.Read(full)
	for _, up := range []string{"http", "http2"} {
		for _, cl := range clients(t) {
			for _, sc := range []string{"crosses the replay limit during the failure", "client stalls during the retry"} {
				t.Run(fmt.Sprintf("%s client, %s upstream, %s", cl.name, up, sc), func(t *testing.T) {
					stall := sc == "client stalls during the retry"
					const first = 40 << 10
					var attempts atomic.Int32
					var mu sync.Mutex
					var got []attemptBody
					prefix := make(chan struct{}, 8) // an attempt after the first read the first bytes
					e := newEnv(t)
					e.service("up", 80, up, backend(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
						n := attempts.Add(1)
						rc := http.NewResponseController(w)
						_ = rc.EnableFullDuplex() // answer before the body is read, as real servers may
						if n == 1 {
							if stall {
								// Take everything the client sent so far: the
								// waypoint is then waiting for its next bytes.
								_, _ = io.ReadFull(r.Body, make([]byte, first))
								w.WriteHeader(503)
								return
							}
							// Fail at once, with a slowly sent body: the
							// waypoint keeps reading the client meanwhile.
							w.WriteHeader(503)
							for range 20 {
								_, _ = w.Write([]byte("x"))
								if rc.Flush() != nil {
									return
								}
								select {
								case <-time.After(10 * time.Millisecond):
								case <-r.Context().Done():
									return
								}
							}
							return
						}
						b := make([]byte, 0, len(full))
						buf := make([]byte, 4096)
						var err error
						for {
							var k int
							k, err = r.Body.Read(buf)
							b = append(b, buf[:k]...)
							if len(b) >= first && len(b)-k < first {
								prefix <- struct{}{}
							}
							if err != nil {
								break
							}
						}
						if err == io.EOF {
							err = nil
						}
						mu.Lock()
						got = append(got, attemptBody{n, b, err})
						mu.Unlock()
						if err != nil {
							return
						}
						if !bytes.Equal(b, full) {
							_, _ = io.WriteString(w, "truncated") // the app cannot tell
							return
						}
						_, _ = io.WriteString(w, "complete")
					})))
					e.waypoint(&discoveryv1.WaypointService{Service: key("up"), HttpRoutes: []*discoveryv1.HTTPRoute{{Namespace: "default", Name: "r",
						Rules: []*discoveryv1.HTTPRouteRule{{
							Backends: []*discoveryv1.BackendRef{{Service: key("up"), Port: 80, Weight: 1}},
							Retry:    &discoveryv1.RetryPolicy{Attempts: 2, Codes: []uint32{503}, Backoff: durationpb.New(time.Millisecond)},
						}}}}})
					url := e.front("up", 80, false)

					pr, pw := io.Pipe()
					wrote := make(chan struct{})
					go func() {
						defer close(wrote)
						_, _ = pw.Write(full[:first])
						if stall {
							select {
							case <-prefix:
							case <-time.After(3 * time.Second):
								t.Error("the retry waited for the client's next body bytes")
							}
						}
						for off := first; off < len(full); off += 1 << 10 {
							if _, err := pw.Write(full[off : off+1<<10]); err != nil {
								return
							}
							time.Sleep(5 * time.Millisecond)
						}
						pw.Close()
					}()
					req, _ := http.NewRequest("POST", url+"/upload", pr)
					resp, err := cl.c.Do(req)
					var status int
					var body []byte
					if err == nil {
						status = resp.StatusCode
						body, _ = io.ReadAll(resp.Body)
						resp.Body.Close()
					}
					pr.CloseWithError(io.ErrClosedPipe)
					<-wrote
					// Wait for the attempts still reading (bounded).
					for deadline := time.Now().Add(2 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
						mu.Lock()
						n := len(got)
						mu.Unlock()
						if int32(n) >= attempts.Load()-1 {
							break
						}
					}
					mu.Lock()
					defer mu.Unlock()
					for _, a := range got {
						if a.err == nil && !bytes.Equal(a.body, full) {
							t.Errorf("attempt %d: upstream read a complete body of %d bytes, want the %d sent (first differing byte at %d)",
								a.n, len(a.body), len(full), diffAt(a.body, full))
						}
					}
					switch {
					case err != nil:
						t.Logf("client error after %d attempts: %v", attempts.Load(), err)
					case status == 200 && string(body) != "complete":
						t.Errorf("client got 200 %q", body)
					case status != 200 && status < 500:
						t.Errorf("client got %d %q", status, body)
					default:
						t.Logf("client got %d %q after %d attempts", status, body, attempts.Load())
					}
				})
			}
		}
	}
}

func diffAt(a, b []byte) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	return min(len(a), len(b))
}

// chanReader hands out one queued chunk per Read, blocking until one is
// queued; entered tells that a Read is waiting.
type chanReader struct {
	chunks  chan []byte
	entered chan struct{}
	asked   atomic.Int64 // size of the last read
}

func (c *chanReader) Read(p []byte) (int, error) {
	c.asked.Store(int64(len(p)))
	c.entered <- struct{}{}
	b, ok := <-c.chunks
	if !ok {
		return 0, io.EOF
	}
	if len(b) > len(p) {
		panic("chunk larger than the read")
	}
	return copy(p, b), nil
}

func (c *chanReader) Close() error { return nil }

// TestReplayRetireAndReadInFlight drives the replay record directly: an
// abandoned attempt whose read from the client is still in flight cannot
// take the body past the limit, its bytes go to the next attempt, and
// retiring never waits for the client.
func TestReplayRetireAndReadInFlight(t *testing.T) {
	read := func(v io.Reader, n int) ([]byte, error) {
		b := make([]byte, n)
		k, err := io.ReadFull(v, b)
		return b[:k], err
	}
	t.Run("in-flight read of a retired view joins the record", func(t *testing.T) {
		src := &chanReader{chunks: make(chan []byte), entered: make(chan struct{}, 1)}
		r := newReplay(src, 10)
		a, err := r.next()
		if err != nil {
			t.Fatal(err)
		}
		go func() { <-src.entered; src.chunks <- []byte("abcd") }()
		if b, _ := read(a, 4); string(b) != "abcd" {
			t.Fatalf("first read %q", b)
		}
		// a's transport reads again: in flight until the client sends.
		res := make(chan error, 1)
		go func() { _, err := a.Read(make([]byte, 100)); res <- err }()
		<-src.entered
		if !r.retire(a) { // must not wait for the client
			t.Fatal("retire refused a replayable body")
		}
		b, err := r.next()
		if err != nil {
			t.Fatal(err)
		}
		got := make(chan []byte, 1)
		go func() { p, _ := read(b, 9); got <- p }()
		// The client's next bytes arrive in a's read: capped at the
		// record's room (6 of the 100 asked for).
		src.chunks <- []byte("efghij")
		if err := <-res; !errors.Is(err, errAbandoned) {
			t.Fatalf("retired view read %v", err)
		}
		if n := src.asked.Load(); n != 6 {
			t.Fatalf("read of %d bytes from a record with room for 6", n)
		}
		if p := <-got; string(p) != "abcdefghi" {
			t.Fatalf("next attempt read %q", p)
		}
	})
	t.Run("read in flight from a full record: not replayable", func(t *testing.T) {
		src := &chanReader{chunks: make(chan []byte), entered: make(chan struct{}, 1)}
		r := newReplay(src, 4)
		a, _ := r.next()
		go func() { <-src.entered; src.chunks <- []byte("abcd") }()
		if b, _ := read(a, 4); string(b) != "abcd" {
			t.Fatalf("first read %q", b)
		}
		res := make(chan int, 1)
		go func() { n, _ := a.Read(make([]byte, 100)); res <- n }()
		<-src.entered
		if r.retire(a) {
			t.Fatal("retired although the read in flight may overflow the record")
		}
		src.chunks <- []byte("ef")
		if n := <-res; n != 2 {
			t.Fatalf("the attempt kept its view but read %d bytes", n)
		}
		if _, err := r.next(); !errors.Is(err, errNotReplayable) {
			t.Fatalf("next after overflow: %v", err)
		}
	})
}
