package hbone

import (
	"bytes"
	"io"
	"net"
	"net/http"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"go.uber.org/zap"
	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// clientFrames returns a client's frames (after the preface): SETTINGS, then
// what build writes.
func clientFrames(build func(fr *http2.Framer, enc func(...string) []byte)) []byte {
	var buf bytes.Buffer
	fr := http2.NewFramer(&buf, nil)
	var hb bytes.Buffer
	henc := hpack.NewEncoder(&hb)
	enc := func(kv ...string) []byte {
		hb.Reset()
		for i := 0; i+1 < len(kv); i += 2 {
			_ = henc.WriteField(hpack.HeaderField{Name: kv[i], Value: kv[i+1]})
		}
		return append([]byte(nil), hb.Bytes()...)
	}
	_ = fr.WriteSettings(http2.Setting{ID: http2.SettingInitialWindowSize, Val: 1 << 20})
	build(fr, enc)
	return buf.Bytes()
}

// FuzzServerFrames feeds arbitrary frames to a server-side connection (after
// the preface) and checks that it neither panics nor hangs: once the client
// side closes, every goroutine of the connection ends.
func FuzzServerFrames(f *testing.F) {
	connect := []string{":method", "CONNECT", ":authority", "10.0.0.1:80"}
	f.Add(clientFrames(func(fr *http2.Framer, enc func(...string) []byte) {
		_ = fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: enc(connect...), EndHeaders: true})
		_ = fr.WriteData(1, false, []byte("hello"))
		_ = fr.WriteData(1, true, nil)
	}))
	f.Add(clientFrames(func(fr *http2.Framer, enc func(...string) []byte) {
		_ = fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: enc(connect...), EndHeaders: true})
		_ = fr.WriteRSTStream(1, http2.ErrCodeCancel)
		_ = fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 3, BlockFragment: enc(":method", "GET", ":path", "/", ":scheme", "https", ":authority", "x"), EndHeaders: true, EndStream: true})
		_ = fr.WritePing(false, [8]byte{1})
		_ = fr.WriteWindowUpdate(0, 1000)
		_ = fr.WriteWindowUpdate(3, 1000)
		_ = fr.WriteGoAway(0, http2.ErrCodeNo, nil)
	}))
	f.Add(clientFrames(func(fr *http2.Framer, enc func(...string) []byte) {
		blk := enc(connect...)
		_ = fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: blk[:2], EndHeaders: false})
		_ = fr.WriteContinuation(1, true, blk[2:])
		_ = fr.WriteData(1, false, make([]byte, 70000/4))
		_ = fr.WriteSettings(http2.Setting{ID: http2.SettingInitialWindowSize, Val: 0})
		_ = fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 2, BlockFragment: blk, EndHeaders: true})
	}))
	f.Add([]byte{0, 0, 0, 4, 0, 0, 0, 0, 0, 0, 0, 8, 0, 0, 0, 0, 0, 0})
	f.Fuzz(func(t *testing.T, data []byte) {
		cli, srv := net.Pipe()
		var wg sync.WaitGroup
		var c *conn
		c = newConn(srv, spiffeid.ID{}, connConfig{
			maxStreams:   4,
			pingInterval: time.Hour,
			log:          zap.NewNop(),
			spawn:        wg.Go,
			onStream: func(s *Stream, req *request) {
				wg.Go(func() {
					defer func() {
						c.mu.Lock()
						c.handlers--
						c.mu.Unlock()
					}()
					if req.method != http.MethodConnect {
						s.respond(http.StatusBadRequest)
						return
					}
					s.respond(http.StatusOK)
					_, _ = s.Write([]byte("hi"))
					_, _ = io.Copy(io.Discard, s)
					_ = s.Close()
				})
			},
		})
		c.start()
		var rwg sync.WaitGroup
		rwg.Go(func() { _, _ = io.Copy(io.Discard, cli) })
		_ = cli.SetWriteDeadline(time.Now().Add(2 * time.Second))
		_, _ = cli.Write(data)
		_ = cli.Close()
		done := make(chan struct{})
		go func() { wg.Wait(); rwg.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Fatalf("connection goroutines still running 10s after the peer closed")
		}
	})
}
