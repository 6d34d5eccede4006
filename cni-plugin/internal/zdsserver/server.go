// Package zdsserver is the node agent's side of ZDS (api/zds): it accepts
// ztunnel's connection, sends it a snapshot of the node's enrolled pods
// (each with its network-namespace descriptor) followed by snapshot_sent,
// and then one add or delete per change, waiting for ztunnel's ack of each.
//
// Several ztunnels may be connected at once: while one replaces another
// (a DaemonSet rolling update surges a new ztunnel pod before the old one
// stops, and a deleted ztunnel pod is replaced while it drains), both
// serve the node's pods, listening side by side (SO_REUSEPORT) in each
// pod's netns. Every connection gets its own snapshot, and every later add
// and delete goes to every connected ztunnel, so that whichever of them
// stays has the whole picture and the one leaving keeps its pods (and
// their live connections) until it disconnects. The newest connected
// ztunnel's answer decides the outcome of an add or delete. Exchanges are
// strictly sequential per connection (one message, one ack) and each is
// bounded by AckTimeout; a ztunnel that does not answer in time is
// disconnected, and gets a new snapshot when it reconnects.
package zdsserver

import (
	"context"
	"errors"
	"fmt"
	"os"
	"slices"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"

	"github.com/amesh-dev/amesh/api/zds"
	zdsv1 "github.com/amesh-dev/amesh/api/zds/v1"
)

// Workload is one enrolled pod as ztunnel gets it.
type Workload struct {
	UID  string
	Info *zdsv1.WorkloadInfo
	// Netns is the pod's network namespace. During a snapshot a nil Netns
	// sends keep instead of add (ztunnel keeps what it has).
	Netns *os.File
}

// Config configures a Server.
type Config struct {
	// Socket is the unix socket path (zds.DefaultSocket).
	Socket string
	// AckTimeout bounds one exchange (send + ack); default 5s.
	AckTimeout time.Duration
	// HelloTimeout bounds the wait for ztunnel's hello; default 5s.
	HelloTimeout time.Duration
	// LivenessInterval is how often an idle connection is checked for a
	// hang-up (so Connected and the metrics notice a ztunnel that went
	// away between changes); default 2s.
	LivenessInterval time.Duration
	// Snapshot returns the pods to send on every (re)connection.
	Snapshot func() []Workload
	// SnapshotResult, when set, hears ztunnel's answer to each pod of a
	// snapshot: nil when it acknowledged the pod, an ErrRejected error
	// when it refused it (it then does not serve the pod; the caller
	// retries). It is not called when the connection fails mid-snapshot
	// (the next connection gets a new snapshot).
	SnapshotResult func(w Workload, err error)
	Logger         *zap.Logger
	// Ready, when set, holds back every connection's snapshot until it is
	// closed (the agent has reconciled its pods after a restart).
	Ready <-chan struct{}
	// Registerer receives the server's metrics (optional).
	Registerer prometheus.Registerer
}

// Errors.
var (
	// ErrNoZtunnel: no ztunnel is connected (or it went away mid-exchange).
	ErrNoZtunnel = errors.New("ztunnel not connected")
	// ErrRejected: ztunnel answered with an error (wrapped with its text).
	ErrRejected = errors.New("ztunnel rejected the request")
)

// Server serves ZDS.
type Server struct {
	cfg     Config
	log     *zap.Logger
	metrics *metrics

	mu       sync.Mutex
	sessions []*session // connected ztunnels, oldest first
}

type session struct {
	conn *zds.Conn
	id   uint64
	mu   sync.Mutex    // held for each exchange and for the whole snapshot
	dead bool          // guarded by mu
	done chan struct{} // closed (once) when the session ends
	once sync.Once
}

// end closes the connection and releases the session's serve goroutine.
func (ss *session) end() {
	ss.conn.Close()
	ss.once.Do(func() { close(ss.done) })
}

type metrics struct {
	connected prometheus.Gauge
	messages  *prometheus.CounterVec
	snapshots prometheus.Counter
	ackTime   prometheus.Histogram
}

func newMetrics(r prometheus.Registerer) *metrics {
	m := &metrics{
		connected: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "amesh_cni_zds_connected",
			Help: "ztunnels connected to the node agent: 1 normally, 2 while one replaces another.",
		}),
		messages: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "amesh_cni_zds_messages_total", Help: "ZDS messages sent to ztunnel, by type and result.",
		}, []string{"type", "result"}),
		snapshots: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "amesh_cni_zds_snapshots_total", Help: "Snapshots sent to ztunnel (one per connection).",
		}),
		ackTime: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "amesh_cni_zds_ack_seconds", Help: "Time from sending a ZDS message to ztunnel's ack.",
			Buckets: prometheus.ExponentialBuckets(0.0005, 4, 8),
		}),
	}
	if r != nil {
		r.MustRegister(m.connected, m.messages, m.snapshots, m.ackTime)
	}
	return m
}

// New allocates a Server; Run serves it.
func New(cfg Config) *Server {
	if cfg.Socket == "" {
		cfg.Socket = zds.DefaultSocket
	}
	if cfg.AckTimeout <= 0 {
		cfg.AckTimeout = 5 * time.Second
	}
	if cfg.HelloTimeout <= 0 {
		cfg.HelloTimeout = 5 * time.Second
	}
	if cfg.LivenessInterval <= 0 {
		cfg.LivenessInterval = 2 * time.Second
	}
	if cfg.Snapshot == nil {
		cfg.Snapshot = func() []Workload { return nil }
	}
	if cfg.Logger == nil {
		cfg.Logger = zap.NewNop()
	}
	return &Server{cfg: cfg, log: cfg.Logger, metrics: newMetrics(cfg.Registerer)}
}

// Run listens on the socket and serves ztunnel connections until ctx is
// done. It returns after every goroutine it started has exited.
func (s *Server) Run(ctx context.Context) error {
	ln, err := zds.Listen(s.cfg.Socket)
	if err != nil {
		return err
	}
	var wg sync.WaitGroup
	stop := context.AfterFunc(ctx, func() { ln.Close() })
	defer stop()
	var id uint64
	for {
		conn, err := ln.Accept()
		if err != nil {
			break
		}
		id++
		wg.Add(1)
		go func(id uint64) {
			defer wg.Done()
			s.serve(ctx, conn, id)
		}(id)
	}
	ln.Close()
	s.mu.Lock()
	for _, sess := range s.sessions {
		sess.conn.Close()
	}
	s.mu.Unlock()
	wg.Wait()
	os.Remove(s.cfg.Socket)
	if ctx.Err() != nil {
		return nil
	}
	return fmt.Errorf("zdsserver: accept stopped unexpectedly")
}

// serve runs the handshake and snapshot of one connection and adds it to
// the connected sessions; it returns when the session ends.
func (s *Server) serve(ctx context.Context, conn *zds.Conn, id uint64) {
	log := s.log.With(zap.Uint64("conn", id))
	if err := s.hello(conn); err != nil {
		log.Warn("ztunnel handshake failed", zap.Error(err))
		conn.Close()
		return
	}
	if s.cfg.Ready != nil {
		select {
		case <-s.cfg.Ready:
		case <-ctx.Done():
			conn.Close()
			return
		}
	}
	sess := &session{conn: conn, id: id, done: make(chan struct{})}
	// Changes wait for the snapshot: nobody exchanges on the session
	// before it is sent.
	sess.mu.Lock()
	s.mu.Lock()
	others := len(s.sessions)
	s.sessions = append(s.sessions, sess)
	s.metrics.connected.Set(float64(len(s.sessions)))
	s.mu.Unlock()
	if others > 0 {
		// A new ztunnel is taking over (or the same one reconnected
		// before its old connection was noticed gone): both get every
		// change until the older one disconnects.
		log.Info("another ztunnel connected; serving both until the older one leaves", zap.Int("connected", others+1))
	}
	err := s.snapshot(sess)
	sess.mu.Unlock()
	if err != nil {
		log.Warn("snapshot failed; disconnecting ztunnel", zap.Error(err))
		s.drop(sess)
		return
	}
	log.Info("ztunnel connected and synced")
	tick := time.NewTicker(s.cfg.LivenessInterval)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-sess.done:
			return
		case <-tick.C:
			s.probe(sess)
		}
	}
}

// probe checks an idle session for a hang-up: ztunnel never sends
// unsolicited messages, so a short read either times out (alive), sees
// the end of the connection, or finds a protocol violation.
func (s *Server) probe(sess *session) {
	if !sess.mu.TryLock() {
		return // an exchange is in flight: it will notice by itself
	}
	defer sess.mu.Unlock()
	if sess.dead {
		return
	}
	if err := sess.conn.SetReadDeadline(time.Now().Add(time.Millisecond)); err != nil {
		_ = s.kill(sess, err)
		return
	}
	m, err := sess.conn.RecvZtunnel()
	switch {
	case errors.Is(err, os.ErrDeadlineExceeded):
		_ = sess.conn.SetReadDeadline(time.Time{})
	case err != nil:
		_ = s.kill(sess, err)
	default:
		_ = s.kill(sess, fmt.Errorf("unsolicited message %T", m.GetPayload()))
	}
}

func (s *Server) hello(conn *zds.Conn) error {
	if err := conn.SetReadDeadline(time.Now().Add(s.cfg.HelloTimeout)); err != nil {
		return err
	}
	m, err := conn.RecvZtunnel()
	if err != nil {
		return err
	}
	h := m.GetHello()
	if h == nil {
		return fmt.Errorf("expected hello, got %T", m.GetPayload())
	}
	if h.GetVersion() != zdsv1.Version_VERSION_V1 {
		return fmt.Errorf("unsupported ZDS version %v", h.GetVersion())
	}
	return conn.SetReadDeadline(time.Time{})
}

// snapshot sends every known workload then snapshot_sent; sess.mu is held.
func (s *Server) snapshot(sess *session) error {
	s.metrics.snapshots.Inc()
	for _, w := range s.cfg.Snapshot() {
		var m *zdsv1.AgentMessage
		var fd *os.File
		if w.Netns != nil {
			m = &zdsv1.AgentMessage{Payload: &zdsv1.AgentMessage_Add{Add: &zdsv1.AddWorkload{Uid: w.UID, Info: w.Info}}}
			fd = w.Netns
		} else {
			m = &zdsv1.AgentMessage{Payload: &zdsv1.AgentMessage_Keep{Keep: &zdsv1.KeepWorkload{Uid: w.UID}}}
		}
		err := s.exchange(sess, m, fd, time.Now().Add(s.cfg.AckTimeout))
		if err != nil && !errors.Is(err, ErrRejected) {
			return err
		}
		if err != nil {
			// ztunnel refused one pod: it will not serve it, but the
			// others still go through. SnapshotResult tells the agent,
			// which retries the pod with backoff.
			s.log.Warn("ztunnel rejected a pod in the snapshot", zap.String("uid", w.UID), zap.Error(err))
		}
		if s.cfg.SnapshotResult != nil {
			s.cfg.SnapshotResult(w, err)
		}
	}
	return s.exchange(sess, &zdsv1.AgentMessage{Payload: &zdsv1.AgentMessage_SnapshotSent{SnapshotSent: &zdsv1.SnapshotSent{}}}, nil,
		time.Now().Add(s.cfg.AckTimeout))
}

func msgType(m *zdsv1.AgentMessage) string {
	switch m.GetPayload().(type) {
	case *zdsv1.AgentMessage_Add:
		return "add"
	case *zdsv1.AgentMessage_Keep:
		return "keep"
	case *zdsv1.AgentMessage_Delete:
		return "delete"
	case *zdsv1.AgentMessage_SnapshotSent:
		return "snapshot_sent"
	}
	return "unknown"
}

// exchange sends m and waits for its ack; sess.mu is held. A transport
// failure or a timeout kills the session.
func (s *Server) exchange(sess *session, m *zdsv1.AgentMessage, fd *os.File, deadline time.Time) (err error) {
	typ := msgType(m)
	defer func() {
		result := "ok"
		switch {
		case errors.Is(err, ErrRejected):
			result = "rejected"
		case err != nil:
			result = "error"
		}
		s.metrics.messages.WithLabelValues(typ, result).Inc()
	}()
	if sess.dead {
		return ErrNoZtunnel
	}
	start := time.Now()
	if err := sess.conn.SetDeadline(deadline); err != nil {
		return s.kill(sess, err)
	}
	if err := sess.conn.SendAgent(m, fd); err != nil {
		return s.kill(sess, err)
	}
	reply, err := sess.conn.RecvZtunnel()
	if err != nil {
		return s.kill(sess, err)
	}
	ack := reply.GetAck()
	if ack == nil {
		return s.kill(sess, fmt.Errorf("expected ack, got %T", reply.GetPayload()))
	}
	s.metrics.ackTime.Observe(time.Since(start).Seconds())
	if ack.GetError() != "" {
		return fmt.Errorf("%w: %s: %s", ErrRejected, typ, ack.GetError())
	}
	return nil
}

// kill marks the session dead (sess.mu held), closes it and removes it
// from the connected sessions.
func (s *Server) kill(sess *session, cause error) error {
	sess.dead = true
	sess.end()
	s.mu.Lock()
	if i := slices.Index(s.sessions, sess); i >= 0 {
		s.sessions = slices.Delete(s.sessions, i, i+1)
	}
	s.metrics.connected.Set(float64(len(s.sessions)))
	s.mu.Unlock()
	s.log.Warn("ztunnel connection lost", zap.Uint64("conn", sess.id), zap.Error(cause))
	return fmt.Errorf("%w: %w", ErrNoZtunnel, cause)
}

func (s *Server) drop(sess *session) {
	sess.mu.Lock()
	defer sess.mu.Unlock()
	if !sess.dead {
		_ = s.kill(sess, errors.New("dropped"))
	}
}

func (s *Server) connected() []*session {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.sessions)
}

// Connected reports whether a ztunnel is connected.
func (s *Server) Connected() bool { return len(s.connected()) > 0 }

// send makes one exchange with every connected ztunnel, concurrently, and
// returns the answer of the newest one still connected afterwards: it is
// the one that stays when one ztunnel replaces another. (A session that
// died meanwhile gets a fresh snapshot if its ztunnel reconnects.)
func (s *Server) send(ctx context.Context, m *zdsv1.AgentMessage, fd *os.File) error {
	sessions := s.connected()
	if len(sessions) == 0 {
		return ErrNoZtunnel
	}
	deadline := time.Now().Add(s.cfg.AckTimeout)
	if d, ok := ctx.Deadline(); ok && d.Before(deadline) {
		deadline = d
	}
	errs := make([]error, len(sessions))
	alive := make([]bool, len(sessions))
	var wg sync.WaitGroup
	for i, sess := range sessions {
		wg.Go(func() {
			sess.mu.Lock()
			defer sess.mu.Unlock()
			if err := ctx.Err(); err != nil {
				errs[i], alive[i] = err, !sess.dead
				return
			}
			errs[i] = s.exchange(sess, m, fd, deadline)
			alive[i] = !sess.dead
		})
	}
	wg.Wait()
	for i := len(sessions) - 1; i >= 0; i-- {
		if alive[i] {
			if errs[i] == nil && i < len(sessions)-1 {
				s.log.Info("the newest ztunnel went away during a change; an older one acknowledged it", zap.String("type", msgType(m)))
			}
			return errs[i]
		}
	}
	return errs[len(sessions)-1]
}

// Add hands a pod to ztunnel and returns once ztunnel acknowledged it.
func (s *Server) Add(ctx context.Context, w Workload) error {
	if w.Netns == nil {
		return errors.New("zdsserver: add without a network namespace")
	}
	return s.send(ctx, &zdsv1.AgentMessage{Payload: &zdsv1.AgentMessage_Add{Add: &zdsv1.AddWorkload{Uid: w.UID, Info: w.Info}}}, w.Netns)
}

// Delete tells ztunnel to drop a pod and returns once it acknowledged.
func (s *Server) Delete(ctx context.Context, uid string) error {
	return s.send(ctx, &zdsv1.AgentMessage{Payload: &zdsv1.AgentMessage_Delete{Delete: &zdsv1.DeleteWorkload{Uid: uid}}}, nil)
}
