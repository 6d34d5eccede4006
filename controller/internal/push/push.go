// Package push keeps the discovery server in step with the cluster: it
// mirrors the informer caches, debounces changes, translates a snapshot
// (internal/translate) and publishes the resources to the xDS server, which
// sends subscribers only what changed.
package push

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
	"google.golang.org/protobuf/proto"
	toolscache "k8s.io/client-go/tools/cache"
	"sigs.k8s.io/controller-runtime/pkg/cache"

	pb "github.com/amesh-dev/amesh/api/discovery/v1"
	"github.com/amesh-dev/amesh/api/xds"
	"github.com/amesh-dev/amesh/controller/internal/translate"
)

// ScopeGateway is the Scope prefix of WaypointService and WaypointGateway
// resources: "gateway/<namespace>/<name>".
const ScopeGateway = "gateway/"

// Publisher receives resources (xds.Server): the full state of a type, or
// upserts and removals.
type Publisher interface {
	Set(typeURL string, all []*xds.Resource) error
	Update(typeURL string, upserts []*xds.Resource, removes []string) error
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
	// Used by the loop's goroutine only.
	translator *translate.Translator
	published  *published

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
		opts:       opts,
		log:        opts.Logger,
		store:      newStore(),
		kick:       make(chan struct{}, 1),
		translator: translate.NewTranslator(opts.Translate),
		published:  newPublished(),
		synced:     make(chan struct{}),
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
		// Without waiting for each to sync: they all list at once, and
		// the loop waits for every one below. (Waiting for each in turn
		// made a controller restart list fifteen kinds one after the
		// other: a second more before the first push at 10,000 pods.)
		inf, err := l.opts.Informers.GetInformer(ctx, k.obj, cache.BlockUntilSynced(false))
		if err != nil {
			return fmt.Errorf("push: watch %T: %w", k.obj, err)
		}
		reg, err := inf.AddEventHandler(l.store.handler(k.ignore, l.Trigger))
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
	// Polled more often than client-go's WaitForCacheSync (100ms): the
	// first push waits for it.
	poll := time.NewTicker(5 * time.Millisecond)
	for slices.ContainsFunc(regs, func(r toolscache.ResourceEventHandlerRegistration) bool { return !r.HasSynced() }) {
		select {
		case <-ctx.Done():
			poll.Stop()
			return nil
		case <-poll.C:
		}
	}
	poll.Stop()
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
	out := l.translator.Translate(l.store.snapshot(l.opts.Roots()))
	if err := Publish(l.opts.Publisher, l.published, out); err != nil {
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

// published remembers what was handed to the publisher, per type and
// name, so that the next publication sends only what changed: the
// translator returns the very same message for an unchanged resource.
type published struct {
	byType map[string]map[string]proto.Message
}

func newPublished() *published { return &published{byType: map[string]map[string]proto.Message{}} }

// Publish hands the resources of out to p: in full the first time, then
// only the changed (by message identity) and removed ones. The server
// versions resources by content, so a new message with unchanged content
// reaches no subscriber.
func Publish(p Publisher, prev *published, out *translate.Output) error {
	if prev == nil {
		prev = newPublished()
	}
	// Services and workloads before the policies and waypoint
	// configuration that refer to them.
	sets := []struct {
		typeURL string
		n       int
		msg     func(int) proto.Message
		name    func(int) string
		scope   func(int) string
	}{
		{pb.ServiceType, len(out.Services),
			func(i int) proto.Message { return out.Services[i] },
			func(i int) string { return out.Services[i].Namespace + "/" + out.Services[i].Hostname }, nil},
		{pb.WorkloadType, len(out.Workloads),
			func(i int) proto.Message { return out.Workloads[i] },
			func(i int) string { return out.Workloads[i].Uid }, nil},
		{pb.AuthorizationType, len(out.Authorizations),
			func(i int) proto.Message { return out.Authorizations[i] },
			func(i int) string { return out.Authorizations[i].Namespace + "/" + out.Authorizations[i].Name }, nil},
		{pb.TrustBundleType, len(out.TrustBundles),
			func(i int) proto.Message { return out.TrustBundles[i] },
			func(i int) string { return out.TrustBundles[i].TrustDomain }, nil},
		{pb.WaypointServiceType, len(out.WaypointServices),
			func(i int) proto.Message { return out.WaypointServices[i] },
			func(i int) string { return out.WaypointServices[i].Service },
			func(i int) string { return ScopeGateway + out.WaypointServices[i].Gateway }},
		// Set even when empty: the server answers a type only after its
		// first state, and waypoints wait for this one to be synced.
		{pb.WaypointGatewayType, len(out.WaypointGateways),
			func(i int) proto.Message { return out.WaypointGateways[i] },
			func(i int) string { return out.WaypointGateways[i].Gateway },
			func(i int) string { return ScopeGateway + out.WaypointGateways[i].Gateway }},
	}
	var errs []error
	for _, s := range sets {
		old, had := prev.byType[s.typeURL]
		cur := make(map[string]proto.Message, s.n)
		var rs []*xds.Resource
		for i := range s.n {
			m, name := s.msg(i), s.name(i)
			cur[name] = m
			if had && old[name] == m {
				continue
			}
			r := &xds.Resource{Name: name, Body: m}
			if s.scope != nil {
				r.Scope = s.scope(i)
			}
			rs = append(rs, r)
		}
		var err error
		if !had {
			err = p.Set(s.typeURL, rs)
		} else {
			var removes []string
			for name := range old {
				if _, ok := cur[name]; !ok {
					removes = append(removes, name)
				}
			}
			if len(rs) > 0 || len(removes) > 0 {
				err = p.Update(s.typeURL, rs, removes)
			}
		}
		if err != nil {
			// Forget this type: the next publication sends it in full.
			delete(prev.byType, s.typeURL)
			errs = append(errs, err)
			continue
		}
		prev.byType[s.typeURL] = cur
	}
	return errors.Join(errs...)
}
