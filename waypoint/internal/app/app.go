package app

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/amesh-dev/amesh/api/bearer"
	"github.com/amesh-dev/amesh/api/ca"
	discoveryv1 "github.com/amesh-dev/amesh/api/discovery/v1"
	"github.com/amesh-dev/amesh/api/hbone"
	"github.com/amesh-dev/amesh/api/identity"
	"github.com/amesh-dev/amesh/api/xds/xdsclient"
	"github.com/amesh-dev/amesh/waypoint/internal/admin"
	"github.com/amesh-dev/amesh/waypoint/internal/authn"
	"github.com/amesh-dev/amesh/waypoint/internal/catalog"
	"github.com/amesh-dev/amesh/waypoint/internal/proxy"
	"github.com/amesh-dev/amesh/waypoint/internal/telemetry"
	"github.com/amesh-dev/amesh/waypoint/internal/tunnel"
	"github.com/amesh-dev/amesh/waypoint/internal/upstream"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/structpb"
)

// App is a running waypoint's set of components.
type App struct {
	cfg  Config
	log  *zap.Logger
	self spiffeid.ID
	td   spiffeid.TrustDomain

	lnHBONE, lnAdmin, lnMetrics, lnReady net.Listener

	reg      *prometheus.Registry
	bundle   *identity.Bundle
	conn     *grpc.ClientConn
	store    *identity.Store
	hclient  *hbone.Client
	cat      *catalog.Catalog
	keys     *authn.KeyCache
	proxy    *proxy.Proxy
	tunnel   *tunnel.Server
	hserver  *hbone.Server
	xds      *xdsclient.Client
	admin    *admin.Server
	tracer   *telemetry.Tracer
	draining atomic.Bool
	// stopAccess flushes the buffered access log.
	stopAccess func() error
	// gatewaySeen: whether the WaypointGateway was there when last
	// logged (for logging its arrival and loss once synced).
	gwMu                       sync.Mutex
	gatewaySeen, gatewayLogged bool

	// UpstreamHBONEPort is where endpoints' ztunnels listen (15008).
	upstreamPort uint16
}

// Run builds the waypoint from cfg and runs it until ctx ends.
func Run(ctx context.Context, cfg Config, log *zap.Logger) error {
	a, err := New(ctx, cfg, log)
	if err != nil {
		return err
	}
	return a.Run(ctx)
}

// New binds the listeners and builds the components.
func New(ctx context.Context, cfg Config, log *zap.Logger) (*App, error) {
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("config: %w", err)
	}
	a := &App{cfg: cfg, log: log, reg: prometheus.NewRegistry(), bundle: identity.NewBundle(), upstreamPort: 15008}
	if cfg.UpstreamHBONEPort != 0 {
		a.upstreamPort = cfg.UpstreamHBONEPort
	}
	var err error
	if a.td, err = spiffeid.TrustDomainFromString(cfg.TrustDomain); err != nil {
		return nil, fmt.Errorf("trust domain: %w", err)
	}
	if a.self, err = identity.ID(cfg.TrustDomain, cfg.Namespace, cfg.ServiceAccount); err != nil {
		return nil, fmt.Errorf("identity: %w", err)
	}
	rootPEM, err := os.ReadFile(cfg.RootCertFile)
	if err != nil {
		return nil, fmt.Errorf("root certificates: %w", err)
	}
	if err := a.bundle.SetPEM(a.td, rootPEM); err != nil {
		return nil, fmt.Errorf("root certificates %s: %w", cfg.RootCertFile, err)
	}
	a.reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))

	// Controller connection: TLS verified against the mesh roots, bearer
	// token on every call.
	serverName := cfg.ControllerServerName
	if serverName == "" {
		serverName, _, _ = net.SplitHostPort(cfg.ControllerAddr)
	}
	token := func(context.Context) (string, error) {
		b, err := os.ReadFile(cfg.TokenFile)
		if err != nil {
			return "", fmt.Errorf("token: %w", err)
		}
		return strings.TrimSpace(string(b)), nil
	}
	a.conn, err = grpc.NewClient(cfg.ControllerAddr,
		// Verified at each handshake against the roots discovery
		// publishes and those of the root file now (a root rotation;
		// identity.ControllerRoots).
		grpc.WithTransportCredentials(credentials.NewTLS(identity.ControllerTLS(serverName, identity.ControllerRoots(a.bundle, a.td, cfg.RootCertFile)))),
		grpc.WithPerRPCCredentials(bearer.PerRPC(token)))
	if err != nil {
		return nil, fmt.Errorf("controller connection: %w", err)
	}
	// The connection already carries the bearer token (PerRPC), so the CA
	// client gets no token source of its own.
	a.store = identity.NewStore(ca.NewClient(a.conn, nil), identity.StoreOptions{Logger: log.Named("certs")})
	a.hclient = hbone.NewClient(hbone.ClientConfig{Certificates: a.store.Certificate, Bundle: a.bundle, Logger: log.Named("hbone-client")})

	metrics := telemetry.NewMetrics(a.reg)
	a.tracer, err = telemetry.NewTracer(ctx, telemetry.TracingConfig{OTLPEndpoint: cfg.OTLPEndpoint, Insecure: cfg.OTLPInsecure,
		SampleRatio: cfg.TraceSampling, ServiceName: "waypoint." + cfg.Namespace})
	if err != nil {
		return nil, err
	}
	a.keys = authn.NewKeyCache(authn.Options{})
	a.cat = catalog.New(catalog.Options{Dial: a.dialEndpoint, Keys: a.keys, Logger: log.Named("catalog"), Gateway: cfg.Gateway})
	a.reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "amesh_waypoint_invalid_local_rate_limits",
		Help: "Services (and this waypoint's Gateway) whose LocalRateLimit cannot be enforced; their requests are refused with 503."},
		func() float64 { return float64(a.cat.InvalidRateLimits()) }))
	var access *zap.Logger
	a.stopAccess = func() error { return nil }
	if cfg.AccessLog {
		access, a.stopAccess = telemetry.NewAccessLog(os.Stdout)
	}
	a.proxy = proxy.New(proxy.Options{Catalog: a.cat, Metrics: metrics, Tracer: a.tracer, AccessLog: access,
		Logger: log.Named("proxy"), ClusterID: cfg.ClusterID, RequestBodyIdleTimeout: bodyIdle(cfg.RequestBodyIdleTimeout)})
	a.tunnel = tunnel.New(tunnel.Options{Catalog: a.cat, Proxy: a.proxy, Metrics: metrics, Logger: log.Named("tunnel"),
		ClusterID: cfg.ClusterID, Limits: tunnel.Limits{DrainTimeout: cfg.DrainTimeout}})
	a.hserver = hbone.NewServer(hbone.ServerConfig{Certificate: a.store.GetCertificate(a.self), Bundle: a.bundle, TrustDomain: a.td,
		Handler: a.handleTunnel, Logger: log.Named("hbone"), DrainTimeout: cfg.DrainTimeout})

	meta, err := structpb.NewStruct(map[string]any{"kind": "waypoint", "node": cfg.NodeName, "namespace": cfg.Namespace,
		"pod": cfg.PodName, "gateway": cfg.Gateway})
	if err != nil {
		return nil, fmt.Errorf("node metadata: %w", err)
	}
	a.xds = xdsclient.New(xdsclient.Options{Conn: a.conn, Node: &xdsclient.Node{ID: cfg.PodName, Metadata: meta},
		TypeURLs: typeURLs(), Handler: xdsclient.HandlerFunc(a.apply), Logger: log.Named("xds"), Registerer: a.reg})

	listen := func(addr string) (net.Listener, error) {
		if addr == "" {
			return nil, nil
		}
		ln, err := net.Listen("tcp", addr)
		if err != nil {
			return nil, fmt.Errorf("listen %s: %w", addr, err)
		}
		return ln, nil
	}
	for _, x := range []struct {
		ln   *net.Listener
		addr string
	}{{&a.lnHBONE, cfg.HBONEAddr}, {&a.lnAdmin, cfg.AdminAddr}, {&a.lnMetrics, cfg.MetricsAddr}, {&a.lnReady, cfg.ReadyAddr}} {
		if *x.ln, err = listen(x.addr); err != nil {
			a.closeListeners()
			return nil, err
		}
	}
	a.admin = admin.New(admin.Options{Ready: a.lnReady, Metrics: a.lnMetrics, Admin: a.lnAdmin, IsReady: a.ready,
		Gatherer: a.reg, Logger: log.Named("admin"), Dumps: map[string]func() any{
			"catalog":           func() any { return a.cat.Snapshot() },
			"waypoint_services": func() any { return protoMap(a.cat.WaypointServices()) },
			"waypoint_gateway":  func() any { return a.cat.WaypointGateway() },
			"certificates":      func() any { return a.store.Snapshot() },
			"xds_versions": func() any {
				out := map[string]map[string]string{}
				for _, t := range typeURLs() {
					out[t] = a.xds.Versions(t)
				}
				return out
			},
		}})
	return a, nil
}

// typeURLs are the discovery types the waypoint subscribes to.
func typeURLs() []string {
	return []string{discoveryv1.TrustBundleType, discoveryv1.ServiceType, discoveryv1.WorkloadType,
		discoveryv1.WaypointServiceType, discoveryv1.WaypointGatewayType}
}

func protoMap[M proto.Message](m map[string]M) map[string]proto.Message {
	out := make(map[string]proto.Message, len(m))
	for k, v := range m {
		out[k] = v
	}
	return out
}

func (a *App) closeListeners() {
	for _, ln := range []net.Listener{a.lnHBONE, a.lnAdmin, a.lnMetrics, a.lnReady} {
		if ln != nil {
			_ = ln.Close()
		}
	}
}

// Addrs returns the bound addresses (hbone, admin, metrics, ready).
func (a *App) Addrs() (hboneAddr, adminAddr, metricsAddr, readyAddr string) {
	s := func(ln net.Listener) string {
		if ln == nil {
			return ""
		}
		return ln.Addr().String()
	}
	return s(a.lnHBONE), s(a.lnAdmin), s(a.lnMetrics), s(a.lnReady)
}

// Identity is the waypoint's own SPIFFE ID.
func (a *App) Identity() spiffeid.ID { return a.self }

// apply is the xDS handler.
func (a *App) apply(typeURL string, upserts []*xdsclient.Resource, removes []string) error {
	if typeURL == discoveryv1.TrustBundleType {
		for _, r := range upserts {
			tb, ok := r.Body.(*discoveryv1.TrustBundle)
			if !ok {
				return fmt.Errorf("trust bundle %s: unexpected %T", r.Name, r.Body)
			}
			td, err := spiffeid.TrustDomainFromString(tb.GetTrustDomain())
			if err != nil {
				return fmt.Errorf("trust bundle %s: %w", r.Name, err)
			}
			if err := a.bundle.SetPEM(td, []byte(strings.Join(tb.GetRootsPem(), "\n"))); err != nil {
				return fmt.Errorf("trust bundle %s: %w", r.Name, err)
			}
		}
		return nil // removed bundles: keep the roots (fail-safe for live connections)
	}
	msgs := make([]proto.Message, 0, len(upserts))
	for _, r := range upserts {
		msgs = append(msgs, r.Body)
	}
	if err := a.cat.Apply(typeURL, msgs, removes); err != nil {
		return err
	}
	a.logGateway()
	return nil
}

// logGateway logs, once synced, the WaypointGateway's arrival or absence
// and each later change of it.
func (a *App) logGateway() {
	if !a.cat.Ready() {
		return
	}
	a.gwMu.Lock()
	defer a.gwMu.Unlock()
	if gw := a.cat.GatewayReady(); !a.gatewayLogged || gw != a.gatewaySeen {
		a.gatewaySeen, a.gatewayLogged = gw, true
		if gw {
			a.log.Info("WaypointGateway received: serving workloads bound to this waypoint", zap.String("gateway", a.cfg.Gateway))
		} else {
			a.log.Warn("no WaypointGateway for this waypoint: traffic addressed to workloads bound to it is refused until one arrives",
				zap.String("gateway", a.cfg.Gateway))
		}
	}
}

// awaitSync opens the catalog (Resolve, readiness) once the xDS client
// reports Synced: every subscribed type had its whole first push handled,
// including every response of a push the controller split. Until then
// every tunnel is refused with 503 and the waypoint is not ready.
func (a *App) awaitSync(ctx context.Context) {
	select {
	case <-ctx.Done():
		return
	case <-a.xds.Synced():
	}
	a.cat.MarkSynced()
	a.log.Info("discovery synced: serving")
	a.logGateway()
}

func (a *App) ready() error {
	if a.draining.Load() {
		return errors.New("draining")
	}
	// Every subscribed type's first push in full (the xDS client's
	// Synced), not merely a delta of each: a large push arrives in several
	// responses. A WaypointGateway missing once synced keeps the waypoint
	// ready; only workload-addressed traffic is refused until it arrives.
	if !a.cat.Ready() {
		return errors.New("discovery not synced")
	}
	for _, c := range a.store.Snapshot() {
		if c.ID == a.self && c.State == "valid" {
			return nil
		}
	}
	return errors.New("no valid certificate yet")
}

// dialEndpoint opens the connection to one upstream endpoint: HBONE to its
// ztunnel with the waypoint's identity, or plain TCP outside the mesh.
func (a *App) dialEndpoint(ctx context.Context, ep *upstream.Endpoint) (net.Conn, error) {
	if !ep.HBONE {
		var d net.Dialer
		return d.DialContext(ctx, "tcp", ep.Addr.String())
	}
	want, err := spiffeid.FromString(ep.Identity)
	if err != nil {
		return nil, fmt.Errorf("endpoint identity %q: %w", ep.Identity, err)
	}
	return a.hclient.Dial(ctx, hbone.DialRequest{Source: a.self, Expected: []spiffeid.ID{want},
		Proxy: netip.AddrPortFrom(ep.Addr.Addr(), a.upstreamPort), Target: ep.Addr})
}

// handleTunnel decides on one inbound CONNECT.
func (a *App) handleTunnel(ctx context.Context, r *hbone.Request) (func(net.Conn), error) {
	if a.draining.Load() {
		return nil, fmt.Errorf("%w: draining", hbone.ErrUnreachable)
	}
	fn, err := a.tunnel.Accept(ctx, r.Peer.String(), sourceOf(r, a.cat.WorkloadByIP), r.Authority)
	switch {
	case err == nil:
		return fn, nil
	case errors.Is(err, tunnel.ErrUnknownTarget):
		return nil, fmt.Errorf("%w: %w", hbone.ErrBadTarget, err)
	case errors.Is(err, tunnel.ErrDenied):
		return nil, fmt.Errorf("%w: %w", hbone.ErrDenied, err)
	default:
		return nil, fmt.Errorf("%w: %w", hbone.ErrUnreachable, err)
	}
}

// sourceOf returns the original client address for policy (ipBlocks,
// source.ip), consistent hashing and telemetry: the HBONE peer address.
// ztunnel dials the waypoint from inside the source pod's network
// namespace, so that address already is the client's, and unlike a
// header it cannot be chosen by the peer. The "for" parameter of the
// tunnel's Forwarded header (RFC 7239) is used only when it names another
// address of the very workload that holds the peer address (a dual-stack
// pod reaching the waypoint over the other family) according to byIP;
// any other claim — another workload's address, an unknown address, a
// peer address no workload holds — is ignored.
func sourceOf(r *hbone.Request, byIP func(netip.Addr) *discoveryv1.Workload) netip.Addr {
	peer := r.RemoteAddr.Addr().Unmap()
	fwd, ok := forwardedFor(r.Header)
	if !ok || fwd == peer || byIP == nil {
		return peer
	}
	pw, fw := byIP(peer), byIP(fwd)
	if pw == nil || fw == nil || pw.GetUid() == "" || pw.GetUid() != fw.GetUid() {
		return peer
	}
	return fwd
}

// forwardedFor returns the first "for" address of the Forwarded headers.
func forwardedFor(h http.Header) (netip.Addr, bool) {
	for _, v := range h.Values("Forwarded") {
		for _, elem := range strings.Split(v, ",") {
			for _, pair := range strings.Split(elem, ";") {
				k, val, ok := strings.Cut(strings.TrimSpace(pair), "=")
				if !ok || !strings.EqualFold(k, "for") {
					continue
				}
				val = strings.Trim(val, `"`)
				if ap, err := netip.ParseAddrPort(val); err == nil {
					return ap.Addr().Unmap(), true
				}
				if ip, err := netip.ParseAddr(strings.Trim(val, "[]")); err == nil {
					return ip.Unmap(), true
				}
				return netip.Addr{}, false
			}
		}
	}
	return netip.Addr{}, false
}

// Run runs every component until ctx ends, then drains: readiness fails,
// new tunnels are refused, in-flight requests finish within the drain
// timeout.
func (a *App) Run(ctx context.Context) error {
	defer a.closeListeners()
	defer a.conn.Close()
	bg, stopBG := context.WithCancel(context.WithoutCancel(ctx))
	defer stopBG()
	var wg sync.WaitGroup
	errc := make(chan error, 8)
	run := func(name string, c context.Context, f func(context.Context) error) {
		wg.Go(func() {
			if err := f(c); err != nil && !errors.Is(err, context.Canceled) && !errors.Is(err, http.ErrServerClosed) {
				errc <- fmt.Errorf("%s: %w", name, err)
			}
		})
	}
	// Background services outlive the data plane's drain.
	run("certificates", bg, a.store.Run)
	run("discovery", bg, a.xds.Run)
	run("admin", bg, a.admin.Run)
	run("jwks", bg, a.keys.Run)
	wg.Go(func() { a.awaitSync(bg) })
	// Fetch the waypoint's own certificate now (the store issues on first
	// use); readiness waits for it.
	wg.Go(func() {
		for bg.Err() == nil {
			if _, err := a.store.Certificate(bg, a.self); err == nil {
				return
			} else if bg.Err() == nil {
				a.log.Warn("certificate not issued yet", zap.Error(err))
			}
			select {
			case <-bg.Done():
			case <-time.After(time.Second):
			}
		}
	})
	// The data plane stops on ctx.
	dp, stopDP := context.WithCancel(ctx)
	defer stopDP()
	var dpWG sync.WaitGroup
	dpWG.Go(func() {
		if err := a.tunnel.Run(dp); err != nil {
			errc <- fmt.Errorf("tunnel: %w", err)
		}
	})
	dpWG.Go(func() {
		if err := a.hserver.Serve(dp, a.lnHBONE); err != nil && !errors.Is(err, net.ErrClosed) {
			errc <- fmt.Errorf("hbone: %w", err)
		}
	})
	a.log.Info("waypoint running", zap.Stringer("identity", a.self), zap.String("hbone", a.lnHBONE.Addr().String()))
	var err error
	select {
	case <-ctx.Done():
	case err = <-errc: // returned below, after the drain
	}
	a.draining.Store(true)
	stopDP()
	dpWG.Wait()
	a.proxy.WaitMirrors()
	_ = a.stopAccess() // a failed flush of stdout has nowhere to be reported
	a.cat.Close()
	_ = a.hclient.Close()
	sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	_ = a.tracer.Shutdown(sctx)
	cancel()
	stopBG()
	wg.Wait()
	a.log.Info("waypoint stopped")
	return err
}

// bodyIdle maps the configuration's "0: none" to the proxy's (negative).
func bodyIdle(d time.Duration) time.Duration {
	if d == 0 {
		return -1
	}
	return d
}
