// Package proxy is ztunnel's data plane: for every pod handed over by the
// node agent it opens the outbound (15001), inbound plaintext (15006) and
// inbound HBONE (15008) listeners inside the pod's network namespace and
// forwards connections as DESIGN.md §4 describes — outbound through the
// router to HBONE or passthrough, inbound through mTLS, authority check and
// L4 authorization to the application, connected with the client's source
// address. Live inbound connections are re-authorized whenever discovery
// changes. Removing a pod, or stopping the proxy, closes its listeners and
// drains its connections within a deadline.
package proxy

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/amesh-dev/amesh/api/identity"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"go.uber.org/zap"

	"github.com/amesh-dev/amesh/ztunnel/internal/agent"
	"github.com/amesh-dev/amesh/ztunnel/internal/netns"
	"github.com/amesh-dev/amesh/ztunnel/internal/route"
	"github.com/amesh-dev/amesh/ztunnel/internal/store"
	"github.com/amesh-dev/amesh/ztunnel/internal/telemetry"
)

// Ports of the per-pod listeners.
const (
	OutboundPort  = 15001
	PlaintextPort = 15006
	HBONEPort     = 15008
)

// Certs provides workload certificates (identity.Store).
type Certs interface {
	Certificate(ctx context.Context, id spiffeid.ID) (*tls.Certificate, error)
	Release(id spiffeid.ID)
}

// Config configures a Proxy.
type Config struct {
	Store     *store.Store
	Router    *route.Router
	Certs     Certs
	Bundle    *identity.Bundle
	Metrics   *telemetry.Metrics
	Logger    *zap.Logger
	AccessLog *zap.Logger // nil: no access log
	// TrustDomain of pods not (yet) known to discovery.
	TrustDomain string
	// Mark is put on every socket opened in a pod (capture.Mark).
	Mark uint32
	// ConnectTimeout bounds dialling an upstream (default 5 s).
	ConnectTimeout time.Duration
	// DrainTimeout bounds draining a pod's connections (default 5 s).
	DrainTimeout time.Duration
	// Ports override the listener ports (tests); zero means the default.
	OutboundPort, PlaintextPort, HBONEPort uint16
}

func (c *Config) setDefaults() {
	if c.ConnectTimeout == 0 {
		c.ConnectTimeout = 5 * time.Second
	}
	if c.DrainTimeout == 0 {
		c.DrainTimeout = 5 * time.Second
	}
	if c.OutboundPort == 0 {
		c.OutboundPort = OutboundPort
	}
	if c.PlaintextPort == 0 {
		c.PlaintextPort = PlaintextPort
	}
	if c.HBONEPort == 0 {
		c.HBONEPort = HBONEPort
	}
	if c.Logger == nil {
		c.Logger = zap.NewNop()
	}
}

// Proxy serves the pods of one node.
type Proxy struct {
	cfg Config
	log *zap.Logger

	mu       sync.Mutex
	pods     map[string]*pod
	idRefs   map[spiffeid.ID]int
	stopping bool
	draining sync.WaitGroup // pods being drained
	runCtx   context.Context

	// rechecked is the store version that the last completed re-check of
	// live connections covered.
	rechecked atomic.Uint64
	// authorized, when set (tests), runs after each inbound connection's
	// authorization decision.
	authorized atomic.Pointer[func()]
}

// New returns a proxy; Run must be called for it to work.
func New(cfg Config) *Proxy {
	cfg.setDefaults()
	return &Proxy{
		cfg:    cfg,
		log:    cfg.Logger,
		pods:   map[string]*pod{},
		idRefs: map[spiffeid.ID]int{},
		runCtx: context.Background(),
	}
}

// Run re-authorizes live connections on every discovery change until ctx
// is done; then it stops accepting on every pod, drains their connections
// within the drain timeout and returns once every goroutine has exited.
func (p *Proxy) Run(ctx context.Context) error {
	p.mu.Lock()
	p.runCtx = ctx
	p.mu.Unlock()
	ch := p.cfg.Store.Changed()
	for {
		select {
		case <-ctx.Done():
			p.shutdown()
			return nil
		case <-ch:
			// Wait for the next change from here on, before re-checking:
			// a change during the re-check triggers another one.
			ch = p.cfg.Store.Changed()
			v := p.cfg.Store.Version()
			p.recheck()
			p.rechecked.Store(v)
		}
	}
}

func (p *Proxy) shutdown() {
	p.mu.Lock()
	p.stopping = true
	pods := make([]*pod, 0, len(p.pods))
	for uid, pd := range p.pods {
		pods = append(pods, pd)
		delete(p.pods, uid)
	}
	p.mu.Unlock()
	p.log.Info("draining", zap.Int("pods", len(pods)), zap.Duration("deadline", p.cfg.DrainTimeout))
	for _, pd := range pods {
		pd.stopAccepting()
	}
	for _, pd := range pods {
		p.draining.Add(1)
		go func() {
			defer p.draining.Done()
			pd.drain(p.cfg.DrainTimeout)
			p.release(pd)
		}()
	}
	p.draining.Wait()
}

// AddPod starts serving a pod: it opens its listeners inside ns and
// starts fetching its certificate. ns is owned by the proxy from now on.
func (p *Proxy) AddPod(uid string, info agent.PodInfo, ns *netns.Namespace) error {
	p.mu.Lock()
	if p.stopping {
		p.mu.Unlock()
		ns.Close()
		return errors.New("ztunnel is shutting down")
	}
	old := p.pods[uid]
	if old != nil && old.ns.Inode() == ns.Inode() {
		p.mu.Unlock()
		ns.Close()
		return nil
	}
	p.mu.Unlock()
	if old != nil {
		p.log.Info("pod network namespace changed; replacing", zap.String("uid", uid))
		p.RemovePod(uid)
	}

	id, err := p.podIdentity(uid, info)
	if err != nil {
		ns.Close()
		return err
	}
	pd := newPod(p, uid, info, ns, id)
	if err := pd.listen(); err != nil {
		pd.closeNS()
		return err
	}
	p.mu.Lock()
	if p.stopping {
		p.mu.Unlock()
		pd.stopAccepting()
		pd.drain(0)
		return errors.New("ztunnel is shutting down")
	}
	p.pods[uid] = pd
	p.idRefs[id]++
	// Fetch the certificate now so the first connection does not wait.
	// The fetch ends with the pod (stopPrefetch) or with Run, and the
	// pod's identity is released only after it.
	if p.cfg.Certs != nil {
		ctx, cancel := context.WithTimeout(p.runCtx, time.Minute)
		pd.prefetchCancel, pd.prefetched = cancel, make(chan struct{})
		go func() {
			defer close(pd.prefetched)
			defer cancel()
			if _, err := p.cfg.Certs.Certificate(ctx, id); err != nil && ctx.Err() == nil {
				p.log.Warn("prefetching certificate failed", zap.String("identity", id.String()), zap.Error(err))
			}
		}()
	}
	p.mu.Unlock()
	pd.serve()
	p.log.Info("pod added", zap.String("uid", uid), zap.String("pod", info.Namespace+"/"+info.Name),
		zap.String("identity", id.String()), zap.Stringers("ips", info.IPs))
	return nil
}

// podIdentity is the pod's SPIFFE ID: from discovery when it knows the
// pod, else from what the node agent told.
func (p *Proxy) podIdentity(uid string, info agent.PodInfo) (spiffeid.ID, error) {
	if w := p.cfg.Store.Workload(uid); w != nil && !w.Identity.IsZero() {
		return w.Identity, nil
	}
	id, err := store.IdentityOf(p.cfg.TrustDomain, info.Namespace, info.ServiceAccount)
	if err != nil {
		return spiffeid.ID{}, fmt.Errorf("pod %s identity: %w", uid, err)
	}
	return id, nil
}

// HasPod reports whether the pod is served.
func (p *Proxy) HasPod(uid string) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	_, ok := p.pods[uid]
	return ok
}

// PodUIDs lists the served pods.
func (p *Proxy) PodUIDs() []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := make([]string, 0, len(p.pods))
	for uid := range p.pods {
		out = append(out, uid)
	}
	sort.Strings(out)
	return out
}

// RemovePod stops accepting for a pod at once and drains its connections
// in the background.
func (p *Proxy) RemovePod(uid string) {
	p.mu.Lock()
	pd, ok := p.pods[uid]
	if ok {
		delete(p.pods, uid)
		p.draining.Add(1)
	}
	p.mu.Unlock()
	if !ok {
		return
	}
	pd.stopAccepting()
	p.log.Info("pod removed; draining", zap.String("uid", uid))
	go func() {
		defer p.draining.Done()
		pd.drain(p.cfg.DrainTimeout)
		p.release(pd)
	}()
}

// release drops a drained pod's reference to its identity, once the
// pod's certificate prefetch has ended; the last reference releases the
// certificate. Certs.Release is called under the lock, so that an AddPod
// of the same identity comes wholly before (the reference it takes keeps
// the certificate) or wholly after (its prefetch fetches a new one): its
// prefetched certificate is never dropped.
func (p *Proxy) release(pd *pod) {
	pd.stopPrefetch()
	p.mu.Lock()
	defer p.mu.Unlock()
	p.idRefs[pd.id]--
	if p.idRefs[pd.id] > 0 {
		return
	}
	delete(p.idRefs, pd.id)
	if p.cfg.Certs != nil {
		p.cfg.Certs.Release(pd.id)
	}
}

// recheck re-authorizes every live inbound connection and closes those
// that policy no longer allows. Inbound connections are registered
// (pod.track) before their first authorization, so each one is either
// registered before a re-check starts, or decided against a store at least
// as new as the one the re-check reads: none escapes a policy change.
func (p *Proxy) recheck() {
	p.mu.Lock()
	pods := make([]*pod, 0, len(p.pods))
	for _, pd := range p.pods {
		pods = append(pods, pd)
	}
	p.mu.Unlock()
	for _, pd := range pods {
		for _, tc := range pd.inboundConns() {
			d := p.authorize(pd, &tc.attrs, tc.peer, tc.plaintext)
			if !d.Allowed {
				p.log.Info("closing connection no longer allowed by policy",
					zap.String("pod", pd.name()), zap.String("src", tc.attrs.SourceIP.String()),
					zap.String("reason", d.Reason))
				tc.revoke()
			}
		}
	}
}

// PodDump describes a served pod for the config dump.
type PodDump struct {
	UID         string   `json:"uid"`
	Name        string   `json:"name"`
	Namespace   string   `json:"namespace"`
	Identity    string   `json:"identity"`
	IPs         []string `json:"ips"`
	Connections int      `json:"connections"`
}

// Dump lists the served pods.
func (p *Proxy) Dump() []PodDump {
	p.mu.Lock()
	pods := make([]*pod, 0, len(p.pods))
	for _, pd := range p.pods {
		pods = append(pods, pd)
	}
	p.mu.Unlock()
	out := make([]PodDump, 0, len(pods))
	for _, pd := range pods {
		d := PodDump{UID: pd.uid, Name: pd.info.Name, Namespace: pd.info.Namespace, Identity: pd.id.String(), Connections: pd.connCount()}
		for _, a := range pd.info.IPs {
			d.IPs = append(d.IPs, a.String())
		}
		out = append(out, d)
	}
	slices.SortFunc(out, func(a, b PodDump) int {
		if a.UID < b.UID {
			return -1
		}
		if a.UID > b.UID {
			return 1
		}
		return 0
	})
	return out
}

// hasIP reports whether a is one of the pod's addresses.
func hasIP(ips []netip.Addr, a netip.Addr) bool {
	a = a.Unmap()
	return slices.Contains(ips, a)
}
