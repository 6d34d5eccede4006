// Package agent is ztunnel's client of the node agent's ZDS socket: it
// connects, says hello, receives the pods to serve (with their network
// namespaces), applies the snapshot protocol and acknowledges every
// message in order. It reconnects with backoff when the agent goes away;
// the pods it holds keep being served meanwhile.
package agent

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/amesh-dev/amesh/api/zds"
	zdsv1 "github.com/amesh-dev/amesh/api/zds/v1"
	"go.uber.org/zap"

	"github.com/amesh-dev/amesh/ztunnel/internal/netns"
)

// PodInfo is what the node agent tells about a pod.
type PodInfo struct {
	Name           string
	Namespace      string
	ServiceAccount string
	IPs            []netip.Addr
	Node           string
}

// Pods is the set of pods ztunnel serves.
type Pods interface {
	// AddPod starts serving a pod in namespace ns (ownership passes to
	// the callee, also on error). Adding a pod already held with the same
	// namespace is a no-op; with another namespace it replaces it.
	AddPod(uid string, info PodInfo, ns *netns.Namespace) error
	// HasPod reports whether a pod is held.
	HasPod(uid string) bool
	// RemovePod stops accepting for a pod and drains it in the
	// background.
	RemovePod(uid string)
	// PodUIDs lists the pods held.
	PodUIDs() []string
}

// ErrUnknownPod answers a keep for a pod ztunnel does not hold.
var ErrUnknownPod = errors.New("unknown pod")

// Client talks to the node agent.
type Client struct {
	path   string
	pods   Pods
	logger *zap.Logger

	synced    atomic.Bool // a session completed its snapshot
	connected atomic.Bool

	mu       sync.Mutex
	sessions int
}

// New returns a client for the ZDS socket at path.
func New(path string, pods Pods, logger *zap.Logger) *Client {
	return &Client{path: path, pods: pods, logger: logger}
}

// Ready reports whether ztunnel is connected to the agent and has applied
// its snapshot.
func (c *Client) Ready() error {
	if !c.connected.Load() {
		return errors.New("not connected to the node agent")
	}
	if !c.synced.Load() {
		return errors.New("node agent snapshot not received")
	}
	return nil
}

// Sessions counts the sessions opened so far.
func (c *Client) Sessions() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.sessions
}

// Run connects and serves sessions until ctx is done, reconnecting with
// jittered exponential backoff (100 ms to 5 s).
func (c *Client) Run(ctx context.Context) error {
	backoff := 100 * time.Millisecond
	for {
		start := time.Now()
		err := c.session(ctx)
		c.connected.Store(false)
		c.synced.Store(false)
		if ctx.Err() != nil {
			return nil
		}
		if time.Since(start) > 10*time.Second {
			backoff = 100 * time.Millisecond
		}
		c.logger.Warn("node agent session ended", zap.Error(err), zap.Duration("retry_in", backoff))
		t := time.NewTimer(backoff/2 + rand.N(backoff/2+1))
		select {
		case <-ctx.Done():
			t.Stop()
			return nil
		case <-t.C:
		}
		backoff = min(backoff*2, 5*time.Second)
	}
}

// refused reports whether err is a refused packet that leaves the
// connection usable.
func refused(err error) bool {
	for _, e := range []error{zds.ErrTooLarge, zds.ErrControlTruncated, zds.ErrUnexpectedFD,
		zds.ErrMissingFD, zds.ErrNotNetns, zds.ErrInvalidMessage} {
		if errors.Is(err, e) {
			return true
		}
	}
	return false
}

func (c *Client) session(ctx context.Context) error {
	conn, err := zds.Dial(ctx, c.path)
	if err != nil {
		return fmt.Errorf("dial %s: %w", c.path, err)
	}
	defer conn.Close()
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	defer stop()
	if err := conn.SendZtunnel(&zdsv1.ZtunnelMessage{Payload: &zdsv1.ZtunnelMessage_Hello{Hello: &zdsv1.Hello{Version: zdsv1.Version_VERSION_V1}}}); err != nil {
		return fmt.Errorf("hello: %w", err)
	}
	c.mu.Lock()
	c.sessions++
	c.mu.Unlock()
	c.connected.Store(true)
	c.logger.Info("connected to the node agent", zap.String("socket", c.path))

	snapshot := map[string]bool{} // nil once the snapshot is complete
	for {
		m, f, err := conn.RecvAgent()
		if err != nil {
			if !refused(err) {
				return fmt.Errorf("receive: %w", err)
			}
			c.logger.Warn("refused a node agent message", zap.Error(err))
			if err := ack(conn, err); err != nil {
				return err
			}
			continue
		}
		herr := c.handle(m, f, snapshot)
		if m.GetSnapshotSent() != nil {
			snapshot = nil
		}
		if herr != nil {
			c.logger.Warn("node agent message failed", zap.Stringer("message", m), zap.Error(herr))
		}
		if err := ack(conn, herr); err != nil {
			return err
		}
	}
}

func ack(conn *zds.Conn, herr error) error {
	a := &zdsv1.Ack{}
	if herr != nil {
		a.Error = herr.Error()
	}
	if err := conn.SendZtunnel(&zdsv1.ZtunnelMessage{Payload: &zdsv1.ZtunnelMessage_Ack{Ack: a}}); err != nil {
		return fmt.Errorf("ack: %w", err)
	}
	return nil
}

func (c *Client) handle(m *zdsv1.AgentMessage, f *os.File, snapshot map[string]bool) error {
	switch p := m.GetPayload().(type) {
	case *zdsv1.AgentMessage_Add:
		uid := p.Add.GetUid()
		if snapshot != nil {
			snapshot[uid] = true
		}
		info, err := podInfo(p.Add.GetInfo())
		if err != nil {
			f.Close()
			return err
		}
		ns, err := netns.FromFile(f)
		if err != nil {
			return err
		}
		return c.pods.AddPod(uid, info, ns)
	case *zdsv1.AgentMessage_Keep:
		uid := p.Keep.GetUid()
		if snapshot != nil {
			snapshot[uid] = true
		}
		if !c.pods.HasPod(uid) {
			return fmt.Errorf("keep %s: %w", uid, ErrUnknownPod)
		}
		return nil
	case *zdsv1.AgentMessage_Delete:
		c.pods.RemovePod(p.Delete.GetUid())
		return nil
	case *zdsv1.AgentMessage_SnapshotSent:
		if snapshot == nil {
			return errors.New("snapshot_sent outside of a snapshot")
		}
		for _, uid := range c.pods.PodUIDs() {
			if !snapshot[uid] {
				c.logger.Info("dropping pod missing from the node agent snapshot", zap.String("uid", uid))
				c.pods.RemovePod(uid)
			}
		}
		c.synced.Store(true)
		return nil
	default:
		if f != nil {
			f.Close()
		}
		return fmt.Errorf("unexpected message %T", p)
	}
}

func podInfo(in *zdsv1.WorkloadInfo) (PodInfo, error) {
	out := PodInfo{
		Name: in.GetName(), Namespace: in.GetNamespace(),
		ServiceAccount: in.GetServiceAccount(), Node: in.GetNode(),
	}
	if out.Namespace == "" || out.ServiceAccount == "" {
		return PodInfo{}, errors.New("workload info needs a namespace and a service account")
	}
	for _, s := range in.GetIps() {
		a, err := netip.ParseAddr(s)
		if err != nil {
			return PodInfo{}, fmt.Errorf("workload info: ip %q: %w", s, err)
		}
		out.IPs = append(out.IPs, a.Unmap())
	}
	if len(out.IPs) == 0 {
		return PodInfo{}, errors.New("workload info has no IP")
	}
	return out, nil
}
