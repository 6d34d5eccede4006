package identity

import (
	"cmp"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"go.uber.org/zap"
)

// Issuer obtains a certificate chain (leaf first) for an identity from a CA;
// the CA client implements it.
type Issuer interface {
	Issue(ctx context.Context, id spiffeid.ID, csrPEM []byte, ttl time.Duration) (chain []*x509.Certificate, err error)
}

// ErrStoreStopped is returned by Certificate once the store's Run has returned.
var ErrStoreStopped = errors.New("certificate store stopped")

// StoreOptions tune a Store; zero values take the defaults.
type StoreOptions struct {
	TTL            time.Duration // requested certificate lifetime; default 24h
	InitialBackoff time.Duration // first retry delay after a failed issue; default 1s
	MaxBackoff     time.Duration // retry delay cap; default 1m
	IssueTimeout   time.Duration // bound on one Issue call; default 30s
	Logger         *zap.Logger   // default: no logging
}

func (o StoreOptions) withDefaults() StoreOptions {
	o.TTL = cmp.Or(o.TTL, 24*time.Hour)
	o.InitialBackoff = cmp.Or(o.InitialBackoff, time.Second)
	o.MaxBackoff = max(cmp.Or(o.MaxBackoff, time.Minute), o.InitialBackoff)
	o.IssueTimeout = cmp.Or(o.IssueTimeout, 30*time.Second)
	if o.Logger == nil {
		o.Logger = zap.NewNop()
	}
	return o
}

// CertInfo describes one identity's certificate for admin dumps.
type CertInfo struct {
	ID     spiffeid.ID `json:"identity"`
	State  string      `json:"state"` // "pending", "valid", "expired"
	Serial string      `json:"serialNumber,omitempty"`
	// AuthorityKeyID (hex) names the CA that signed the certificate — its
	// subject key identifier: which root a certificate is under during a
	// root rotation.
	AuthorityKeyID string              `json:"authorityKeyId,omitempty"`
	NotBefore      time.Time           `json:"validFrom,omitzero"`
	NotAfter       time.Time           `json:"expirationTime,omitzero"`
	RefreshAt      time.Time           `json:"nextRefresh,omitzero"` // next issue attempt
	Failures       int                 `json:"failures,omitempty"`   // consecutive failed attempts
	LastError      string              `json:"lastError,omitempty"`
	Chain          []*x509.Certificate `json:"-"` // current chain, leaf first
	// Previous is the replaced certificate's chain while it is still valid
	// (connections established with it keep working until it expires).
	Previous []*x509.Certificate `json:"-"`
}

// Store holds one certificate per identity, fetched from the Issuer on first
// use and shared by all users of that identity, refreshed at half-life with
// jittered exponential backoff on failure; while refreshing fails the current
// certificate keeps being served until it expires. Issuing happens in Run's
// goroutines, so Certificate needs Run to be running. Safe for concurrent use.
type Store struct {
	issuer Issuer
	opts   StoreOptions

	mu      sync.Mutex
	entries map[spiffeid.ID]*entry
	state   int // 0 not started, 1 running, 2 stopped
	started chan struct{}
	kick    chan struct{}
}

const (
	storeNew = iota
	storeRunning
	storeStopped
)

type entry struct {
	id       spiffeid.ID
	cert     *tls.Certificate // newest certificate, nil until the first issue
	prev     *tls.Certificate // the one cert replaced, until it expires
	fetching bool
	changed  chan struct{} // closed and replaced whenever a fetch ends
	err      error         // error of the last attempt, nil after a success
	failures int
	next     time.Time // next attempt; zero = as soon as possible
	released bool
}

// NewStore returns a store that obtains certificates from issuer.
func NewStore(issuer Issuer, opts StoreOptions) *Store {
	return &Store{
		issuer:  issuer,
		opts:    opts.withDefaults(),
		entries: make(map[spiffeid.ID]*entry),
		started: make(chan struct{}),
		kick:    make(chan struct{}, 1),
	}
}

// Run issues and refreshes certificates until ctx ends, then waits for its
// in-flight issue calls and returns nil. It may be called once.
func (s *Store) Run(ctx context.Context) error {
	s.mu.Lock()
	if s.state != storeNew {
		s.mu.Unlock()
		return errors.New("certificate store: Run called twice")
	}
	s.state = storeRunning
	close(s.started)
	s.mu.Unlock()

	var wg sync.WaitGroup
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	for {
		s.mu.Lock()
		now := time.Now()
		wait := time.Hour
		for _, e := range s.entries {
			if e.fetching {
				continue
			}
			if d := e.next.Sub(now); d > 0 {
				wait = min(wait, d)
				continue
			}
			e.fetching = true
			wg.Go(func() { s.fetch(ctx, e) })
		}
		s.mu.Unlock()

		timer.Reset(wait)
		select {
		case <-ctx.Done():
			wg.Wait()
			s.mu.Lock()
			s.state = storeStopped
			for _, e := range s.entries {
				close(e.changed)
				e.changed = make(chan struct{})
			}
			s.mu.Unlock()
			return nil
		case <-timer.C:
		case <-s.kick:
		}
	}
}

func (s *Store) wake() {
	select {
	case s.kick <- struct{}{}:
	default:
	}
}

func (s *Store) fetch(ctx context.Context, e *entry) {
	cert, err := s.issue(ctx, e.id)
	now := time.Now()
	s.mu.Lock()
	defer s.mu.Unlock()
	e.fetching = false
	if err != nil {
		e.failures++
		e.err = err
		e.next = now.Add(s.backoff(e.failures))
		if ctx.Err() == nil {
			s.opts.Logger.Warn("issuing certificate failed", zap.Stringer("identity", e.id),
				zap.Int("failures", e.failures), zap.Time("retry", e.next), zap.Error(err))
		}
	} else {
		if e.cert != nil && now.Before(e.cert.Leaf.NotAfter) {
			e.prev = e.cert
		}
		e.cert, e.err, e.failures = cert, nil, 0
		e.next = halfLife(cert.Leaf)
		if !e.next.After(now) {
			// The CA handed out a certificate already past its half-life.
			e.next = now.Add(s.backoff(1))
		}
		s.opts.Logger.Info("certificate issued", zap.Stringer("identity", e.id),
			zap.Time("expires", cert.Leaf.NotAfter), zap.Time("refresh", e.next))
	}
	close(e.changed)
	e.changed = make(chan struct{})
	s.wake()
}

func (s *Store) issue(ctx context.Context, id spiffeid.ID) (*tls.Certificate, error) {
	key, err := NewKey()
	if err != nil {
		return nil, err
	}
	csr, err := NewCSR(key, id)
	if err != nil {
		return nil, err
	}
	ictx, cancel := context.WithTimeout(ctx, s.opts.IssueTimeout)
	defer cancel()
	chain, err := s.issuer.Issue(ictx, id, csr, s.opts.TTL)
	if err != nil {
		return nil, fmt.Errorf("issue certificate for %s: %w", id, err)
	}
	if err := CheckChain(chain, id, key); err != nil {
		return nil, fmt.Errorf("issued certificate for %s: %w", id, err)
	}
	if now := time.Now(); now.After(chain[0].NotAfter) || now.Before(chain[0].NotBefore.Add(-time.Minute)) {
		return nil, fmt.Errorf("issued certificate for %s is not valid now (valid %s to %s)", id, chain[0].NotBefore, chain[0].NotAfter)
	}
	c := &tls.Certificate{PrivateKey: key, Leaf: chain[0]}
	for _, x := range chain {
		c.Certificate = append(c.Certificate, x.Raw)
	}
	return c, nil
}

func halfLife(leaf *x509.Certificate) time.Time {
	return leaf.NotBefore.Add(leaf.NotAfter.Sub(leaf.NotBefore) / 2)
}

// backoff returns the delay before attempt failures+1: exponential from
// InitialBackoff, capped at MaxBackoff, with "equal jitter" (half fixed, half
// random) so that many clients do not retry in lockstep.
func (s *Store) backoff(failures int) time.Duration {
	d := s.opts.InitialBackoff
	for i := 1; i < failures && d < s.opts.MaxBackoff; i++ {
		d *= 2
	}
	d = min(d, s.opts.MaxBackoff)
	half := d / 2
	return half + rand.N(half+1)
}

// Certificate returns the current certificate of id, fetching it on first use
// (concurrent callers share one fetch). It fails fast with the last error when
// no valid certificate exists and the last attempt failed; the store keeps
// retrying in the background.
func (s *Store) Certificate(ctx context.Context, id spiffeid.ID) (*tls.Certificate, error) {
	if id.IsZero() {
		return nil, fmt.Errorf("%w: empty SPIFFE ID", ErrInvalidID)
	}
	s.mu.Lock()
	for {
		e := s.entries[id]
		if e == nil {
			e = &entry{id: id, changed: make(chan struct{})}
			s.entries[id] = e
			s.wake()
		}
		if e.cert != nil && time.Now().Before(e.cert.Leaf.NotAfter) {
			c := e.cert
			s.mu.Unlock()
			return c, nil
		}
		if s.state == storeStopped {
			s.mu.Unlock()
			return nil, fmt.Errorf("certificate for %s: %w", id, ErrStoreStopped)
		}
		if e.err != nil && !e.fetching {
			err := e.err
			s.mu.Unlock()
			return nil, fmt.Errorf("no valid certificate for %s: %w", id, err)
		}
		changed, started := e.changed, s.started
		s.mu.Unlock()
		select {
		case <-changed:
		case <-ctx.Done():
			if s.isNew() {
				return nil, fmt.Errorf("certificate for %s: store not running: %w", id, ctx.Err())
			}
			return nil, fmt.Errorf("certificate for %s: %w", id, ctx.Err())
		case <-started:
			// Run began: the fetch is now scheduled; keep waiting on changed.
			started = nil
			select {
			case <-changed:
			case <-ctx.Done():
				return nil, fmt.Errorf("certificate for %s: %w", id, ctx.Err())
			}
		}
		s.mu.Lock()
	}
}

func (s *Store) isNew() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.state == storeNew
}

// GetCertificate adapts Certificate for tls.Config.GetCertificate (servers
// with one identity, such as one pod's HBONE listener).
func (s *Store) GetCertificate(id spiffeid.ID) func(*tls.ClientHelloInfo) (*tls.Certificate, error) {
	return func(h *tls.ClientHelloInfo) (*tls.Certificate, error) { return s.Certificate(h.Context(), id) }
}

// GetClientCertificate adapts Certificate for tls.Config.GetClientCertificate.
func (s *Store) GetClientCertificate(id spiffeid.ID) func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
	return func(r *tls.CertificateRequestInfo) (*tls.Certificate, error) { return s.Certificate(r.Context(), id) }
}

// Release forgets id when its last user is gone: the store stops refreshing it
// and drops its certificates. The caller tracks its users; a later Certificate
// fetches a new certificate.
func (s *Store) Release(id spiffeid.ID) {
	s.mu.Lock()
	defer s.mu.Unlock()
	e := s.entries[id]
	if e == nil {
		return
	}
	delete(s.entries, id)
	e.released = true
	close(e.changed)
	e.changed = make(chan struct{})
}

// Snapshot describes every identity's certificates, sorted by identity.
func (s *Store) Snapshot() []CertInfo {
	s.mu.Lock()
	defer s.mu.Unlock()
	now := time.Now()
	out := make([]CertInfo, 0, len(s.entries))
	for _, e := range s.entries {
		ci := CertInfo{ID: e.id, State: "pending", RefreshAt: e.next, Failures: e.failures}
		if e.err != nil {
			ci.LastError = e.err.Error()
		}
		if e.cert != nil {
			leaf := e.cert.Leaf
			ci.State = "valid"
			if !now.Before(leaf.NotAfter) {
				ci.State = "expired"
			}
			ci.Serial = leaf.SerialNumber.Text(16)
			ci.AuthorityKeyID = hex.EncodeToString(leaf.AuthorityKeyId)
			ci.NotBefore, ci.NotAfter = leaf.NotBefore, leaf.NotAfter
			ci.Chain = parsedChain(e.cert)
		}
		if e.prev != nil && now.Before(e.prev.Leaf.NotAfter) {
			ci.Previous = parsedChain(e.prev)
		}
		out = append(out, ci)
	}
	slices.SortFunc(out, func(a, b CertInfo) int { return cmp.Compare(a.ID.String(), b.ID.String()) })
	return out
}

func parsedChain(c *tls.Certificate) []*x509.Certificate {
	chain := make([]*x509.Certificate, 0, len(c.Certificate))
	chain = append(chain, c.Leaf)
	for _, der := range c.Certificate[1:] {
		if x, err := x509.ParseCertificate(der); err == nil {
			chain = append(chain, x)
		}
	}
	return chain
}
