package hbone

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"net/http"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"go.uber.org/zap"
	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// Tunnel tuning (see the package doc).
const (
	streamWindow  = 4 << 20  // per-stream receive window we grant
	connWindow    = 16 << 20 // connection receive window we grant (4× a stream)
	maxFrame      = 16 << 10 // largest DATA payload we send and accept
	tlsRecord     = 16 << 10 // largest TLS record payload (crypto/tls writes full records once warm)
	frameHeader   = 9
	maxBatch      = 64 << 10 // bytes gathered into one socket write
	initialWindow = 65535    // RFC 9113 initial window
	maxHeaderList = 16 << 10
	maxWindow     = 1<<31 - 1
	closeTimeout  = 2 * time.Second // bound on the final flush of a closing connection

	defaultPingInterval = 10 * time.Second
	defaultPingTimeout  = 20 * time.Second
)

type connConfig struct {
	client       bool
	maxStreams   uint32 // server: MAX_CONCURRENT_STREAMS we accept
	pingInterval time.Duration
	pingTimeout  time.Duration
	idleTimeout  time.Duration // client: close after this long without streams
	log          *zap.Logger
	spawn        func(func())                  // runs the connection's goroutines
	onStream     func(s *Stream, req *request) // server: a new CONNECT (or other) request
	onClose      func(c *conn)                 // once, after both loops exited
}

// request is what a server learns from a request's HEADERS.
type request struct {
	method, authority, scheme, path, protocol string
	header                                    http.Header
	truncated                                 bool // header list over maxHeaderList
}

// conn is one HTTP/2 connection (client or server side) carrying streams.
type conn struct {
	nc       net.Conn
	cfg      connConfig
	peer     spiffeid.ID
	expiry   time.Time     // peer's (and, client side, own) certificate NotAfter
	rfr      *http2.Framer // used by the read loop only
	lastRead atomic.Int64  // unix nanos of the last frame read

	mu   sync.Mutex
	wfr  *http2.Framer // writes control frames into ctrl; under mu
	ctrl []byte
	henc *hpack.Encoder
	hbuf bytes.Buffer
	wq   []*Stream // streams with something to send
	wake chan struct{}

	streams   map[uint32]*Stream
	nextID    uint32 // client: next stream ID
	maxPeerID uint32 // server: highest stream ID the peer opened
	reserved  int    // client: slots reserved by Dial, not yet streams

	sendWindow     int64 // connection send window
	peerInitWindow int64
	peerMaxStreams uint32
	peerMaxHeader  uint32 // SETTINGS_MAX_HEADER_LIST_SIZE; 0 = unlimited
	recvWindow     int64  // connection credit the peer still has
	recvUnacked    int64  // consumed, not yet returned by WINDOW_UPDATE
	sawSettings    bool

	pingOut   bool
	pingData  [8]byte
	pingSent  time.Time
	pingTimer *time.Timer
	idleTimer *time.Timer

	// writing: a goroutine (the writer, or a Stream.Write writing directly)
	// owns the socket's write side: it framed a batch and is writing it.
	// Frames are framed and written in one order, by one owner at a time.
	writing bool

	handlers       int // server: handler goroutines running
	goAwaySent     bool
	goAwaySentLast uint32
	goAwayRecv     bool
	closing        bool
	err            error
	loops          int
	done           chan struct{}
}

type ctrlWriter struct{ c *conn }

func (w ctrlWriter) Write(p []byte) (int, error) {
	w.c.ctrl = append(w.c.ctrl, p...)
	return len(p), nil
}

// maxCtrl bounds the queued control frames: a peer that floods PINGs or
// SETTINGS without reading our answers gets ENHANCE_YOUR_CALM.
const maxCtrl = 1 << 20

func (c *conn) checkCtrlLocked() error {
	if len(c.ctrl) > maxCtrl {
		return connErr(http2.ErrCodeEnhanceYourCalm)
	}
	return nil
}

func newConn(nc net.Conn, peer spiffeid.ID, cfg connConfig) *conn {
	var expiry time.Time
	if tc, ok := nc.(*tls.Conn); ok {
		expiry = certExpiry(tc.ConnectionState())
	}
	if cfg.pingInterval <= 0 {
		cfg.pingInterval = defaultPingInterval
	}
	if cfg.pingTimeout <= 0 {
		cfg.pingTimeout = defaultPingTimeout
	}
	c := &conn{
		nc:             nc,
		cfg:            cfg,
		peer:           peer,
		expiry:         expiry,
		wake:           make(chan struct{}, 1),
		streams:        make(map[uint32]*Stream),
		nextID:         1,
		sendWindow:     initialWindow,
		peerInitWindow: initialWindow,
		peerMaxStreams: 100,
		recvWindow:     initialWindow,
		loops:          2,
		done:           make(chan struct{}),
	}
	c.rfr = http2.NewFramer(io.Discard, nc)
	c.rfr.SetMaxReadFrameSize(maxFrame)
	c.rfr.SetReuseFrames()
	c.rfr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
	c.rfr.MaxHeaderListSize = maxHeaderList
	c.wfr = http2.NewFramer(ctrlWriter{c}, nil)
	c.henc = hpack.NewEncoder(&c.hbuf)
	return c
}

// start queues the preface and settings and starts the loops.
func (c *conn) start() {
	c.mu.Lock()
	if c.cfg.client {
		c.ctrl = append(c.ctrl, http2.ClientPreface...)
		_ = c.wfr.WriteSettings(
			http2.Setting{ID: http2.SettingEnablePush, Val: 0},
			http2.Setting{ID: http2.SettingInitialWindowSize, Val: streamWindow},
			http2.Setting{ID: http2.SettingMaxHeaderListSize, Val: maxHeaderList},
		)
	} else {
		_ = c.wfr.WriteSettings(
			http2.Setting{ID: http2.SettingMaxConcurrentStreams, Val: c.cfg.maxStreams},
			http2.Setting{ID: http2.SettingInitialWindowSize, Val: streamWindow},
			http2.Setting{ID: http2.SettingMaxHeaderListSize, Val: maxHeaderList},
		)
	}
	_ = c.wfr.WriteWindowUpdate(0, connWindow-initialWindow)
	c.recvWindow = connWindow
	c.lastRead.Store(time.Now().UnixNano())
	c.pingTimer = time.AfterFunc(c.cfg.pingInterval, c.onPingTimer)
	c.armIdleLocked()
	c.mu.Unlock()
	c.cfg.spawn(c.readLoop)
	c.cfg.spawn(c.writeLoop)
}

func (c *conn) signalLocked() {
	select {
	case c.wake <- struct{}{}:
	default:
	}
}

// shutdownLocked starts closing the connection: all streams fail with err, a
// GOAWAY with code is queued if goAway, and the writer flushes and closes the
// socket.
func (c *conn) shutdownLocked(err error, code http2.ErrCode, goAway bool) {
	if c.closing {
		return
	}
	if goAway && !c.goAwaySent {
		c.goAwaySent = true
		_ = c.wfr.WriteGoAway(c.maxPeerID, code, nil)
	}
	c.closing = true
	c.err = err
	for _, s := range c.streams {
		s.failLocked(err)
	}
	c.wq = nil
	if c.pingTimer != nil {
		c.pingTimer.Stop()
	}
	if c.idleTimer != nil {
		c.idleTimer.Stop()
	}
	_ = c.nc.SetWriteDeadline(time.Now().Add(closeTimeout))
	c.signalLocked()
}

func (c *conn) shutdown(err error, code http2.ErrCode, goAway bool) {
	c.mu.Lock()
	c.shutdownLocked(err, code, goAway)
	c.mu.Unlock()
}

// close closes the connection now, resetting its streams.
func (c *conn) close(err error) { c.shutdown(err, http2.ErrCodeNo, true) }

// drain sends GOAWAY: no new streams; the connection closes once the
// existing ones end.
func (c *conn) drain() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closing {
		return
	}
	if !c.goAwaySent {
		c.goAwaySent = true
		c.goAwaySentLast = c.maxPeerID
		_ = c.wfr.WriteGoAway(c.maxPeerID, http2.ErrCodeNo, nil)
		c.signalLocked()
	}
	if len(c.streams) == 0 {
		c.shutdownLocked(errConnClosed, http2.ErrCodeNo, false)
	}
}

func (c *conn) loopDone() {
	c.mu.Lock()
	c.loops--
	last := c.loops == 0
	c.mu.Unlock()
	if last {
		close(c.done)
		if c.cfg.onClose != nil {
			c.cfg.onClose(c)
		}
	}
}

// armIdleLocked starts the idle timer of a client connection without streams.
func (c *conn) armIdleLocked() {
	if !c.cfg.client || c.cfg.idleTimeout <= 0 || c.closing || len(c.streams) > 0 || c.reserved > 0 {
		return
	}
	if c.idleTimer == nil {
		c.idleTimer = time.AfterFunc(c.cfg.idleTimeout, c.onIdleTimer)
	} else {
		c.idleTimer.Reset(c.cfg.idleTimeout)
	}
}

func (c *conn) onIdleTimer() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.streams) == 0 && c.reserved == 0 {
		c.shutdownLocked(errConnClosed, http2.ErrCodeNo, true)
	}
}

func (c *conn) onPingTimer() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closing {
		return
	}
	now := time.Now()
	if c.pingOut {
		if wait := c.cfg.pingTimeout - now.Sub(c.pingSent); wait > 0 {
			c.pingTimer.Reset(wait)
			return
		}
		c.cfg.log.Debug("hbone: keepalive PING unanswered; closing", zap.Stringer("peer", c.nc.RemoteAddr()))
		c.shutdownLocked(fmt.Errorf("%w: keepalive timeout", errConnClosed), http2.ErrCodeNo, false)
		return
	}
	idle := now.Sub(time.Unix(0, c.lastRead.Load()))
	if idle < c.cfg.pingInterval {
		c.pingTimer.Reset(c.cfg.pingInterval - idle)
		return
	}
	c.pingOut = true
	c.pingSent = now
	c.pingData = [8]byte{}
	strconv.AppendInt(c.pingData[:0], now.UnixNano()%1e8, 10)
	_ = c.wfr.WritePing(false, c.pingData)
	c.signalLocked()
	c.pingTimer.Reset(c.cfg.pingTimeout)
}

// ---- writing ----

var batchPool = sync.Pool{New: func() any { b := make([]byte, 0, maxBatch+2*maxFrame); return &b }}

func (c *conn) writeLoop() {
	defer c.loopDone()
	defer c.nc.Close()
	var bp *[]byte
	c.mu.Lock()
	for {
		var buf []byte
		for {
			if !c.writing {
				if bp == nil {
					bp = batchPool.Get().(*[]byte)
				}
				buf = c.fillLocked((*bp)[:0])
				if len(buf) > 0 || c.closing {
					break
				}
			}
			if bp != nil {
				batchPool.Put(bp) // idle connections hold no write buffer
				bp = nil
			}
			c.mu.Unlock()
			<-c.wake
			c.mu.Lock()
		}
		closing := c.closing
		c.writing = true
		c.mu.Unlock()
		var err error
		if len(buf) > 0 {
			_, err = c.nc.Write(buf)
		}
		if cap(buf) <= maxBatch+4*maxFrame {
			*bp = buf[:0]
		}
		c.mu.Lock()
		c.writing = false
		if err != nil {
			c.shutdownLocked(fmt.Errorf("%w: write: %w", errConnClosed, err), 0, false)
			closing = true
		}
		if closing {
			c.mu.Unlock()
			batchPool.Put(bp)
			return
		}
	}
}

// writeDirectLocked writes s's pending data (and END_STREAM) from the
// calling goroutine while nothing else waits for the socket: it frames the
// queued control frames and a batch of s.pending and writes them itself instead of waking
// the writer goroutine and waiting for it (two goroutine handoffs per Write
// saved), batch after batch until s.pending is sent, flow control stops it,
// or another stream queues data (then the writer takes over, round robin).
//
// Only for a Stream without a write deadline: the socket write cannot be
// interrupted, so a deadline could not be kept if the socket were full (the
// writer goroutine path keeps it). Called and returns with c.mu held; it is
// released during each socket write.
func (c *conn) writeDirectLocked(s *Stream) {
	if c.writing || !s.wdl.t.IsZero() {
		return
	}
	var bp *[]byte
	for !c.closing && s.sendableLocked() && (len(s.pending) == 0 || c.sendWindow > 0) &&
		(len(c.wq) == 0 || len(c.wq) == 1 && c.wq[0] == s) {
		if !s.inWQ {
			s.inWQ = true
			c.wq = append(c.wq, s)
		}
		if bp == nil {
			bp = batchPool.Get().(*[]byte)
		}
		c.writeBatchLocked(bp)
	}
	if bp != nil {
		batchPool.Put(bp)
	}
	if len(c.ctrl) > 0 || len(c.wq) > 0 || c.closing {
		c.signalLocked()
	}
}

// flushCtrlLocked writes the queued control frames (a header block) from
// the calling goroutine when the socket is free and no stream data waits
// (the writer would send the control frames first anyway), sparing the
// writer goroutine's wake-up; otherwise it wakes the writer. As with
// writeDirectLocked, c.mu is released during the socket write. A write
// that finds the socket's buffer full waits for it to drain (the peer's
// read loop drains it unless the peer is gone; keepalive then ends the
// connection).
func (c *conn) flushCtrlLocked() {
	if c.writing || c.closing || len(c.wq) > 0 || len(c.ctrl) == 0 {
		c.signalLocked()
		return
	}
	bp := batchPool.Get().(*[]byte)
	c.writeBatchLocked(bp)
	batchPool.Put(bp)
	if len(c.ctrl) > 0 || len(c.wq) > 0 || c.closing {
		c.signalLocked()
	}
}

// writeBatchLocked fills a batch in *bp and writes it from the calling
// goroutine, holding the socket (c.writing) and releasing c.mu meanwhile.
func (c *conn) writeBatchLocked(bp *[]byte) {
	c.writing = true
	buf := c.fillLocked((*bp)[:0])
	if len(buf) == 0 {
		c.writing = false
		return
	}
	c.mu.Unlock()
	_, err := c.nc.Write(buf)
	if cap(buf) <= maxBatch+4*maxFrame {
		*bp = buf[:0]
	}
	c.mu.Lock()
	c.writing = false
	if err != nil {
		c.shutdownLocked(fmt.Errorf("%w: write: %w", errConnClosed, err), 0, false)
	}
}

func appendFrameHeader(b []byte, length int, typ http2.FrameType, flags http2.Flags, id uint32) []byte {
	return append(b, byte(length>>16), byte(length>>8), byte(length), byte(typ), byte(flags),
		byte(id>>24), byte(id>>16), byte(id>>8), byte(id))
}

func appendRST(b []byte, id uint32, code http2.ErrCode) []byte {
	b = appendFrameHeader(b, 4, http2.FrameRSTStream, 0, id)
	return append(b, byte(code>>24), byte(code>>16), byte(code>>8), byte(code))
}

// fillLocked appends the queued control frames and then DATA frames, one
// frame per stream per round, until the batch is full or nothing can be sent.
func (c *conn) fillLocked(buf []byte) []byte {
	buf = append(buf, c.ctrl...)
	if cap(c.ctrl) > 64<<10 {
		c.ctrl = nil
	} else {
		c.ctrl = c.ctrl[:0]
	}
	if c.closing {
		return buf
	}
	for len(buf) < maxBatch && len(c.wq) > 0 {
		progress := false
		next := c.wq[:0]
		for i, s := range c.wq {
			if len(buf) >= maxBatch {
				next = append(next, c.wq[i:]...)
				break
			}
			var wrote bool
			buf, wrote = c.emitLocked(buf, s)
			progress = progress || wrote
			if s.sendableLocked() {
				next = append(next, s)
			} else {
				s.inWQ = false
			}
		}
		clear(c.wq[len(next):])
		c.wq = next
		if !progress {
			break
		}
	}
	return buf
}

// emitLocked appends at most one frame of s.
func (c *conn) emitLocked(buf []byte, s *Stream) ([]byte, bool) {
	if s.removed {
		return buf, false
	}
	if len(s.pending) > 0 {
		// End the frame at a TLS record boundary of the batch when it is
		// large: crypto/tls cuts a write into 16 KiB records, one socket
		// write each, so 16 KiB payloads plus headers would cost a fifth
		// record (and syscall) per 64 KiB batch, and the reader two TLS
		// reads for most frames.
		room := tlsRecord - len(buf)%tlsRecord
		if room <= frameHeader {
			room += tlsRecord
		}
		k := int64(min(len(s.pending), room-frameHeader))
		k = min(k, s.sendWindow, c.sendWindow)
		if k <= 0 {
			return buf, false
		}
		end := s.endQueued && int(k) == len(s.pending)
		var flags http2.Flags
		if end {
			flags = http2.FlagDataEndStream
		}
		buf = appendFrameHeader(buf, int(k), http2.FrameData, flags, s.id)
		buf = append(buf, s.pending[:k]...)
		s.pending = s.pending[k:]
		s.written += int(k)
		s.sendWindow -= k
		c.sendWindow -= k
		if len(s.pending) == 0 {
			s.pending = nil
			s.wcond.Broadcast()
		}
		if end {
			buf = c.endSentLocked(buf, s)
		}
		return buf, true
	}
	if s.endQueued && !s.endSent {
		buf = appendFrameHeader(buf, 0, http2.FrameData, http2.FlagDataEndStream, s.id)
		return c.endSentLocked(buf, s), true
	}
	return buf, false
}

func (c *conn) endSentLocked(buf []byte, s *Stream) []byte {
	s.endSent = true
	if s.rstAfterEnd && !s.recvEnd {
		buf = appendRST(buf, s.id, http2.ErrCodeNo)
		s.failLocked(net.ErrClosed)
		return buf
	}
	s.maybeFinishLocked()
	return buf
}

func (c *conn) enqueueLocked(s *Stream) {
	if !s.inWQ && s.sendableLocked() {
		s.inWQ = true
		c.wq = append(c.wq, s)
		c.signalLocked()
	}
}

// writeHeadersLocked queues a header block (HEADERS + CONTINUATION); the
// caller flushes it (flushCtrlLocked).
func (c *conn) writeHeadersLocked(id uint32, fields []hpack.HeaderField, end bool) {
	c.hbuf.Reset()
	for _, f := range fields {
		_ = c.henc.WriteField(f)
	}
	block := c.hbuf.Bytes()
	first := true
	for first || len(block) > 0 {
		chunk := block[:min(len(block), maxFrame)]
		block = block[len(chunk):]
		if first {
			_ = c.wfr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: chunk, EndStream: end, EndHeaders: len(block) == 0})
			first = false
		} else {
			_ = c.wfr.WriteContinuation(id, len(block) == 0, chunk)
		}
	}
}

func (c *conn) writeRSTLocked(id uint32, code http2.ErrCode) {
	_ = c.wfr.WriteRSTStream(id, code)
	c.signalLocked()
}

// consumedLocked returns flow-control credit for n bytes taken out of s's
// buffer (s may be nil for bytes that never reached a stream).
func (c *conn) consumedLocked(s *Stream, n int) {
	if n <= 0 || c.closing {
		return
	}
	c.recvUnacked += int64(n)
	if c.recvUnacked >= connWindow/4 {
		_ = c.wfr.WriteWindowUpdate(0, uint32(c.recvUnacked))
		c.recvWindow += c.recvUnacked
		c.recvUnacked = 0
		c.signalLocked()
	}
	if s == nil || s.removed || s.recvEnd {
		return
	}
	s.recvUnacked += int64(n)
	if s.recvUnacked >= streamWindow/4 {
		_ = c.wfr.WriteWindowUpdate(s.id, uint32(s.recvUnacked))
		s.recvWindow += s.recvUnacked
		s.recvUnacked = 0
		c.signalLocked()
	}
}

// ---- streams ----

func (c *conn) newStreamLocked(id uint32) *Stream {
	s := &Stream{c: c, id: id, recvWindow: streamWindow, sendWindow: c.peerInitWindow}
	s.rcond.L = &c.mu
	s.wcond.L = &c.mu
	c.streams[id] = s
	if c.idleTimer != nil {
		c.idleTimer.Stop()
	}
	return s
}

func (c *conn) removeStreamLocked(s *Stream) {
	if s.removed {
		return
	}
	s.removed = true
	delete(c.streams, s.id)
	if s.cancel != nil {
		s.cancel()
	}
	s.rcond.Broadcast()
	s.wcond.Broadcast()
	if len(c.streams) == 0 && !c.closing {
		if c.goAwayRecv || (c.goAwaySent && !c.cfg.client) {
			c.shutdownLocked(errConnClosed, http2.ErrCodeNo, false)
			return
		}
		c.armIdleLocked()
	}
}

// resetLocked resets s with RST_STREAM(code); its I/O fails with err.
func (c *conn) resetLocked(s *Stream, code http2.ErrCode, err error) {
	if s.removed {
		return
	}
	c.writeRSTLocked(s.id, code)
	s.failLocked(err)
}

// ---- reading ----

func (c *conn) readLoop() {
	defer c.loopDone()
	for {
		f, err := c.rfr.ReadFrame()
		if err == nil {
			c.lastRead.Store(time.Now().UnixNano())
			err = c.handle(f)
		}
		if err == nil {
			continue
		}
		var se http2.StreamError
		if errors.As(err, &se) {
			c.mu.Lock()
			if s := c.streams[se.StreamID]; s != nil {
				c.resetLocked(s, se.Code, &ResetError{Code: se.Code})
			} else if !c.closing {
				c.writeRSTLocked(se.StreamID, se.Code)
			}
			c.mu.Unlock()
			continue
		}
		var ce http2.ConnectionError
		if errors.As(err, &ce) {
			detail := c.rfr.ErrorDetail()
			c.cfg.log.Debug("hbone: HTTP/2 protocol error", zap.Stringer("peer", c.nc.RemoteAddr()),
				zap.Stringer("code", http2.ErrCode(ce)), zap.NamedError("detail", detail))
			c.shutdown(fmt.Errorf("%w: protocol error %v (%v)", errConnClosed, http2.ErrCode(ce), detail), http2.ErrCode(ce), true)
			return
		}
		c.shutdown(fmt.Errorf("%w: %w", errConnClosed, err), 0, false)
		return
	}
}

func connErr(code http2.ErrCode) error { return http2.ConnectionError(code) }

func (c *conn) handle(f http2.Frame) error {
	if !c.sawSettings {
		if sf, ok := f.(*http2.SettingsFrame); !ok || sf.IsAck() {
			return connErr(http2.ErrCodeProtocol)
		}
	}
	switch f := f.(type) {
	case *http2.DataFrame:
		return c.onData(f)
	case *http2.MetaHeadersFrame:
		if c.cfg.client {
			return c.onResponse(f)
		}
		return c.onRequest(f)
	case *http2.SettingsFrame:
		return c.onSettings(f)
	case *http2.PingFrame:
		c.mu.Lock()
		defer c.mu.Unlock()
		if f.IsAck() {
			if f.Data == c.pingData {
				c.pingOut = false
			}
			return nil
		}
		_ = c.wfr.WritePing(true, f.Data)
		c.signalLocked()
		return c.checkCtrlLocked()
	case *http2.WindowUpdateFrame:
		return c.onWindowUpdate(f)
	case *http2.RSTStreamFrame:
		c.mu.Lock()
		defer c.mu.Unlock()
		s := c.streams[f.StreamID]
		if s == nil {
			return nil
		}
		if f.ErrCode == http2.ErrCodeRefusedStream && c.cfg.client {
			s.failLocked(errRefused)
		} else {
			s.failLocked(&ResetError{Code: f.ErrCode, Remote: true})
		}
	case *http2.GoAwayFrame:
		c.mu.Lock()
		defer c.mu.Unlock()
		c.goAwayRecv = true
		if f.ErrCode != http2.ErrCodeNo {
			c.cfg.log.Debug("hbone: GOAWAY from peer", zap.Stringer("peer", c.nc.RemoteAddr()),
				zap.Stringer("code", f.ErrCode), zap.ByteString("debug", f.DebugData()))
		}
		if c.cfg.client {
			for id, s := range c.streams {
				if id > f.LastStreamID {
					s.failLocked(errRefused)
				}
			}
		}
		if len(c.streams) == 0 {
			c.shutdownLocked(errConnClosed, http2.ErrCodeNo, false)
		}
	case *http2.PushPromiseFrame:
		return connErr(http2.ErrCodeProtocol)
	}
	return nil // PRIORITY, unknown frames: ignored
}

func (c *conn) onData(f *http2.DataFrame) error {
	n := int64(f.Header().Length)
	c.mu.Lock()
	defer c.mu.Unlock()
	if n > c.recvWindow {
		return connErr(http2.ErrCodeFlowControl)
	}
	c.recvWindow -= n
	s := c.streams[f.StreamID]
	if s == nil {
		if c.isIdleStreamLocked(f.StreamID) {
			return connErr(http2.ErrCodeProtocol)
		}
		c.consumedLocked(nil, int(n)) // a stream already closed: drop
		return nil
	}
	if s.recvEnd {
		c.consumedLocked(nil, int(n))
		c.resetLocked(s, http2.ErrCodeStreamClosed, &ResetError{Code: http2.ErrCodeStreamClosed})
		return nil
	}
	if n > s.recvWindow {
		c.consumedLocked(nil, int(n))
		c.resetLocked(s, http2.ErrCodeFlowControl, &ResetError{Code: http2.ErrCodeFlowControl})
		return nil
	}
	s.recvWindow -= n
	data := f.Data()
	if pad := int(n) - len(data); pad > 0 {
		c.consumedLocked(s, pad)
	}
	if c.cfg.client && s.status == 0 {
		c.consumedLocked(nil, len(data))
		c.resetLocked(s, http2.ErrCodeProtocol, &ResetError{Code: http2.ErrCodeProtocol})
		return nil
	}
	if s.closed {
		c.consumedLocked(s, len(data))
	} else if len(data) > 0 {
		data = c.sinkLocked(s, data)
		if len(data) > 0 {
			s.rbuf.write(data)
			s.rcond.Broadcast()
		}
	}
	if f.StreamEnded() {
		s.recvEnd = true
		s.rcond.Broadcast()
		s.maybeFinishLocked()
	}
	return nil
}

// sinkLocked writes data to the TCP socket that s's WriteTo is waiting to
// write to, if it waits with nothing buffered, and returns what is left to
// buffer. The write does not block: a full socket takes what it can and
// WriteTo gets the rest, so a slow application never stalls the read loop.
// c.mu is released during the write; only the read loop adds data to a
// stream, so no data can overtake it meanwhile.
func (c *conn) sinkLocked(s *Stream, data []byte) []byte {
	k := s.sink
	if k == nil || !s.sinkParked || s.sinkBusy || s.rbuf.n > 0 {
		return data
	}
	s.sinkBusy = true
	c.mu.Unlock()
	n, err := k.write(data)
	c.mu.Lock()
	s.sinkBusy = false
	if s.sinkWaiter {
		s.sinkWaiter = false
		s.rcond.Broadcast()
	}
	s.sinkN += int64(n)
	c.consumedLocked(s, n)
	data = data[n:]
	if err != nil || s.closed {
		if err != nil && s.sinkErr == nil {
			s.sinkErr = err
			s.rcond.Broadcast()
		}
		c.consumedLocked(s, len(data))
		return nil
	}
	if len(data) > 0 {
		s.sinkParked = false // WriteTo takes over until its buffer is empty
	}
	return data
}

// isIdleStreamLocked reports whether id names a stream that was never opened.
func (c *conn) isIdleStreamLocked(id uint32) bool {
	if c.cfg.client {
		return id%2 == 1 && id >= c.nextID
	}
	return id%2 == 1 && id > c.maxPeerID
}

func (c *conn) onWindowUpdate(f *http2.WindowUpdateFrame) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	incr := int64(f.Increment)
	if f.StreamID == 0 {
		if c.sendWindow+incr > maxWindow {
			return connErr(http2.ErrCodeFlowControl)
		}
		c.sendWindow += incr
		c.signalLocked()
		return nil
	}
	s := c.streams[f.StreamID]
	if s == nil {
		return nil
	}
	if s.sendWindow+incr > maxWindow {
		c.resetLocked(s, http2.ErrCodeFlowControl, &ResetError{Code: http2.ErrCodeFlowControl})
		return nil
	}
	s.sendWindow += incr
	c.enqueueLocked(s)
	return nil
}

func (c *conn) onSettings(f *http2.SettingsFrame) error {
	if f.IsAck() {
		return nil
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	c.sawSettings = true
	err := f.ForeachSetting(func(st http2.Setting) error {
		if err := st.Valid(); err != nil {
			return err
		}
		switch st.ID {
		case http2.SettingInitialWindowSize:
			delta := int64(st.Val) - c.peerInitWindow
			c.peerInitWindow = int64(st.Val)
			for _, s := range c.streams {
				if s.sendWindow+delta > maxWindow {
					return connErr(http2.ErrCodeFlowControl)
				}
				s.sendWindow += delta
				c.enqueueLocked(s)
			}
		case http2.SettingMaxConcurrentStreams:
			c.peerMaxStreams = st.Val
		case http2.SettingMaxHeaderListSize:
			c.peerMaxHeader = st.Val
		case http2.SettingHeaderTableSize:
			c.henc.SetMaxDynamicTableSize(min(st.Val, 4096))
		}
		return nil
	})
	if err != nil {
		return err
	}
	_ = c.wfr.WriteSettingsAck()
	c.signalLocked()
	return c.checkCtrlLocked()
}

// onRequest handles a server's incoming HEADERS.
func (c *conn) onRequest(f *http2.MetaHeadersFrame) error {
	id := f.StreamID
	c.mu.Lock()
	if c.closing {
		c.mu.Unlock()
		return nil
	}
	if s := c.streams[id]; s != nil {
		// Trailers or a second header block: a connected CONNECT stream
		// carries only DATA (RFC 9113 §8.5).
		c.resetLocked(s, http2.ErrCodeProtocol, &ResetError{Code: http2.ErrCodeProtocol})
		c.mu.Unlock()
		return nil
	}
	if id%2 == 0 || id <= c.maxPeerID {
		c.mu.Unlock()
		return connErr(http2.ErrCodeProtocol)
	}
	c.maxPeerID = id
	if c.expiredLocked() {
		// A certificate of this connection expired: refuse new streams and
		// let the client reconnect with fresh ones.
		c.writeRSTLocked(id, http2.ErrCodeRefusedStream)
		if !c.goAwaySent {
			c.goAwaySent = true
			c.goAwaySentLast = id - 2
			_ = c.wfr.WriteGoAway(id-2, http2.ErrCodeNo, nil)
		}
		if len(c.streams) == 0 {
			c.shutdownLocked(errConnClosed, http2.ErrCodeNo, false)
		}
		c.mu.Unlock()
		return nil
	}
	// Handlers of reset streams may still run: bound them too, so that a
	// client opening and resetting streams at once (CVE-2023-44487) cannot
	// pile up goroutines.
	if (c.goAwaySent && id > c.goAwaySentLast) || uint32(len(c.streams)) >= c.cfg.maxStreams || uint32(c.handlers) >= c.cfg.maxStreams {
		c.writeRSTLocked(id, http2.ErrCodeRefusedStream)
		c.mu.Unlock()
		return nil
	}
	s := c.newStreamLocked(id)
	if f.StreamEnded() {
		s.recvEnd = true
	}
	c.handlers++
	c.mu.Unlock()
	req := &request{
		truncated: f.Truncated,
		method:    f.PseudoValue("method"),
		authority: f.PseudoValue("authority"),
		scheme:    f.PseudoValue("scheme"),
		path:      f.PseudoValue("path"),
		protocol:  f.PseudoValue("protocol"),
		header:    make(http.Header),
	}
	for _, hf := range f.RegularFields() {
		req.header.Add(hf.Name, hf.Value)
	}
	c.cfg.onStream(s, req)
	return nil
}

// onResponse handles a client's incoming HEADERS.
func (c *conn) onResponse(f *http2.MetaHeadersFrame) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	s := c.streams[f.StreamID]
	if s == nil {
		if c.isIdleStreamLocked(f.StreamID) || f.StreamID%2 == 0 {
			return connErr(http2.ErrCodeProtocol)
		}
		return nil
	}
	code, err := strconv.Atoi(f.PseudoValue("status"))
	if s.status != 0 || err != nil || f.Truncated || code < 100 || code > 999 || code == http.StatusSwitchingProtocols {
		c.resetLocked(s, http2.ErrCodeProtocol, &ResetError{Code: http2.ErrCodeProtocol})
		return nil
	}
	if code < 200 {
		return nil // informational
	}
	s.status = code
	if f.StreamEnded() {
		s.recvEnd = true
		s.maybeFinishLocked()
	}
	s.rcond.Broadcast()
	return nil
}

// reserve takes a stream slot on a usable client connection.
func (c *conn) reserve(limit int) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.usableLocked() {
		return false
	}
	if len(c.streams)+c.reserved >= min(limit, int(min(c.peerMaxStreams, math.MaxInt32))) {
		return false
	}
	c.reserved++
	if c.idleTimer != nil {
		c.idleTimer.Stop()
	}
	return true
}

// usableLocked reports whether a client connection may take new streams. A
// connection whose own or peer certificate has expired takes none: TLS
// checked them only at the handshake.
func (c *conn) usableLocked() bool {
	return !c.closing && !c.goAwayRecv && !c.goAwaySent && c.nextID < maxWindow-2 && !c.expiredLocked()
}

func (c *conn) expiredLocked() bool {
	return !c.expiry.IsZero() && !time.Now().Before(c.expiry)
}

// certExpiry returns the NotAfter of the peer's leaf.
func certExpiry(cs tls.ConnectionState) time.Time {
	var t time.Time
	if len(cs.PeerCertificates) > 0 {
		t = cs.PeerCertificates[0].NotAfter
	}
	return t
}

func (c *conn) usable() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.usableLocked()
}

// openStream turns a reservation into a CONNECT stream and waits for the
// answer.
func (c *conn) openStream(ctx context.Context, authority string, header http.Header) (*Stream, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.reserved--
	if !c.usableLocked() {
		c.armIdleLocked()
		return nil, errRefused
	}
	fields := []hpack.HeaderField{{Name: ":method", Value: http.MethodConnect}, {Name: ":authority", Value: authority}}
	for k, vs := range header {
		name := lowerHeader(k)
		if !validRequestHeader(name) {
			continue
		}
		for _, v := range vs {
			fields = append(fields, hpack.HeaderField{Name: name, Value: v})
		}
	}
	var size uint32
	for _, f := range fields {
		size += f.Size()
	}
	if c.peerMaxHeader > 0 && size > c.peerMaxHeader {
		c.armIdleLocked()
		return nil, fmt.Errorf("hbone: request headers of %d bytes exceed the server's limit of %d", size, c.peerMaxHeader)
	}
	s := c.newStreamLocked(c.nextID)
	c.nextID += 2
	c.writeHeadersLocked(s.id, fields, false)
	c.flushCtrlLocked()

	stop := context.AfterFunc(ctx, func() {
		c.mu.Lock()
		s.dialCanceled = true
		s.rcond.Broadcast()
		c.mu.Unlock()
	})
	defer stop()
	for s.status == 0 && s.err == nil && !s.dialCanceled {
		s.rcond.Wait()
	}
	switch {
	case s.status == http.StatusOK:
		return s, nil
	case s.status != 0:
		code := s.status
		s.closeLocked()
		return nil, &StatusError{Code: code}
	case s.err != nil:
		return nil, s.err
	default:
		c.resetLocked(s, http2.ErrCodeCancel, net.ErrClosed)
		return nil, ctx.Err()
	}
}
