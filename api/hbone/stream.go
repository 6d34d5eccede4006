package hbone

import (
	"context"
	"errors"
	"io"
	"net"
	"os"
	"sync"
	"syscall"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"golang.org/x/net/http2"
)

// Stream is one HBONE tunnel: a CONNECT stream used as a net.Conn. Read and
// Write move the tunnelled bytes; CloseWrite half-closes (END_STREAM); Close
// ends the stream (see the package doc); Reset aborts it. Deadlines behave as
// on a TCP socket. Safe for concurrent use.
type Stream struct {
	c  *conn
	id uint32

	// All fields below are guarded by c.mu.
	rcond, wcond sync.Cond

	rbuf        recvBuf
	recvWindow  int64
	recvUnacked int64
	recvEnd     bool // peer sent END_STREAM

	pending     []byte // the blocked Write's data not yet framed
	written     int    // bytes of the current Write framed so far
	wbusy       bool   // a Write is in progress
	sendWindow  int64
	endQueued   bool // END_STREAM requested
	endSent     bool
	rstAfterEnd bool // Close: RST_STREAM(NO_ERROR) right after END_STREAM
	inWQ        bool

	err          error // terminal I/O error (reset, connection gone)
	closed       bool  // Close or Reset called
	removed      bool  // no longer routed by the connection
	status       int   // client: response status
	dialCanceled bool

	rdl, wdl deadline

	// WriteTo into a TCP socket (Splice): the read loop writes DATA
	// straight to the socket, without waking WriteTo, while WriteTo waits
	// with an empty buffer (see conn.sinkLocked).
	sink       *sink
	sinkParked bool  // WriteTo waits for data with rbuf empty
	sinkBusy   bool  // the read loop is writing to the sink
	sinkWaiter bool  // WriteTo waits for sinkBusy to clear
	sinkN      int64 // bytes the read loop wrote, not yet counted by WriteTo
	sinkErr    error // the read loop's write failed

	cancel context.CancelFunc // server: ends the handler's context
}

type deadline struct {
	t       time.Time
	timer   *time.Timer
	expired bool
	gen     uint64
}

var _ net.Conn = (*Stream)(nil)

// sendableLocked reports whether the writer has something it can send for s
// now (flow control permitting for data).
func (s *Stream) sendableLocked() bool {
	if s.removed {
		return false
	}
	if len(s.pending) > 0 {
		return s.sendWindow > 0
	}
	return s.endQueued && !s.endSent
}

// failLocked ends s with err: blocked and future I/O fail, it stops being
// routed.
func (s *Stream) failLocked(err error) {
	if s.err == nil {
		s.err = err
	}
	s.pending = nil
	s.c.removeStreamLocked(s)
	s.rcond.Broadcast()
	s.wcond.Broadcast()
}

func (s *Stream) maybeFinishLocked() {
	if s.endSent && s.recvEnd {
		s.c.removeStreamLocked(s)
	}
}

// Read reads tunnelled bytes; io.EOF after the peer's END_STREAM.
func (s *Stream) Read(p []byte) (int, error) {
	c := s.c
	c.mu.Lock()
	defer c.mu.Unlock()
	for {
		if s.rbuf.n > 0 {
			if len(p) == 0 {
				return 0, nil
			}
			n := s.rbuf.read(p)
			c.consumedLocked(s, n)
			return n, nil
		}
		if err := s.readyLocked(); err != nil {
			return 0, err
		}
		if len(p) == 0 {
			return 0, nil
		}
		s.rcond.Wait()
	}
}

// readyLocked returns the error a Read would see with an empty buffer, or
// nil if it would block.
func (s *Stream) readyLocked() error {
	switch {
	case s.closed:
		return net.ErrClosed
	case s.recvEnd:
		return io.EOF
	case s.err != nil:
		return s.err
	case s.rdl.expired:
		return os.ErrDeadlineExceeded
	}
	return nil
}

func (s *Stream) writeErrLocked() error {
	switch {
	case s.closed:
		return net.ErrClosed
	case s.err != nil:
		return s.err
	case s.wdl.expired:
		return os.ErrDeadlineExceeded
	}
	return nil
}

var errWriteAfterCloseWrite = errors.New("hbone: write after CloseWrite")

// Write sends p; it returns once p has been framed into the connection's
// write batch, blocking while flow control does not allow sending.
func (s *Stream) Write(p []byte) (int, error) {
	c := s.c
	c.mu.Lock()
	defer c.mu.Unlock()
	for s.wbusy {
		if err := s.writeErrLocked(); err != nil {
			return 0, err
		}
		s.wcond.Wait()
	}
	if err := s.writeErrLocked(); err != nil {
		return 0, err
	}
	if s.endQueued {
		return 0, errWriteAfterCloseWrite
	}
	if len(p) == 0 {
		return 0, nil
	}
	s.wbusy = true
	s.pending, s.written = p, 0
	c.writeDirectLocked(s)
	c.enqueueLocked(s)
	for s.written < len(p) {
		if err := s.writeErrLocked(); err != nil {
			n := s.written
			s.pending = nil
			s.wbusy = false
			s.wcond.Broadcast()
			return n, err
		}
		s.wcond.Wait()
	}
	s.pending = nil
	s.wbusy = false
	s.wcond.Broadcast()
	if s.endQueued { // a CloseWrite waited for this Write
		c.writeDirectLocked(s)
		c.enqueueLocked(s)
	}
	return len(p), nil
}

// CloseWrite sends END_STREAM after the data already written: the peer reads
// EOF, and this side can keep reading.
func (s *Stream) CloseWrite() error {
	c := s.c
	c.mu.Lock()
	defer c.mu.Unlock()
	if s.closed {
		return net.ErrClosed
	}
	if s.endQueued {
		return nil
	}
	if s.err != nil {
		return s.err
	}
	s.endQueued = true
	if !s.wbusy {
		c.writeDirectLocked(s)
	}
	c.enqueueLocked(s)
	return nil
}

// Close ends the stream: END_STREAM follows the data already written (if not
// sent yet) and, if the peer has not finished sending, RST_STREAM(NO_ERROR)
// tells it to stop. Unread data is dropped; blocked Read and Write return.
func (s *Stream) Close() error {
	c := s.c
	c.mu.Lock()
	defer c.mu.Unlock()
	if s.closed {
		return nil
	}
	s.closeLocked()
	return nil
}

func (s *Stream) closeLocked() {
	c := s.c
	s.closed = true
	s.stopDeadlinesLocked()
	c.consumedLocked(s, s.rbuf.n)
	s.rbuf.reset()
	s.pending = nil
	s.rcond.Broadcast()
	s.wcond.Broadcast()
	if s.removed || c.closing {
		return
	}
	switch {
	case !s.endSent:
		s.endQueued = true
		s.rstAfterEnd = true
		s.wbusy = false
		c.writeDirectLocked(s)
		c.enqueueLocked(s)
	case !s.recvEnd:
		c.resetLocked(s, http2.ErrCodeNo, net.ErrClosed)
	}
}

// Reset aborts the stream with RST_STREAM(CONNECT_ERROR), the HTTP/2 form of
// a TCP reset (RFC 9113 §8.5).
func (s *Stream) Reset() error {
	c := s.c
	c.mu.Lock()
	defer c.mu.Unlock()
	if !s.closed {
		s.closed = true
		s.stopDeadlinesLocked()
		c.consumedLocked(s, s.rbuf.n)
		s.rbuf.reset()
	}
	if !s.removed && !c.closing {
		c.resetLocked(s, http2.ErrCodeConnect, net.ErrClosed)
	}
	s.rcond.Broadcast()
	s.wcond.Broadcast()
	return nil
}

// Peer returns the verified SPIFFE ID of the other end of the tunnel.
func (s *Stream) Peer() spiffeid.ID { return s.c.peer }

// LocalAddr returns the local address of the underlying TCP connection.
func (s *Stream) LocalAddr() net.Addr { return s.c.nc.LocalAddr() }

// RemoteAddr returns the remote address of the underlying TCP connection.
func (s *Stream) RemoteAddr() net.Addr { return s.c.nc.RemoteAddr() }

// SetDeadline sets the read and write deadlines.
func (s *Stream) SetDeadline(t time.Time) error {
	s.SetReadDeadline(t)
	s.SetWriteDeadline(t)
	return nil
}

// SetReadDeadline sets the read deadline (zero: none).
func (s *Stream) SetReadDeadline(t time.Time) error {
	s.setDeadline(&s.rdl, &s.rcond, t)
	return nil
}

// SetWriteDeadline sets the write deadline (zero: none).
func (s *Stream) SetWriteDeadline(t time.Time) error {
	s.setDeadline(&s.wdl, &s.wcond, t)
	return nil
}

func (s *Stream) setDeadline(d *deadline, cond *sync.Cond, t time.Time) {
	c := s.c
	c.mu.Lock()
	defer c.mu.Unlock()
	if d.timer != nil {
		d.timer.Stop()
		d.timer = nil
	}
	d.gen++
	d.t, d.expired = t, false
	if t.IsZero() || s.closed {
		return
	}
	wait := time.Until(t)
	if wait <= 0 {
		d.expired = true
		cond.Broadcast()
		return
	}
	gen := d.gen
	d.timer = time.AfterFunc(wait, func() {
		c.mu.Lock()
		defer c.mu.Unlock()
		if d.gen == gen {
			d.expired = true
			cond.Broadcast()
		}
	})
}

func (s *Stream) stopDeadlinesLocked() {
	for _, d := range []*deadline{&s.rdl, &s.wdl} {
		if d.timer != nil {
			d.timer.Stop()
			d.timer = nil
		}
		d.gen++
	}
}

// WriteTo writes the stream's data to w until EOF without an intermediate
// buffer: received chunks are handed to w directly. When w is a TCP socket,
// the connection's read loop writes arriving data to it itself while WriteTo
// has nothing buffered (a non-blocking write; what the socket does not take
// is buffered for WriteTo), which saves waking WriteTo for every frame.
func (s *Stream) WriteTo(w io.Writer) (int64, error) {
	c := s.c
	var total int64
	c.mu.Lock()
	if tc, ok := w.(*net.TCPConn); ok && s.sink == nil {
		if rc, err := tc.SyscallConn(); err == nil {
			s.sink = newSink(rc)
		}
	}
	defer func() {
		c.mu.Lock()
		for s.sinkBusy {
			s.sinkWaiter = true
			s.rcond.Wait()
		}
		s.sink, s.sinkParked = nil, false
		c.mu.Unlock()
	}()
	for {
		for {
			if s.sinkBusy {
				s.sinkParked = false
				s.sinkWaiter = true
				s.rcond.Wait()
				continue
			}
			total += s.sinkN
			s.sinkN = 0
			if s.rbuf.n > 0 || s.sinkErr != nil || s.readyLocked() != nil {
				break
			}
			s.sinkParked = s.sink != nil
			s.rcond.Wait()
		}
		s.sinkParked = false
		if s.sinkErr != nil {
			err := s.sinkErr
			c.mu.Unlock()
			return total, err
		}
		if s.rbuf.n == 0 {
			err := s.readyLocked()
			c.mu.Unlock()
			if err == io.EOF {
				err = nil
			}
			return total, err
		}
		chunk, data := s.rbuf.pop()
		c.consumedLocked(s, len(data))
		c.mu.Unlock()
		n, err := w.Write(data)
		putChunk(chunk)
		total += int64(n)
		if err != nil {
			return total, err
		}
		c.mu.Lock()
	}
}

// sink is a TCP socket that a Stream's data is written to (WriteTo).
type sink struct {
	rc syscall.RawConn
	fn func(fd uintptr) bool // writes p once; allocated once
	p  []byte
	n  int
	// err is the write's error (EAGAIN when the socket is full).
	err error
}

func newSink(rc syscall.RawConn) *sink {
	k := &sink{rc: rc}
	k.fn = func(fd uintptr) bool {
		for {
			k.n, k.err = syscall.Write(int(fd), k.p)
			if k.err != syscall.EINTR {
				return true
			}
		}
	}
	return k
}

// write writes p without blocking and returns how much the socket took and
// the error that stopped it (nil when the socket is merely full).
func (k *sink) write(p []byte) (int, error) {
	k.p = p
	err := k.rc.Write(k.fn)
	n, werr := max(k.n, 0), k.err
	k.p, k.n, k.err = nil, 0, nil
	if err != nil {
		return n, err
	}
	if werr == syscall.EAGAIN {
		werr = nil
	} else if werr != nil {
		werr = os.NewSyscallError("write", werr)
	}
	return n, werr
}

// ReadFrom sends r's data on the stream until r's EOF. For a *net.TCPConn
// source it waits for readability before taking a buffer, so an idle tunnel
// holds none.
func (s *Stream) ReadFrom(r io.Reader) (int64, error) {
	return copyFrom(s, r)
}

// ---- receive buffer ----

// Received data waits in pooled chunks. A short message arriving on an empty
// buffer (a request, a response, an RPC of a few hundred bytes) waits in a
// small chunk, so that a stream holds 2 KiB for it rather than 16; data
// that piles up waits in full-size ones.
const (
	chunkSize      = 16 << 10
	smallChunkSize = 2 << 10
)

var (
	chunkPool      = sync.Pool{New: func() any { b := make([]byte, chunkSize); return &b }}
	smallChunkPool = sync.Pool{New: func() any { b := make([]byte, smallChunkSize); return &b }}
)

// putChunk returns a chunk to its pool.
func putChunk(b *[]byte) {
	switch len(*b) {
	case chunkSize:
		chunkPool.Put(b)
	case smallChunkSize:
		smallChunkPool.Put(b)
	}
}

// recvBuf queues received bytes in pooled chunks that are released as soon
// as they are read, so an idle stream holds no buffer.
type recvBuf struct {
	chunks []*[]byte
	head   int // read offset in chunks[0]
	tail   int // write offset in the last chunk
	n      int
}

func (b *recvBuf) write(p []byte) {
	for len(p) > 0 {
		if len(b.chunks) == 0 || b.tail == len(*b.chunks[len(b.chunks)-1]) {
			pool := &chunkPool
			if b.n == 0 && len(p) <= smallChunkSize {
				pool = &smallChunkPool
			}
			b.chunks = append(b.chunks, pool.Get().(*[]byte))
			b.tail = 0
		}
		k := copy((*b.chunks[len(b.chunks)-1])[b.tail:], p)
		b.tail += k
		b.n += k
		p = p[k:]
	}
}

// end is the end of the bytes written to chunks[0].
func (b *recvBuf) end() int {
	if len(b.chunks) == 1 {
		return b.tail
	}
	return len(*b.chunks[0])
}

func (b *recvBuf) read(p []byte) int {
	n := 0
	for len(p) > 0 && b.n > 0 {
		end := b.end()
		k := copy(p, (*b.chunks[0])[b.head:end])
		b.head += k
		b.n -= k
		n += k
		p = p[k:]
		if b.head == end {
			b.dropHead()
		}
	}
	return n
}

// pop removes the first chunk and returns it with its unread bytes; the
// caller returns it with putChunk.
func (b *recvBuf) pop() (*[]byte, []byte) {
	chunk := b.chunks[0]
	data := (*chunk)[b.head:b.end()]
	b.n -= len(data)
	b.chunks[0] = nil
	b.chunks = b.chunks[1:]
	b.head = 0
	if len(b.chunks) == 0 {
		b.chunks, b.tail = nil, 0
	}
	return chunk, data
}

func (b *recvBuf) dropHead() {
	putChunk(b.chunks[0])
	b.chunks[0] = nil
	b.chunks = b.chunks[1:]
	b.head = 0
	if len(b.chunks) == 0 {
		b.chunks, b.tail = nil, 0
	}
}

func (b *recvBuf) reset() {
	for _, c := range b.chunks {
		putChunk(c)
	}
	*b = recvBuf{}
}
