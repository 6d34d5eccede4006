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
	"github.com/amesh-dev/amesh/api/hbone"
	"go.uber.org/zap"

	"github.com/amesh-dev/amesh/ztunnel/internal/netns"
	"github.com/amesh-dev/amesh/ztunnel/internal/route"
	"github.com/amesh-dev/amesh/ztunnel/internal/store"
	"github.com/amesh-dev/amesh/ztunnel/internal/telemetry"
)

// errNotRedirected: a connection reached 15001 without a capture redirect.
var errNotRedirected = errors.New("connection was not redirected by the capture rules")

func addrPort(a net.Addr) netip.AddrPort {
	if ta, ok := a.(*net.TCPAddr); ok {
		ap := ta.AddrPort()
		return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
	}
	return netip.AddrPort{}
}

// outbound forwards one connection captured from the pod's applications.
func (p *Proxy) outbound(pd *pod, c *net.TCPConn) {
	acc := &telemetry.Access{
		Direction: "outbound", Listener: "15001", Start: time.Now(),
		Source: addrPort(c.RemoteAddr()), SourceID: pd.id.String(), SourcePod: pd.name(),
	}
	defer p.accessLog(acc)
	dst, err := capture.OriginalDestination(c)
	if err == nil && (dst.Addr().IsLoopback() || dst.Port() == p.cfg.OutboundPort && hasIP(pd.info.IPs, dst.Addr())) {
		err = errNotRedirected
	}
	if err != nil {
		c.Close()
		acc.Err, acc.Flags = err, telemetry.FlagBadRequest
		return
	}
	acc.Destination = dst
	src := p.cfg.Store.Workload(pd.uid)
	rs := route.Source{}
	if src != nil {
		rs.Gateway = src.W.GetWaypointForGateway()
	}
	plan, err := p.cfg.Router.Outbound(rs, dst)
	if err != nil {
		c.Close()
		acc.Err, acc.Flags = err, telemetry.FlagNoHealthy
		p.openClosed(p.outboundLabels(pd, src, plan, route.Target{}, telemetry.FlagNoHealthy))
		return
	}
	if plan.Service != nil {
		acc.Service = plan.Service.S.GetHostname()
	}

	tr := &tracked{}
	if !pd.track(tr) {
		c.Close()
		return
	}
	defer pd.untrack(tr)
	tr.add(c)

	var up net.Conn
	var target route.Target
	for i, t := range plan.Targets {
		target = t
		up, err = p.dialTarget(pd, t, acc.Source.Addr())
		if err == nil || errors.Is(err, errDenied) || pd.ctx.Err() != nil {
			break
		}
		if i+1 < len(plan.Targets) {
			p.log.Debug("connect failed; retrying on another endpoint", zap.Stringer("target", t), zap.Error(err))
		}
	}
	acc.Upstream, acc.Protocol, acc.Waypoint = target.Proxy, target.Kind.String(), target.Waypoint
	if target.Kind == route.Passthrough {
		acc.Upstream = target.Authority
	}
	if !target.Identity.IsZero() {
		acc.DestinationID = target.Identity.String()
	}
	if target.Workload != nil {
		acc.Workload = target.Workload.W.GetNamespace() + "/" + target.Workload.W.GetName()
	}
	if err != nil {
		c.Close()
		acc.Err, acc.Flags = err, telemetry.FlagConnectFailed
		if errors.Is(err, errDenied) {
			acc.Flags = telemetry.FlagDenied
		}
		p.openClosed(p.outboundLabels(pd, src, plan, target, acc.Flags))
		return
	}
	tr.add(up)
	m := p.cfg.Metrics.Open(p.outboundLabels(pd, src, plan, target, ""))
	acc.Received, acc.Sent, err = hbone.Splice(c, up)
	c.Close()
	up.Close()
	m.Bytes(acc.Received, acc.Sent)
	m.Close()
	if err != nil && !tr.revoked() {
		acc.Err = err
	}
}

// dialTarget opens the upstream connection of one target from inside the
// pod's namespace.
func (p *Proxy) dialTarget(pd *pod, t route.Target, src netip.Addr) (net.Conn, error) {
	ctx, cancel := context.WithTimeout(pd.ctx, p.cfg.ConnectTimeout)
	defer cancel()
	if t.Kind == route.HBONE {
		return pd.tunnel.dial(ctx, t, src)
	}
	c, err := pd.ns.Dial(ctx, "tcp", t.Authority.String(), netip.Addr{}, netns.SockOpts{Mark: p.cfg.Mark})
	if err != nil {
		return nil, fmt.Errorf("passthrough to %s: %w", t.Authority, err)
	}
	return c, nil
}

// peerOf renders a workload's telemetry labels.
func peerOf(w *store.Workload) telemetry.Peer {
	if w == nil {
		return telemetry.Peer{}
	}
	p := telemetry.Peer{
		Workload: w.W.GetWorkloadName(), Namespace: w.W.GetNamespace(),
		App: w.W.GetCanonicalName(), Version: w.W.GetCanonicalRevision(), Cluster: w.W.GetClusterId(),
	}
	if p.Workload == "" {
		p.Workload = w.W.GetName()
	}
	if !w.Identity.IsZero() {
		p.Principal = w.Identity.String()
	}
	return p
}

// podPeer is the telemetry of a local pod, from discovery or the agent.
func (pd *pod) peer(w *store.Workload) telemetry.Peer {
	if w != nil {
		return peerOf(w)
	}
	return telemetry.Peer{Workload: pd.info.Name, Namespace: pd.info.Namespace, Principal: pd.id.String()}
}

func serviceLabels(l *telemetry.Labels, s *store.Service) {
	if s == nil {
		return
	}
	l.ServiceHost = s.S.GetHostname()
	l.ServiceNamespace = s.S.GetNamespace()
	l.ServiceName = s.S.GetName()
	if l.ServiceName == "" {
		l.ServiceName, _, _ = strings.Cut(l.ServiceHost, ".")
	}
}

func (p *Proxy) outboundLabels(pd *pod, src *store.Workload, plan route.Plan, t route.Target, flags string) *telemetry.Labels {
	l := &telemetry.Labels{
		Reporter: telemetry.ReporterSource,
		Source:   pd.peer(src),
		Flags:    flags,
		Security: telemetry.None,
	}
	if t.Kind == route.HBONE {
		l.Security = telemetry.MutualTLS
	}
	if t.Workload != nil && !t.Waypoint {
		l.Destination = peerOf(t.Workload)
	}
	serviceLabels(l, plan.Service)
	return l
}

// openClosed counts a connection that failed before any byte flowed.
func (p *Proxy) openClosed(l *telemetry.Labels) {
	p.cfg.Metrics.Open(l).Close()
}

func (p *Proxy) accessLog(a *telemetry.Access) {
	if p.cfg.AccessLog != nil {
		a.Log(p.cfg.AccessLog)
	}
}
