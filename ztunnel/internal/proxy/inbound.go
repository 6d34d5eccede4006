package proxy

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"time"

	"github.com/amesh-dev/amesh/api/capture"
	discoveryv1 "github.com/amesh-dev/amesh/api/discovery/v1"
	"github.com/amesh-dev/amesh/api/hbone"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/amesh-dev/amesh/ztunnel/internal/authz"
	"github.com/amesh-dev/amesh/ztunnel/internal/netns"
	"github.com/amesh-dev/amesh/ztunnel/internal/store"
	"github.com/amesh-dev/amesh/ztunnel/internal/telemetry"
)

// Inbound refusals.
var (
	errDenied      = errors.New("denied by policy")
	errBadTarget   = errors.New("authority is not this pod")
	errUnreachable = errors.New("application unreachable")
)

// workload returns the discovery workload of a local pod.
func (p *Proxy) workload(pd *pod) *store.Workload {
	if w := p.cfg.Store.Workload(pd.uid); w != nil {
		return w
	}
	for _, a := range pd.info.IPs {
		if w := p.cfg.Store.WorkloadByIP(a); w != nil && w.W.GetNamespace() == pd.info.Namespace && w.W.GetNode() == pd.info.Node {
			return w
		}
	}
	return nil
}

// authorize decides one inbound connection to a local pod (DESIGN.md §4):
// plaintext needs a PERMISSIVE mode; the waypoints the pod is bound to are
// admitted (they enforce its policies); everyone else goes through the
// pod's L4 policies, DENY first, then ALLOW. A pod discovery does not know
// yet is checked against its namespace's and the global policies, unless
// workload-scoped policies exist in its namespace that might select it:
// then the connection is refused until discovery catches up.
func (p *Proxy) authorize(pd *pod, a *authz.Conn, peer spiffeid.ID, plaintext bool) authz.Decision {
	w := p.workload(pd)
	if plaintext {
		if w == nil {
			return authz.Decision{Reason: "plaintext refused: pod not yet known to discovery (mTLS mode unknown)"}
		}
		if w.MtlsMode(a.DestinationPort) == discoveryv1.MtlsMode_MTLS_MODE_STRICT {
			return authz.Decision{Reason: "plaintext refused: STRICT mTLS"}
		}
	} else if w != nil {
		for _, id := range p.cfg.Router.Waypoints(w) {
			if id == peer {
				return authz.Decision{Allowed: true, Reason: "waypoint of the destination"}
			}
		}
	}
	var names []string
	if w != nil {
		names = w.W.GetAuthorizationPolicies()
	} else if p.cfg.Store.HasWorkloadPolicies(pd.info.Namespace) {
		return authz.Decision{Reason: "pod not yet known to discovery and its namespace has workload policies"}
	}
	return authz.Evaluate(p.cfg.Store.Policies(pd.info.Namespace, names), a)
}

// appTarget reports whether dst is an application address of the pod:
// one of its IPs, and not one of ztunnel's own ports (no loops).
func (p *Proxy) appTarget(pd *pod, dst netip.AddrPort) bool {
	switch dst.Port() {
	case p.cfg.OutboundPort, p.cfg.PlaintextPort, p.cfg.HBONEPort:
		return false
	}
	return hasIP(pd.info.IPs, dst.Addr())
}

// hboneHandler decides the CONNECT requests arriving on the pod's 15008:
// the authority must be the pod itself (400), the peer must be authorized
// (401), and the application must accept the connection, made with the
// peer's address, before the 200 (503).
func (p *Proxy) hboneHandler(pd *pod) hbone.Handler {
	return func(ctx context.Context, r *hbone.Request) (func(net.Conn), error) {
		acc := &telemetry.Access{
			Direction: "inbound", Listener: "15008", Start: time.Now(), Protocol: "hbone",
			Source: r.RemoteAddr, SourceID: r.Peer.String(), Destination: r.Authority, Upstream: r.Authority,
			Workload: pd.name(), DestinationID: pd.id.String(),
		}
		if !p.appTarget(pd, r.Authority) {
			acc.Err, acc.Flags = fmt.Errorf("%w: %s", errBadTarget, r.Authority), telemetry.FlagBadRequest
			p.accessLog(acc)
			return nil, fmt.Errorf("%w: %w", hbone.ErrBadTarget, acc.Err)
		}
		ns, _ := namespaceOf(r.Peer)
		attrs := authz.Conn{
			SourceIP: r.RemoteAddr.Addr().Unmap(), Principal: store.Principal(r.Peer), Namespace: ns,
			DestinationIP: r.Authority.Addr(), DestinationPort: r.Authority.Port(),
		}
		labels := p.inboundLabels(pd, p.workload(pd), p.cfg.Store.WorkloadByIP(attrs.SourceIP), r.Peer, r.Authority.Port())
		// Registered for re-checks before the decision (see recheck).
		tr := &tracked{inbound: true, attrs: attrs, peer: r.Peer}
		if !pd.track(tr) {
			acc.Err = errors.New("pod is shutting down")
			p.accessLog(acc)
			return nil, fmt.Errorf("%w: %w", hbone.ErrUnreachable, acc.Err)
		}
		d := p.authorize(pd, &attrs, r.Peer, false)
		if f := p.authorized.Load(); f != nil {
			(*f)()
		}
		acc.Policy = d.Policy
		deny := func(reason string) (func(net.Conn), error) {
			pd.untrack(tr)
			acc.Err, acc.Flags = fmt.Errorf("%w: %s", errDenied, reason), telemetry.FlagDenied
			labels.Flags = telemetry.FlagDenied
			p.openClosed(labels)
			p.accessLog(acc)
			return nil, fmt.Errorf("%w: %w", hbone.ErrDenied, acc.Err)
		}
		if !d.Allowed {
			return deny(d.Reason)
		}
		app, err := p.connectApp(ctx, pd, attrs.SourceIP, r.Authority)
		if err != nil {
			pd.untrack(tr)
			acc.Err, acc.Flags = err, telemetry.FlagConnectFailed
			labels.Flags = telemetry.FlagConnectFailed
			p.openClosed(labels)
			p.accessLog(acc)
			return nil, fmt.Errorf("%w: %w", hbone.ErrUnreachable, err)
		}
		tr.add(app) // closes app if a re-check revoked the connection meanwhile
		if tr.revoked() {
			return deny("policy changed while connecting")
		}
		return func(stream net.Conn) {
			defer pd.untrack(tr)
			tr.add(stream)
			m := p.cfg.Metrics.Open(labels)
			var err error
			acc.Received, acc.Sent, err = hbone.Splice(stream, app)
			stream.Close()
			app.Close()
			m.Bytes(acc.Received, acc.Sent)
			m.Close()
			if tr.revoked() {
				acc.Flags = telemetry.FlagDenied
			} else if err != nil {
				acc.Err = err
			}
			p.accessLog(acc)
		}, nil
	}
}

// connectApp connects to the application inside the pod with the
// client's source address.
func (p *Proxy) connectApp(ctx context.Context, pd *pod, src netip.Addr, dst netip.AddrPort) (net.Conn, error) {
	ctx, cancel := context.WithTimeout(ctx, p.cfg.ConnectTimeout)
	defer cancel()
	c, err := pd.ns.Dial(ctx, "tcp", dst.String(), src, netns.SockOpts{Mark: p.cfg.Mark, Transparent: true})
	if err != nil {
		return nil, fmt.Errorf("%w: %s: %w", errUnreachable, dst, err)
	}
	return c, nil
}

// plaintext serves one connection captured on 15006.
func (p *Proxy) plaintext(pd *pod, c *net.TCPConn) {
	acc := &telemetry.Access{
		Direction: "inbound", Listener: "15006", Start: time.Now(), Protocol: "plaintext",
		Source: addrPort(c.RemoteAddr()),
	}
	defer p.accessLog(acc)
	dst, err := capture.OriginalDestination(c)
	if err == nil && !p.appTarget(pd, dst) {
		err = fmt.Errorf("%w: %s", errBadTarget, dst)
	}
	if err != nil {
		c.Close()
		acc.Err, acc.Flags = err, telemetry.FlagBadRequest
		return
	}
	acc.Destination, acc.Upstream = dst, dst
	acc.Workload, acc.DestinationID = pd.name(), pd.id.String()
	attrs := authz.Conn{SourceIP: acc.Source.Addr(), DestinationIP: dst.Addr(), DestinationPort: dst.Port()}
	w := p.workload(pd)
	labels := p.inboundLabels(pd, w, p.cfg.Store.WorkloadByIP(attrs.SourceIP), spiffeid.ID{}, dst.Port())
	labels.Security = telemetry.None
	// Registered for re-checks before the decision (see recheck).
	tr := &tracked{inbound: true, attrs: attrs, plaintext: true}
	if !pd.track(tr) {
		c.Close()
		return
	}
	defer pd.untrack(tr)
	tr.add(c)
	d := p.authorize(pd, &attrs, spiffeid.ID{}, true)
	if f := p.authorized.Load(); f != nil {
		(*f)()
	}
	acc.Policy = d.Policy
	deny := func(reason string) {
		c.Close()
		acc.Err, acc.Flags = fmt.Errorf("%w: %s", errDenied, reason), telemetry.FlagDenied
		labels.Flags = telemetry.FlagDenied
		p.openClosed(labels)
	}
	if !d.Allowed {
		deny(d.Reason)
		return
	}
	app, err := p.connectApp(pd.ctx, pd, attrs.SourceIP, dst)
	if err != nil {
		c.Close()
		acc.Err, acc.Flags = err, telemetry.FlagConnectFailed
		labels.Flags = telemetry.FlagConnectFailed
		p.openClosed(labels)
		return
	}
	tr.add(app) // closes app if a re-check revoked the connection meanwhile
	if tr.revoked() {
		deny("policy changed while connecting")
		return
	}
	m := p.cfg.Metrics.Open(labels)
	acc.Received, acc.Sent, err = hbone.Splice(c, app)
	c.Close()
	app.Close()
	m.Bytes(acc.Received, acc.Sent)
	m.Close()
	if tr.revoked() {
		acc.Flags = telemetry.FlagDenied
	} else if err != nil {
		acc.Err = err
	}
}

// inboundLabels are the destination-reported labels of a connection to a
// local pod.
func (p *Proxy) inboundLabels(pd *pod, w, src *store.Workload, peer spiffeid.ID, port uint16) *telemetry.Labels {
	l := &telemetry.Labels{
		Reporter:    telemetry.ReporterDestination,
		Destination: pd.peer(w),
		Source:      peerOf(src),
		Security:    telemetry.MutualTLS,
	}
	if !peer.IsZero() {
		l.Source.Principal = peer.String()
		if src == nil || src.Identity != peer {
			// The peer is not the workload at the source address (a
			// waypoint, or an unknown client): report only its identity.
			l.Source = telemetry.Peer{Principal: peer.String()}
			if ns, ok := namespaceOf(peer); ok {
				l.Source.Namespace = ns
			}
		}
	}
	if w != nil {
		for svc, ports := range w.Services {
			for sp, tp := range ports {
				if uint16(tp) == port || (tp == 0 && uint16(sp) == port) {
					serviceLabels(l, p.cfg.Store.Service(svc))
					return l
				}
			}
		}
	}
	return l
}

// namespaceOf extracts <ns> from spiffe://<td>/ns/<ns>/sa/<sa>.
func namespaceOf(id spiffeid.ID) (string, bool) {
	segs := strings.Split(strings.TrimPrefix(id.Path(), "/"), "/")
	if len(segs) == 4 && segs[0] == "ns" && segs[2] == "sa" && segs[1] != "" {
		return segs[1], true
	}
	return "", false
}
