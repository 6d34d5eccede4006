package proxy

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"go.uber.org/zap"

	"github.com/amesh-dev/amesh/ztunnel/internal/agent"
	"github.com/amesh-dev/amesh/ztunnel/internal/authz"
	"github.com/amesh-dev/amesh/ztunnel/internal/netns"
)

// pod is one served pod: its namespace, listeners and live connections.
type pod struct {
	p    *Proxy
	uid  string
	info agent.PodInfo
	ns   *netns.Namespace
	id   spiffeid.ID

	ctx    context.Context // cancelled when the pod is force-closed
	cancel context.CancelFunc
	wg     sync.WaitGroup // accept loops and connection handlers

	mu    sync.Mutex
	lns   []podListener
	conns map[*tracked]struct{}

	tunnel *tunnel // HBONE client and server of the pod

	// The certificate prefetch started by AddPod (both nil without one):
	// prefetchCancel stops it, prefetched is closed when it has ended.
	prefetchCancel context.CancelFunc
	prefetched     chan struct{}
}

type podListener struct {
	ln   net.Listener
	kind int // OutboundPort, PlaintextPort or HBONEPort
}

// tracked is one live connection of a pod.
type tracked struct {
	mu     sync.Mutex
	closed bool
	conns  []net.Conn

	// Inbound connections are re-authorized on policy changes.
	inbound   bool
	attrs     authz.Conn
	peer      spiffeid.ID
	plaintext bool
}

// add registers a connection to close on revoke; it closes c at once if
// the connection was already revoked.
func (t *tracked) add(c net.Conn) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed {
		c.Close()
		return
	}
	t.conns = append(t.conns, c)
}

// revoke closes every connection of the tracked flow.
func (t *tracked) revoke() {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.closed = true
	for _, c := range t.conns {
		c.Close()
	}
}

func (t *tracked) revoked() bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.closed
}

func newPod(p *Proxy, uid string, info agent.PodInfo, ns *netns.Namespace, id spiffeid.ID) *pod {
	ctx, cancel := context.WithCancel(context.Background())
	pd := &pod{p: p, uid: uid, info: info, ns: ns, id: id, ctx: ctx, cancel: cancel, conns: map[*tracked]struct{}{}}
	pd.tunnel = newTunnel(pd)
	return pd
}

func (pd *pod) name() string { return pd.info.Namespace + "/" + pd.info.Name }

// listen opens the pod's listeners inside its namespace. The outbound
// listener is bound to loopback: the capture rules redirect to 127.0.0.1
// (and ::1), and nothing else should reach it.
func (pd *pod) listen() error {
	cfg := &pd.p.cfg
	opts := netns.SockOpts{Mark: cfg.Mark, ReusePort: true}
	type spec struct {
		network, addr string
		kind          int
		optional      bool
	}
	specs := []spec{
		{"tcp4", net.JoinHostPort("127.0.0.1", strconv.Itoa(int(cfg.OutboundPort))), OutboundPort, false},
		{"tcp6", net.JoinHostPort("::1", strconv.Itoa(int(cfg.OutboundPort))), OutboundPort, true},
		{"tcp", ":" + strconv.Itoa(int(cfg.PlaintextPort)), PlaintextPort, false},
		{"tcp", ":" + strconv.Itoa(int(cfg.HBONEPort)), HBONEPort, false},
	}
	var lns []podListener
	for _, s := range specs {
		ln, err := pd.ns.Listen(context.Background(), s.network, s.addr, opts)
		if err != nil {
			if s.optional && (errors.Is(err, syscall.EADDRNOTAVAIL) || errors.Is(err, syscall.EAFNOSUPPORT)) {
				continue
			}
			for _, l := range lns {
				l.ln.Close()
			}
			return fmt.Errorf("pod %s: %w", pd.uid, err)
		}
		lns = append(lns, podListener{ln: ln, kind: s.kind})
	}
	pd.mu.Lock()
	pd.lns = lns
	pd.mu.Unlock()
	return nil
}

// serve starts the accept loops.
func (pd *pod) serve() {
	pd.mu.Lock()
	defer pd.mu.Unlock()
	for _, l := range pd.lns {
		pd.wg.Add(1)
		go pd.accept(l)
	}
}

func (pd *pod) accept(l podListener) {
	defer pd.wg.Done()
	if l.kind == HBONEPort {
		pd.tunnel.serve(l.ln)
		return
	}
	for {
		c, err := l.ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			pd.p.log.Warn("accept", zap.String("pod", pd.name()), zap.Error(err))
			select {
			case <-pd.ctx.Done():
				return
			case <-time.After(5 * time.Millisecond):
			}
			continue
		}
		tc, ok := c.(*net.TCPConn)
		if !ok {
			c.Close()
			continue
		}
		pd.wg.Add(1)
		go func() {
			defer pd.wg.Done()
			switch l.kind {
			case OutboundPort:
				pd.p.outbound(pd, tc)
			case PlaintextPort:
				pd.p.plaintext(pd, tc)
			}
		}()
	}
}

// track registers a live connection; it returns false when the pod is
// being force-closed (the caller must give up).
func (pd *pod) track(t *tracked) bool {
	pd.mu.Lock()
	defer pd.mu.Unlock()
	if pd.ctx.Err() != nil {
		return false
	}
	pd.conns[t] = struct{}{}
	return true
}

func (pd *pod) untrack(t *tracked) {
	pd.mu.Lock()
	defer pd.mu.Unlock()
	delete(pd.conns, t)
}

func (pd *pod) connCount() int {
	pd.mu.Lock()
	defer pd.mu.Unlock()
	return len(pd.conns)
}

func (pd *pod) inboundConns() []*tracked {
	pd.mu.Lock()
	defer pd.mu.Unlock()
	var out []*tracked
	for t := range pd.conns {
		if t.inbound {
			out = append(out, t)
		}
	}
	return out
}

// stopPrefetch stops the pod's certificate prefetch and waits for it to
// end.
func (pd *pod) stopPrefetch() {
	if pd.prefetchCancel != nil {
		pd.prefetchCancel()
		<-pd.prefetched
	}
}

// stopAccepting closes the listeners and stops the certificate prefetch;
// live connections go on.
func (pd *pod) stopAccepting() {
	if pd.prefetchCancel != nil {
		pd.prefetchCancel()
	}
	pd.tunnel.stopAccepting()
	pd.mu.Lock()
	lns := pd.lns
	pd.lns = nil
	pd.mu.Unlock()
	for _, l := range lns {
		l.ln.Close()
	}
}

// drain waits up to timeout for live connections to end, then closes
// the rest, waits for every goroutine and releases the namespace.
func (pd *pod) drain(timeout time.Duration) {
	done := make(chan struct{})
	go func() {
		pd.wg.Wait()
		close(done)
	}()
	t := time.NewTimer(timeout)
	defer t.Stop()
	select {
	case <-done:
	case <-t.C:
		pd.mu.Lock()
		pd.cancel()
		n := len(pd.conns)
		for tc := range pd.conns {
			tc.revoke()
		}
		pd.mu.Unlock()
		pd.p.log.Info("drain deadline reached; closing connections", zap.String("pod", pd.name()), zap.Int("connections", n))
		pd.tunnel.close()
		<-done
	}
	pd.cancel()
	pd.tunnel.close()
	pd.closeNS()
}

func (pd *pod) closeNS() {
	if err := pd.ns.Close(); err != nil && !errors.Is(err, net.ErrClosed) {
		pd.p.log.Debug("closing netns", zap.Error(err))
	}
}
