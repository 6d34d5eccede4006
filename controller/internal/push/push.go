// Package push keeps the discovery server in step with the cluster: it
// mirrors the informer caches, debounces changes, translates a snapshot
// (internal/translate) and publishes the resources to the xDS server, which
// sends subscribers only what changed.
package push

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
	toolscache "k8s.io/client-go/tools/cache"
	"sigs.k8s.io/controller-runtime/pkg/cache"

	pb "github.com/amesh-dev/amesh/api/discovery/v1"
	"github.com/amesh-dev/amesh/api/xds"
	"github.com/amesh-dev/amesh/controller/internal/translate"
)

// ScopeGateway is the Scope prefix of WaypointService resources:
// "gateway/<namespace>/<name>".
const ScopeGateway = "gateway/"

// Publisher receives the full state of one resource type (xds.Server).
type Publisher interface {
	Set(typeURL string, all []*xds.Resource) error
}

// Options configures a Loop.
type Options struct {
	// Informers are the controller-runtime cache the loop watches.
	Informers cache.Informers
	// Translate configures the translator.
	Translate translate.Config
	// Roots returns the current PEM mesh roots.
	Roots func() []string
	// Publisher receives the resources.
	Publisher Publisher
	// OnOutput, if set, is called (on the loop's goroutine) with every
	// translation after it was published: leader-only writers take their
	// work from it. It must not block for long.
	OnOutput func(*translate.Output)
	// Debounce is the quiet time awaited after a change before
	// translating; default 10ms. MaxDelay bounds how long a burst of
	// changes can postpone it; default 100ms.
	Debounce time.Duration
	MaxDelay time.Duration
	Logger   *zap.Logger
	// Registerer receives the loop's metrics; nil: not registered.
	Registerer prometheus.Registerer
}

// Loop is the watch → translate → publish loop. Start it as a
// controller-runtime Runnable on every replica.
type Loop struct {
	opts  Options
	log   *zap.Logger
	store *store
	kick  chan struct{}

	mu      sync.Mutex
	pending time.Time // first unhandled change; zero when none
	synced  chan struct{}

	translations prometheus.Histogram
	delay        prometheus.Histogram
	failures     prometheus.Counter
}

// New returns a Loop; Start runs it.
func New(opts Options) *Loop {
	if opts.Debounce <= 0 {
		opts.Debounce = 10 * time.Millisecond
	}
	if opts.MaxDelay <= 0 {
		opts.MaxDelay = 100 * time.Millisecond
	}
	if opts.Logger == nil {
		opts.Logger = zap.NewNop()
	}
	if opts.Roots == nil {
		opts.Roots = func() []string { return nil }
	}
	l := &Loop{
		opts:   opts,
		log:    opts.Logger,
		store:  newStore(),
		kick:   make(chan struct{}, 1),
		synced: make(chan struct{}),
		translations: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "amesh_controller_translation_duration_seconds",
			Help:    "Time to translate a snapshot and hand it to the discovery server.",
			Buckets: prometheus.ExponentialBuckets(0.001, 2, 14),
		}),
		delay: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "amesh_controller_change_to_publish_seconds",
			Help:    "Time from the first unhandled cluster change to its publication to the discovery server.",
			Buckets: prometheus.ExponentialBuckets(0.001, 2, 14),
		}),
		failures: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "amesh_controller_publish_failures_total",
			Help: "Translations the discovery server refused.",
		}),
	}
	if opts.Registerer != nil {
		for _, c := range []prometheus.Collector{l.translations, l.delay, l.failures} {
			if err := opts.Registerer.Register(c); err != nil {
				l.log.Warn("metric not registered", zap.Error(err))
			}
		}
	}
	return l
}

// NeedLeaderElection: every replica translates and serves.
func (l *Loop) NeedLeaderElection() bool { return false }

// Synced is closed once the first complete snapshot was published.
func (l *Loop) Synced() <-chan struct{} { return l.synced }

// Trigger asks for a new translation (for changes the loop does not watch,
// such as new mesh roots).
func (l *Loop) Trigger() {
	l.mu.Lock()
	if l.pending.IsZero() {
		l.pending = time.Now()
	}
	l.mu.Unlock()
	select {
	case l.kick <- struct{}{}:
	default:
	}
}

// Start registers the watches, waits until every informer delivered its
// initial list, publishes, and then follows changes until ctx ends.
func (l *Loop) Start(ctx context.Context) error {
	var regs []toolscache.ResourceEventHandlerRegistration
	for _, k := range kinds() {
		inf, err := l.opts.Informers.GetInformer(ctx, k.obj)
		if err != nil {
			return fmt.Errorf("push: watch %T: %w", k.obj, err)
		}
		reg, err := inf.AddEventHandler(l.store.handler(k.generational, l.Trigger))
		if err != nil {
			return fmt.Errorf("push: watch %T: %w", k.obj, err)
		}
		defer func() {
			if err := inf.RemoveEventHandler(reg); err != nil {
				l.log.Debug("remove event handler", zap.Error(err))
			}
		}()
		regs = append(regs, reg)
	}
	synced := make([]toolscache.InformerSynced, len(regs))
	for i, r := range regs {
		synced[i] = r.HasSynced
	}
	if !toolscache.WaitForCacheSync(ctx.Done(), synced...) {
		if ctx.Err() != nil {
			return nil
		}
		return errors.New("push: informers did not sync")
	}
	l.Trigger()

	timer := time.NewTimer(time.Hour)
	timer.Stop()
	armed := false
	first := true
	for {
		select {
		case <-ctx.Done():
			timer.Stop()
			return nil
		case <-l.kick:
			l.mu.Lock()
			since := time.Since(l.pending)
			l.mu.Unlock()
			wait := min(l.opts.Debounce, max(l.opts.MaxDelay-since, 0))
			if armed && !timer.Stop() {
				<-timer.C
			}
			timer.Reset(wait)
			armed = true
		case <-timer.C:
			armed = false
			if l.publish() && first {
				first = false
				close(l.synced)
			}
		}
	}
}

// publish translates the current snapshot and hands it to the publisher;
// it reports success.
func (l *Loop) publish() bool {
	l.mu.Lock()
	since := l.pending
	l.pending = time.Time{}
	l.mu.Unlock()

	start := time.Now()
	out := translate.Translate(l.opts.Translate, l.store.snapshot(l.opts.Roots()))
	if err := Publish(l.opts.Publisher, out); err != nil {
		l.failures.Inc()
		l.log.Error("publish discovery resources", zap.Error(err))
		return false
	}
	l.translations.Observe(time.Since(start).Seconds())
	if !since.IsZero() {
		l.delay.Observe(time.Since(since).Seconds())
	}
	l.log.Debug("published",
		zap.Int("workloads", len(out.Workloads)),
		zap.Int("services", len(out.Services)),
		zap.Int("authorizations", len(out.Authorizations)),
		zap.Int("waypointServices", len(out.WaypointServices)),
		zap.Duration("took", time.Since(start)))
	if l.opts.OnOutput != nil {
		l.opts.OnOutput(out)
	}
	return true
}

// Publish hands every resource type of out to p.
func Publish(p Publisher, out *translate.Output) error {
	resources := func(n int, name func(int) string, body func(int) *xds.Resource) []*xds.Resource {
		rs := make([]*xds.Resource, n)
		for i := range n {
			rs[i] = body(i)
			rs[i].Name = name(i)
		}
		return rs
	}
	sets := []struct {
		typeURL string
		rs      []*xds.Resource
	}{
		{pb.WorkloadType, resources(len(out.Workloads), func(i int) string { return out.Workloads[i].Uid },
			func(i int) *xds.Resource { return &xds.Resource{Body: out.Workloads[i]} })},
		{pb.ServiceType, resources(len(out.Services), func(i int) string {
			return out.Services[i].Namespace + "/" + out.Services[i].Hostname
		}, func(i int) *xds.Resource { return &xds.Resource{Body: out.Services[i]} })},
		{pb.AuthorizationType, resources(len(out.Authorizations), func(i int) string {
			return out.Authorizations[i].Namespace + "/" + out.Authorizations[i].Name
		}, func(i int) *xds.Resource { return &xds.Resource{Body: out.Authorizations[i]} })},
		{pb.TrustBundleType, resources(len(out.TrustBundles), func(i int) string { return out.TrustBundles[i].TrustDomain },
			func(i int) *xds.Resource { return &xds.Resource{Body: out.TrustBundles[i]} })},
		{pb.WaypointServiceType, resources(len(out.WaypointServices), func(i int) string { return out.WaypointServices[i].Service },
			func(i int) *xds.Resource {
				return &xds.Resource{Body: out.WaypointServices[i], Scope: ScopeGateway + out.WaypointServices[i].Gateway}
			})},
	}
	// Services and workloads before the policies and waypoint
	// configuration that refer to them.
	var errs []error
	for _, s := range sets {
		if err := p.Set(s.typeURL, s.rs); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}
