package proxy

import (
	"errors"
	"io"
	"net"
	"sync"
	"sync/atomic"
)

// Buffer sizes of the copy loops. An idle connection waits in a read with
// only the small buffer (embedded in the copier); a read that fills it
// switches to a pooled large buffer, which goes back to the pool as soon
// as a read does not fill it. Bulk transfers run on large buffers; idle
// and request/response connections hold no large buffer.
const (
	smallBuf = 2 << 10
	largeBuf = 32 << 10
)

var largePool = sync.Pool{New: func() any { b := make([]byte, largeBuf); return &b }}

// closeWriter is a connection that can half-close (TCP, TLS, HBONE streams).
type closeWriter interface{ CloseWrite() error }

// counter is a byte count readable while the copy runs.
type counter struct{ n atomic.Int64 }

// copier copies one direction.
type copier struct {
	small [smallBuf]byte
}

// copyHalf copies src to dst until EOF or error, then half-closes dst.
func (c *copier) copyHalf(dst, src net.Conn, n *counter) error {
	var large *[]byte
	defer func() {
		if large != nil {
			largePool.Put(large)
		}
	}()
	for {
		buf := c.small[:]
		if large != nil {
			buf = *large
		}
		r, rerr := src.Read(buf)
		if r > 0 {
			w, werr := dst.Write(buf[:r])
			n.n.Add(int64(w))
			if werr != nil {
				return werr
			}
			if w != r {
				return io.ErrShortWrite
			}
		}
		switch {
		case r == len(buf) && large == nil:
			large = largePool.Get().(*[]byte)
		case r < len(buf) && large != nil:
			largePool.Put(large)
			large = nil
		}
		if rerr != nil {
			if errors.Is(rerr, io.EOF) {
				if cw, ok := dst.(closeWriter); ok {
					return cw.CloseWrite()
				}
				return nil
			}
			return rerr
		}
	}
}

// splice copies both ways between client and server, propagating
// half-closes, until both directions are done or one fails (then both
// connections are closed). It returns the bytes that went client→server
// (received, in Istio's terms) and server→client (sent).
func splice(client, server net.Conn, received, sent *counter) error {
	var up copier
	errc := make(chan error, 1)
	go func() {
		err := up.copyHalf(server, client, received)
		if err != nil {
			client.Close()
			server.Close()
		}
		errc <- err
	}()
	var down copier
	err := down.copyHalf(client, server, sent)
	if err != nil {
		client.Close()
		server.Close()
	}
	uerr := <-errc
	client.Close()
	server.Close()
	if err == nil {
		err = uerr
	}
	if isClosed(err) {
		err = nil
	}
	return err
}

// isClosed reports errors that only say a connection went away.
func isClosed(err error) bool {
	return err == nil || errors.Is(err, net.ErrClosed) || errors.Is(err, io.EOF)
}
