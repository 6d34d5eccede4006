package hbone

import (
	"errors"
	"io"
	"net"
	"sync"
)

// bufPool holds the buffers of copies from sources that are not TCP
// sockets: held for the whole copy, so they stay small.
var bufPool = sync.Pool{New: func() any { b := make([]byte, 32<<10); return &b }}

// readyPool holds the buffers of copies from TCP sockets (copyReady),
// taken only while the socket has data.
const readySize = 64 << 10

var readyPool = sync.Pool{New: func() any { b := make([]byte, readySize); return &b }}

// streamReadSize is how much a copy into a Stream reads at once: four
// DATA frames that each fill one 16 KiB TLS record exactly with their
// header (see emitLocked), so that a read becomes four full records
// (and socket writes) and no small tail record.
const streamReadSize = 4 * (tlsRecord - frameHeader)

// Splice copies a→b and b→a until both directions end and returns the byte
// counts. When one direction reaches EOF it half-closes the other side
// (CloseWrite: END_STREAM on a Stream, FIN on TCP) and the other direction
// keeps flowing. If either direction fails, both connections are aborted (a
// Stream is Reset, a TCP connection closed with RST) and the first error is
// returned. After a clean end the caller closes a and b.
//
// Data moves without per-connection buffers where possible: from a Stream
// straight out of its receive chunks, into a Stream from a TCP socket
// through a pooled buffer taken only once the socket is readable.
func Splice(a, b net.Conn) (aToB, bToA int64, err error) {
	var (
		once     sync.Once
		firstErr error
		wg       sync.WaitGroup
	)
	fail := func(e error) {
		once.Do(func() {
			firstErr = e
			abort(a)
			abort(b)
		})
	}
	wg.Go(func() {
		var e error
		if bToA, e = pipe(a, b); e != nil {
			fail(e)
		}
	})
	var e error
	if aToB, e = pipe(b, a); e != nil {
		fail(e)
	}
	wg.Wait()
	return aToB, bToA, firstErr
}

// pipe copies src to dst and half-closes dst at src's EOF.
func pipe(dst, src net.Conn) (int64, error) {
	n, err := copyConn(dst, src)
	if err != nil {
		return n, err
	}
	if cw, ok := dst.(interface{ CloseWrite() error }); ok {
		if err := cw.CloseWrite(); err != nil && !errors.Is(err, net.ErrClosed) {
			return n, err
		}
	}
	return n, nil
}

func copyConn(dst io.Writer, src io.Reader) (int64, error) {
	if s, ok := src.(*Stream); ok {
		return s.WriteTo(dst)
	}
	return copyFrom(dst, src)
}

func abort(c net.Conn) {
	switch c := c.(type) {
	case *Stream:
		_ = c.Reset()
	case *net.TCPConn:
		_ = c.SetLinger(0)
		_ = c.Close()
	default:
		_ = c.Close()
	}
}

// copyFrom copies src to dst, hiding their ReadFrom/WriteTo methods.
func copyFrom(dst io.Writer, src io.Reader) (int64, error) {
	if tc, ok := src.(*net.TCPConn); ok {
		if n, handled, err := copyReady(dst, tc); handled {
			return n, err
		}
	}
	bp := bufPool.Get().(*[]byte)
	defer bufPool.Put(bp)
	return io.CopyBuffer(struct{ io.Writer }{dst}, struct{ io.Reader }{src}, *bp)
}
