package app

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"maps"
	"net"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/go-logr/zapr"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/status"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/selection"
	"k8s.io/client-go/kubernetes"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/rest"
	toolscache "k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/events"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/cache"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/manager"
	crmetrics "sigs.k8s.io/controller-runtime/pkg/metrics"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"
	gwv1beta1 "sigs.k8s.io/gateway-api/apis/v1beta1"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"

	"github.com/amesh-dev/amesh/api/ca"
	"github.com/amesh-dev/amesh/api/xds"
	securityv1alpha1 "github.com/amesh-dev/amesh/controller/apis/security/v1alpha1"
	trafficv1alpha1 "github.com/amesh-dev/amesh/controller/apis/traffic/v1alpha1"
	"github.com/amesh-dev/amesh/controller/internal/auth"
	"github.com/amesh-dev/amesh/controller/internal/casecret"
	"github.com/amesh-dev/amesh/controller/internal/deployer"
	"github.com/amesh-dev/amesh/controller/internal/label"
	"github.com/amesh-dev/amesh/controller/internal/push"
	"github.com/amesh-dev/amesh/controller/internal/rootcert"
	policystatus "github.com/amesh-dev/amesh/controller/internal/status"
	"github.com/amesh-dev/amesh/controller/internal/translate"
)

// App is one amesh-controller process.
type App struct {
	cfg  Config
	rest *rest.Config
	log  *zap.Logger

	ready    chan struct{}
	grpcAddr atomic.Pointer[string]
	httpAddr atomic.Pointer[string]
}

// New checks cfg and returns an App; Run starts it.
func New(cfg Config, restCfg *rest.Config, log *zap.Logger) (*App, error) {
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("app: invalid configuration: %w", err)
	}
	if restCfg == nil {
		return nil, errors.New("app: no Kubernetes client configuration")
	}
	return &App{cfg: cfg, rest: restCfg, log: log, ready: make(chan struct{})}, nil
}

// Ready is closed once the servers listen and the first full snapshot is
// published.
func (a *App) Ready() <-chan struct{} { return a.ready }

// GRPCAddr and HTTPAddr are the listening addresses ("" before Ready).
func (a *App) GRPCAddr() string { return deref(a.grpcAddr.Load()) }

// HTTPAddr is the metrics and health address.
func (a *App) HTTPAddr() string { return deref(a.httpAddr.Load()) }

func deref(p *string) string {
	if p == nil {
		return ""
	}
	return *p
}

// Scheme returns the types the controller reads and writes.
func Scheme() (*runtime.Scheme, error) {
	s := runtime.NewScheme()
	for _, add := range []func(*runtime.Scheme) error{
		clientgoscheme.AddToScheme, gwv1.Install, gwv1beta1.Install, securityv1alpha1.AddToScheme, trafficv1alpha1.AddToScheme,
	} {
		if err := add(s); err != nil {
			return nil, err
		}
	}
	return s, nil
}

// Run runs the controller until ctx ends, then stops gracefully. It returns
// after every goroutine it started has exited.
func (a *App) Run(ctx context.Context) error {
	cfg := a.cfg
	td := spiffeid.RequireTrustDomainFromString(cfg.TrustDomain)
	scheme, err := Scheme()
	if err != nil {
		return fmt.Errorf("app: scheme: %w", err)
	}

	// The CA comes first: every replica needs it to serve, and creating
	// the Secret when it is absent is race-free (one Create wins).
	direct, err := client.New(a.rest, client.Options{Scheme: scheme})
	if err != nil {
		return fmt.Errorf("app: client: %w", err)
	}
	caOpts := casecret.Options{
		Namespace: cfg.Namespace, Name: cfg.CASecret, TrustDomain: td, RootTTL: cfg.RootTTL,
		CAOptions: []ca.Option{ca.WithMaxTTL(cfg.CertTTL)},
	}
	authority, created, err := casecret.Ensure(ctx, direct, caOpts)
	if err != nil {
		return fmt.Errorf("app: certificate authority: %w", err)
	}
	if created {
		a.log.Info("generated a new mesh root", zap.String("secret", cfg.Namespace+"/"+cfg.CASecret),
			zap.Time("notAfter", authority.Certificate().NotAfter))
	}
	keys := &keyring{}
	keys.set(authority)

	// Go and process collectors are in controller-runtime's registry, served
	// alongside this one.
	reg := prometheus.NewRegistry()
	m := newMetrics(reg)

	shutdown := cfg.ShutdownTimeout
	byObject := map[client.Object]cache.ByObject{
		&corev1.Secret{}: {
			Namespaces: map[string]cache.Config{cfg.Namespace: {}},
			Field:      fields.OneTermEqualSelector("metadata.name", cfg.CASecret),
		},
		// Only the root certificate ConfigMaps (at most one a
		// namespace), watched so that the leader repairs them at once
		// when edited or deleted. By name rather than by the
		// controller's label: a copy whose label was removed is seen
		// too, and the operator's own (which the controller keeps
		// current in the namespaces that need it) as well.
		&corev1.ConfigMap{}: {Field: fields.OneTermEqualSelector("metadata.name", cfg.RootCertConfigMap)},
	}
	// Only the Deployments and ServiceAccounts the deployer makes, and
	// the ReplicaSets of waypoints (the translator and the authorizer
	// check that a waypoint pod is its Gateway's).
	maps.Copy(byObject, deployer.CacheByObject())
	waypointRS, err := labels.NewRequirement(label.GatewayName, selection.Exists, nil)
	if err != nil {
		return fmt.Errorf("app: %w", err)
	}
	byObject[&appsv1.ReplicaSet{}] = cache.ByObject{Label: labels.NewSelector().Add(*waypointRS)}
	// Pods are most of the cache: it keeps of each only what the
	// translator and the authorizer read (translate.TrimPod, which drops
	// the managed fields too).
	byObject[&corev1.Pod{}] = cache.ByObject{Transform: func(o any) (any, error) {
		if p, ok := o.(*corev1.Pod); ok {
			return translate.TrimPod(p), nil
		}
		return o, nil
	}}
	mgr, err := ctrl.NewManager(a.rest, manager.Options{
		Scheme:                        scheme,
		Logger:                        zapr.NewLogger(a.log.Named("manager")),
		Metrics:                       metricsserver.Options{BindAddress: "0"},
		HealthProbeBindAddress:        "0",
		LeaderElection:                cfg.LeaderElection,
		LeaderElectionID:              cfg.LeaderElectionID,
		LeaderElectionNamespace:       cfg.Namespace,
		LeaderElectionReleaseOnCancel: true,
		GracefulShutdownTimeout:       &shutdown,
		Cache: cache.Options{
			DefaultTransform: cache.TransformStripManagedFields(),
			ByObject:         byObject,
		},
	})
	if err != nil {
		return fmt.Errorf("app: manager: %w", err)
	}
	if err := auth.IndexPods(ctx, mgr.GetFieldIndexer()); err != nil {
		return fmt.Errorf("app: index pods: %w", err)
	}
	if cfg.DeployWaypoints {
		// Its controllers run on the elected leader only.
		if err := deployer.Setup(mgr, cfg.waypointOptions(), a.log.Named("deployer")); err != nil {
			return fmt.Errorf("app: %w", err)
		}
	}

	kc, err := kubernetes.NewForConfig(a.rest)
	if err != nil {
		return fmt.Errorf("app: clientset: %w", err)
	}
	reviewer := auth.NewReviewer(kc.AuthenticationV1().TokenReviews(), auth.ReviewerOptions{
		Audience: cfg.TokenAudience, TTL: cfg.TokenCacheTTL,
	})
	m.watchReviewer(reg, reviewer)
	authz := auth.NewAuthorizer(reviewer, mgr.GetCache(), mgr.GetAPIReader(), auth.AuthorizerOptions{
		TrustDomain:           td,
		ZtunnelNamespace:      cfg.Namespace,
		ZtunnelServiceAccount: cfg.ZtunnelServiceAccount,
		WaypointClass:         cfg.WaypointClass,
		WaypointController:    label.WaypointController,
	})
	caLog := a.log.Named("ca")
	caServer := ca.NewServer(authority, authz, ca.ServerOptions{
		Logger: caLog,
		OnRefusal: func(_ context.Context, _ string, err error) {
			m.refused.WithLabelValues(status.Code(err).String()).Inc()
		},
		OnIssued: func(context.Context, spiffeid.ID) { m.issued.Inc() },
	})
	xdsLog := a.log.Named("xds")
	xdsServer := xds.NewServer(xds.ServerOptions{
		Authenticate: func(ctx context.Context, node *corev3.Node) (xds.Subscriber, error) {
			role, err := authz.Identify(ctx)
			if err != nil {
				m.xdsRefused.WithLabelValues(status.Code(err).String()).Inc()
				xdsLog.Warn("discovery client refused", zap.String("node", node.GetId()), zap.Error(err))
				return nil, err
			}
			xdsLog.Info("discovery client connected", zap.String("subscriber", role.ID()))
			return push.NewSubscriber(role.ID(), role.Gateway), nil
		},
		Logger:     xdsLog,
		Registerer: reg,
	})

	w := &writers{
		status:       policystatus.NewWriter(mgr.GetClient()),
		events:       mgr.GetEventRecorder("amesh-controller"),
		reported:     map[string]string{},
		roots:        rootcert.NewPublisher(mgr.GetClient(), cfg.RootCertConfigMap),
		keys:         keys,
		log:          a.log.Named("writer"),
		notify:       make(chan struct{}, 1),
		informers:    mgr.GetCache(),
		rootCertName: cfg.RootCertConfigMap,
		rootsNotify:  make(chan struct{}, 1),
	}
	loop := push.New(push.Options{
		Informers: mgr.GetCache(),
		Translate: translate.Config{
			TrustDomain:        cfg.TrustDomain,
			ClusterDomain:      cfg.ClusterDomain,
			RootNamespace:      cfg.Namespace,
			ClusterID:          cfg.ClusterID,
			WaypointClass:      cfg.WaypointClass,
			WaypointController: label.WaypointController,
		},
		Roots:      keys.rootsList,
		Publisher:  xdsServer,
		OnOutput:   w.offer,
		Debounce:   cfg.Debounce,
		MaxDelay:   cfg.MaxDebounce,
		Logger:     a.log.Named("push"),
		Registerer: reg,
	})

	serving := &servingCert{keys: keys, dnsNames: cfg.dnsNames(), ttl: cfg.ServingCertTTL, log: a.log.Named("serving")}
	if err := serving.renew(); err != nil {
		return fmt.Errorf("app: serving certificate: %w", err)
	}
	grpcSrv := grpc.NewServer(
		grpc.Creds(credentials.NewTLS(&tls.Config{
			MinVersion:     tls.VersionTLS12,
			GetCertificate: serving.get,
		})),
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: 5 * time.Second, PermitWithoutStream: true}),
		grpc.KeepaliveParams(keepalive.ServerParameters{Time: 30 * time.Second, Timeout: 10 * time.Second}),
		// Discovery responses are written from the resources' shared
		// encodings; other messages use the standard codec.
		xds.Codec(),
	)
	xdsServer.Register(grpcSrv)
	caServer.Register(grpcSrv)

	grpcListening := make(chan struct{})
	httpListening := make(chan struct{})
	runnables := []manager.Runnable{
		loop,
		&grpcRunnable{addr: cfg.GRPCAddr, srv: grpcSrv, timeout: cfg.ShutdownTimeout, bound: &a.grpcAddr, listening: grpcListening, log: a.log},
		&httpRunnable{addr: cfg.MetricsAddr, handler: a.httpHandler(reg, loop.Synced(), grpcListening), timeout: cfg.ShutdownTimeout, bound: &a.httpAddr, listening: httpListening},
		serving,
		&caWatcher{informers: mgr.GetCache(), name: cfg.CASecret, opts: caOpts, keys: keys, onChange: func(na *ca.Authority) {
			caServer.SetAuthority(na)
			if err := serving.renew(); err != nil {
				a.log.Error("renew serving certificate after CA change", zap.Error(err))
			}
			loop.Trigger()
			w.kick()
		}, log: a.log.Named("ca")},
		w,
	}
	for _, r := range runnables {
		if err := mgr.Add(r); err != nil {
			return fmt.Errorf("app: add runnable: %w", err)
		}
	}
	runCtx, cancel := context.WithCancel(ctx)
	defer cancel()
	var readyWG sync.WaitGroup
	readyWG.Go(func() {
		for _, c := range []<-chan struct{}{grpcListening, httpListening, loop.Synced()} {
			select {
			case <-c:
			case <-runCtx.Done():
				return
			}
		}
		close(a.ready)
		a.log.Info("ready", zap.String("grpc", a.GRPCAddr()), zap.String("metrics", a.HTTPAddr()))
	})
	err = mgr.Start(runCtx)
	cancel()
	readyWG.Wait()
	if err != nil {
		return fmt.Errorf("app: %w", err)
	}
	return nil
}

func (a *App) httpHandler(reg *prometheus.Registry, synced, grpcUp <-chan struct{}) http.Handler {
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(prometheus.Gatherers{reg, crmetrics.Registry}, promhttp.HandlerOpts{}))
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) { fmt.Fprintln(w, "ok") })
	mux.HandleFunc("/readyz", func(w http.ResponseWriter, _ *http.Request) {
		for _, c := range []struct {
			what string
			done <-chan struct{}
		}{{"grpc not listening", grpcUp}, {"discovery not synced", synced}} {
			select {
			case <-c.done:
			default:
				http.Error(w, c.what, http.StatusServiceUnavailable)
				return
			}
		}
		fmt.Fprintln(w, "ok")
	})
	return mux
}

// keyring holds the current authority and its roots.
type keyring struct {
	mu        sync.RWMutex
	authority *ca.Authority
	roots     []string // one PEM certificate each
}

func (k *keyring) set(a *ca.Authority) {
	var roots []string
	for _, r := range a.Roots() {
		roots = append(roots, string(ca.EncodeCertsPEM([]*x509.Certificate{r})))
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	k.authority, k.roots = a, roots
}

func (k *keyring) get() *ca.Authority {
	k.mu.RLock()
	defer k.mu.RUnlock()
	return k.authority
}

// rootsList is the roots, one PEM certificate per entry.
func (k *keyring) rootsList() []string {
	k.mu.RLock()
	defer k.mu.RUnlock()
	return k.roots
}

// rootsPEM is the roots concatenated.
func (k *keyring) rootsPEM() string { return strings.Join(k.rootsList(), "") }

// servingCert is the controller's TLS certificate, issued by the mesh CA
// and renewed at half-life (and when the CA changes).
type servingCert struct {
	keys     *keyring
	dnsNames []string
	ttl      time.Duration
	log      *zap.Logger
	cur      atomic.Pointer[tls.Certificate]
}

func (s *servingCert) renew() error {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	chain, err := s.keys.get().SignServer(key.Public(), s.dnsNames, s.ttl)
	if err != nil {
		return err
	}
	c := &tls.Certificate{PrivateKey: key, Leaf: chain[0]}
	for _, x := range chain {
		c.Certificate = append(c.Certificate, x.Raw)
	}
	s.cur.Store(c)
	return nil
}

func (s *servingCert) get(*tls.ClientHelloInfo) (*tls.Certificate, error) { return s.cur.Load(), nil }

// Start renews the certificate at half-life until ctx ends.
func (s *servingCert) Start(ctx context.Context) error {
	for {
		leaf := s.cur.Load().Leaf
		next := time.Until(leaf.NotBefore.Add(leaf.NotAfter.Sub(leaf.NotBefore) / 2))
		t := time.NewTimer(max(next, time.Second))
		select {
		case <-ctx.Done():
			t.Stop()
			return nil
		case <-t.C:
		}
		if err := s.renew(); err != nil {
			s.log.Error("renew serving certificate", zap.Error(err))
		}
	}
}

// NeedLeaderElection: every replica serves.
func (s *servingCert) NeedLeaderElection() bool { return false }

// grpcRunnable serves gRPC until ctx ends, then stops gracefully within
// timeout (discovery streams never end by themselves: they are cut).
type grpcRunnable struct {
	addr      string
	srv       *grpc.Server
	timeout   time.Duration
	bound     *atomic.Pointer[string]
	listening chan struct{}
	log       *zap.Logger
}

func (g *grpcRunnable) NeedLeaderElection() bool { return false }

func (g *grpcRunnable) Start(ctx context.Context) error {
	lis, err := net.Listen("tcp", g.addr)
	if err != nil {
		return fmt.Errorf("grpc: %w", err)
	}
	addr := lis.Addr().String()
	g.bound.Store(&addr)
	close(g.listening)
	errc := make(chan error, 1)
	go func() { errc <- g.srv.Serve(lis) }()
	select {
	case err := <-errc:
		return fmt.Errorf("grpc: %w", err)
	case <-ctx.Done():
	}
	done := make(chan struct{})
	go func() {
		g.srv.GracefulStop()
		close(done)
	}()
	t := time.NewTimer(g.timeout)
	defer t.Stop()
	select {
	case <-done:
	case <-t.C:
		g.srv.Stop()
		<-done
	}
	<-errc
	return nil
}

// httpRunnable serves metrics and health.
type httpRunnable struct {
	addr      string
	handler   http.Handler
	timeout   time.Duration
	bound     *atomic.Pointer[string]
	listening chan struct{}
}

func (h *httpRunnable) NeedLeaderElection() bool { return false }

func (h *httpRunnable) Start(ctx context.Context) error {
	lis, err := net.Listen("tcp", h.addr)
	if err != nil {
		return fmt.Errorf("http: %w", err)
	}
	addr := lis.Addr().String()
	h.bound.Store(&addr)
	close(h.listening)
	srv := &http.Server{Handler: h.handler, ReadHeaderTimeout: 10 * time.Second}
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(lis) }()
	select {
	case err := <-errc:
		return fmt.Errorf("http: %w", err)
	case <-ctx.Done():
	}
	sctx, cancel := context.WithTimeout(context.Background(), h.timeout)
	defer cancel()
	err = srv.Shutdown(sctx)
	<-errc
	if err != nil {
		return fmt.Errorf("http: shutdown: %w", err)
	}
	return nil
}

// caWatcher reloads the authority when the CA Secret changes (operator
// rotation).
type caWatcher struct {
	informers cache.Informers
	name      string
	opts      casecret.Options
	keys      *keyring
	onChange  func(*ca.Authority)
	log       *zap.Logger
}

func (c *caWatcher) NeedLeaderElection() bool { return false }

func (c *caWatcher) Start(ctx context.Context) error {
	inf, err := c.informers.GetInformer(ctx, &corev1.Secret{})
	if err != nil {
		return fmt.Errorf("ca watch: %w", err)
	}
	changes := make(chan *corev1.Secret, 1)
	offer := func(obj any) {
		s, ok := obj.(*corev1.Secret)
		if !ok || s.Name != c.name || s.Namespace != c.opts.Namespace {
			return
		}
		select {
		case <-changes:
		default:
		}
		changes <- s
	}
	reg, err := inf.AddEventHandler(toolscache.ResourceEventHandlerFuncs{
		AddFunc:    offer,
		UpdateFunc: func(_, n any) { offer(n) },
		DeleteFunc: func(any) {
			c.log.Warn("CA secret deleted; the controller keeps using its current authority",
				zap.String("secret", c.opts.Namespace+"/"+c.name))
		},
	})
	if err != nil {
		return fmt.Errorf("ca watch: %w", err)
	}
	defer func() { _ = inf.RemoveEventHandler(reg) }()
	for {
		select {
		case <-ctx.Done():
			return nil
		case s := <-changes:
			na, err := casecret.Load(s, c.opts)
			if err != nil {
				c.log.Error("CA secret changed but cannot be used; keeping the current authority", zap.Error(err))
				continue
			}
			cur := c.keys.get()
			// A change of the published roots alone (a rotation's
			// first and last steps) is a change too.
			if bytes.Equal(na.CertPEM(), cur.CertPEM()) && bytes.Equal(na.RootsPEM(), cur.RootsPEM()) {
				continue
			}
			c.keys.set(na)
			c.log.Info("mesh CA changed", zap.Time("notAfter", na.Certificate().NotAfter), zap.Int("roots", len(na.Roots())),
				zap.Bool("signingChanged", !bytes.Equal(na.CertPEM(), cur.CertPEM())))
			c.onChange(na)
		}
	}
}

// writers are the leader-only writers: policy and route status and root
// ConfigMaps, fed with the latest translation.
type writers struct {
	status *policystatus.Writer
	events events.EventRecorder
	// reported maps the binding problems already reported as events
	// ("<kind>/<ns>/<name>/<uid>") to their message.
	reported map[string]string
	roots    *rootcert.Publisher
	keys     *keyring
	log      *zap.Logger
	notify   chan struct{}
	// informers and rootCertName: the root ConfigMaps are watched (the
	// cache holds only ConfigMaps of that name), and any change to one —
	// an edit, a deletion — makes the writer check them all at once
	// (rootsNotify), rather than after the next unrelated change.
	informers    cache.Informers
	rootCertName string
	rootsNotify  chan struct{}

	mu     sync.Mutex
	latest *translate.Output
}

func (w *writers) NeedLeaderElection() bool { return true }

func (w *writers) offer(out *translate.Output) {
	w.mu.Lock()
	w.latest = out
	w.mu.Unlock()
	w.kick()
}

func (w *writers) kick() {
	select {
	case w.notify <- struct{}{}:
	default:
	}
}

// watchRoots kicks rootsNotify whenever a root certificate ConfigMap is
// added, changed or deleted; the returned function stops it.
func (w *writers) watchRoots(ctx context.Context) (func(), error) {
	inf, err := w.informers.GetInformer(ctx, &corev1.ConfigMap{})
	if err != nil {
		return nil, fmt.Errorf("writer: watch ConfigMaps: %w", err)
	}
	kick := func(obj any) {
		if d, ok := obj.(toolscache.DeletedFinalStateUnknown); ok {
			obj = d.Obj
		}
		if cm, ok := obj.(*corev1.ConfigMap); ok && cm.Name == w.rootCertName {
			select {
			case w.rootsNotify <- struct{}{}:
			default:
			}
		}
	}
	reg, err := inf.AddEventHandler(toolscache.ResourceEventHandlerFuncs{
		AddFunc:    kick,
		UpdateFunc: func(_, n any) { kick(n) },
		DeleteFunc: kick,
	})
	if err != nil {
		return nil, fmt.Errorf("writer: watch ConfigMaps: %w", err)
	}
	return func() { _ = inf.RemoveEventHandler(reg) }, nil
}

func (w *writers) Start(ctx context.Context) error {
	w.log.Info("leading: writing policy status and root certificate ConfigMaps")
	stop, err := w.watchRoots(ctx)
	if err != nil {
		return err
	}
	defer stop()
	retry := time.NewTimer(time.Hour)
	retry.Stop()
	defer retry.Stop()
	for {
		rootsOnly := false
		select {
		case <-ctx.Done():
			return nil
		case <-w.notify:
		case <-w.rootsNotify:
			rootsOnly = true
		case <-retry.C:
		}
		w.mu.Lock()
		out := w.latest
		w.mu.Unlock()
		if out == nil {
			continue
		}
		if rootsOnly {
			// A root ConfigMap changed (our own writes included: they
			// find nothing left to do).
			if n, r, err := w.roots.Sync(ctx, out.RootCertNamespaces, w.keys.rootsPEM()); err != nil && ctx.Err() == nil {
				w.log.Warn("root certificate ConfigMaps: repair failed; retrying", zap.Error(err))
				retry.Reset(2 * time.Second)
			} else if n > 0 || r > 0 {
				w.log.Info("root certificate ConfigMaps repaired", zap.Int("namespaces", n), zap.Int("removed", r))
			}
			continue
		}
		var errs []error
		if n, err := w.status.Write(ctx, out.Statuses); err != nil {
			errs = append(errs, err)
		} else if n > 0 {
			w.log.Debug("policy status written", zap.Int("objects", n))
		}
		if n, err := w.status.WriteRoutes(ctx, label.WaypointController, out.RouteStatuses); err != nil {
			errs = append(errs, err)
		} else if n > 0 {
			w.log.Debug("route status written", zap.Int("objects", n))
		}
		if n, err := w.status.WriteServices(ctx, fieldOwner, out.ServiceStatuses); err != nil {
			errs = append(errs, err)
		} else if n > 0 {
			w.log.Debug("service waypoint binding status written", zap.Int("objects", n))
		}
		w.report(out.BindingProblems)
		if n, r, err := w.roots.Sync(ctx, out.RootCertNamespaces, w.keys.rootsPEM()); err != nil {
			errs = append(errs, err)
		} else if n > 0 || r > 0 {
			w.log.Info("root certificate ConfigMaps written", zap.Int("namespaces", n), zap.Int("removed", r))
		}
		if err := errors.Join(errs...); err != nil && ctx.Err() == nil {
			w.log.Warn("writes failed; retrying", zap.Error(err))
			retry.Reset(2 * time.Second)
		}
	}
}

// fieldOwner is the server-side apply field manager of the controller's
// status writes.
const fieldOwner = "amesh-controller"

// report emits a Warning event for each binding problem of a pod or
// namespace not reported yet (or whose message changed).
func (w *writers) report(problems []translate.BindingProblem) {
	seen := make(map[string]bool, len(problems))
	for _, p := range problems {
		key := p.Kind + "/" + p.Namespace + "/" + p.Name + "/" + string(p.UID)
		seen[key] = true
		if msg, ok := w.reported[key]; ok && msg == p.Message {
			continue
		}
		meta := metav1.ObjectMeta{Name: p.Name, Namespace: p.Namespace, UID: p.UID}
		var obj runtime.Object
		switch p.Kind {
		case "Pod":
			obj = &corev1.Pod{TypeMeta: metav1.TypeMeta{APIVersion: "v1", Kind: "Pod"}, ObjectMeta: meta}
		case "Namespace":
			obj = &corev1.Namespace{TypeMeta: metav1.TypeMeta{APIVersion: "v1", Kind: "Namespace"}, ObjectMeta: meta}
		default:
			continue
		}
		w.reported[key] = p.Message
		w.events.Eventf(obj, nil, corev1.EventTypeWarning, p.Reason, "BindWaypoint", "%s", p.Message)
		w.log.Info("waypoint binding problem", zap.String("kind", p.Kind), zap.String("namespace", p.Namespace),
			zap.String("name", p.Name), zap.String("reason", p.Reason), zap.String("message", p.Message))
	}
	for k := range w.reported {
		if !seen[k] {
			delete(w.reported, k)
		}
	}
}

// metrics of the controller beyond those of the xDS server and the loop.
type metrics struct {
	issued     prometheus.Counter
	refused    *prometheus.CounterVec
	xdsRefused *prometheus.CounterVec
}

func newMetrics(reg prometheus.Registerer) *metrics {
	m := &metrics{
		issued: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "amesh_ca_certificates_issued_total", Help: "Workload certificates signed.",
		}),
		refused: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "amesh_ca_certificates_refused_total", Help: "Certificate requests refused, by gRPC status code.",
		}, []string{"code"}),
		xdsRefused: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "amesh_xds_clients_refused_total", Help: "Discovery streams refused at authentication, by gRPC status code.",
		}, []string{"code"}),
	}
	reg.MustRegister(m.issued, m.refused, m.xdsRefused)
	return m
}

func (m *metrics) watchReviewer(reg prometheus.Registerer, r *auth.Reviewer) {
	reg.MustRegister(
		prometheus.NewCounterFunc(prometheus.CounterOpts{
			Name: "amesh_token_review_cache_hits_total", Help: "Token reviews answered from the cache.",
		}, func() float64 { h, _ := r.Stats(); return float64(h) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{
			Name: "amesh_token_review_cache_misses_total", Help: "Token reviews sent to the apiserver.",
		}, func() float64 { _, mi := r.Stats(); return float64(mi) }),
	)
}
