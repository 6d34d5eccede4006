package sample

import (
	"errors"
	"flag"
	"fmt"
	"math/rand/v2"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"

	"google.golang.org/grpc/codes"
)

// Request headers (HTTP) and metadata keys (gRPC) that set test knobs for
// one request. They override the instance's defaults (flags / env).
const (
	// HeaderFail is a FailSpec: "0.25" fails a random quarter of the
	// requests; "1/4" fails exactly the first of every 4 (counted per
	// instance and per spec), so retries and splits are deterministic.
	HeaderFail = "x-amesh-fail"
	// HeaderFailCode is the status of an injected failure: an HTTP status
	// 400–599 (default 503), or for ratings a gRPC code number 1–16
	// (default 14, Unavailable).
	HeaderFailCode = "x-amesh-fail-code"
	// HeaderDelay delays the response by a Go duration ("150ms") up to MaxDelay.
	HeaderDelay = "x-amesh-delay"
	// HeaderEcho set to "true" (or "1") adds the whole request to the response body.
	HeaderEcho = "x-amesh-echo"
)

// Response headers (HTTP) and metadata keys (gRPC) naming who answered.
const (
	HeaderService  = "x-amesh-service"
	HeaderVersion  = "x-amesh-version"
	HeaderServedBy = "x-amesh-served-by" // the pod name
	HeaderPeer     = "x-amesh-peer"      // the client address this instance saw
	// HeaderFault is set on injected failures, so a test can tell them
	// from failures of the mesh.
	HeaderFault = "x-amesh-fault"
)

// maxDenominator bounds the N of a deterministic "K/N" spec.
const maxDenominator = 1_000_000

// FailSpec says which requests fail: a random fraction, or exactly K of
// every N. The zero value fails nothing.
type FailSpec struct {
	// Fraction in [0, 1] is used when N is 0.
	Fraction float64
	// K of every N requests fail (the first K), 0 ≤ K ≤ N.
	K, N int
}

// ParseFailSpec parses "0.25" (random fraction) or "1/4" (deterministic).
func ParseFailSpec(s string) (FailSpec, error) {
	s = strings.TrimSpace(s)
	if s == "" {
		return FailSpec{}, nil
	}
	if k, n, ok := strings.Cut(s, "/"); ok {
		ki, err1 := strconv.Atoi(strings.TrimSpace(k))
		ni, err2 := strconv.Atoi(strings.TrimSpace(n))
		if err := errors.Join(err1, err2); err != nil {
			return FailSpec{}, fmt.Errorf("fail spec %q: want K/N with integers: %w", s, err)
		}
		if ni <= 0 || ni > maxDenominator || ki < 0 || ki > ni {
			return FailSpec{}, fmt.Errorf("fail spec %q: want 0 ≤ K ≤ N, 0 < N ≤ %d", s, maxDenominator)
		}
		return FailSpec{K: ki, N: ni}, nil
	}
	f, err := strconv.ParseFloat(s, 64)
	if err != nil {
		return FailSpec{}, fmt.Errorf("fail spec %q: want a fraction in [0,1] or K/N: %w", s, err)
	}
	if !(f >= 0 && f <= 1) { // also refuses NaN
		return FailSpec{}, fmt.Errorf("fail spec %q: fraction must be in [0,1]", s)
	}
	return FailSpec{Fraction: f}, nil
}

// String is the inverse of ParseFailSpec.
func (f FailSpec) String() string {
	if f.N > 0 {
		return fmt.Sprintf("%d/%d", f.K, f.N)
	}
	return strconv.FormatFloat(f.Fraction, 'g', -1, 64)
}

// IsZero reports whether the spec fails nothing.
func (f FailSpec) IsZero() bool { return f.Fraction == 0 && f.K == 0 }

// Fault is what an instance injects into a request.
type Fault struct {
	Fail FailSpec
	// Code of the injected failure: an HTTP status, or a gRPC code for
	// ratings; 0 means the default (503, or Unavailable).
	Code int
	// Delay before answering (before failing, too).
	Delay time.Duration
}

// registerFlags binds the fault defaults to fs with environment defaults
// FAIL, FAIL_CODE and DELAY; it returns the malformed environment values.
func (f *Fault) registerFlags(fs *flag.FlagSet) []error {
	var errs []error
	if v := env("FAIL", ""); v != "" {
		spec, err := ParseFailSpec(v)
		if err != nil {
			errs = append(errs, fmt.Errorf("FAIL: %w", err))
		}
		f.Fail = spec
	}
	if v := env("FAIL_CODE", ""); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil {
			errs = append(errs, fmt.Errorf("FAIL_CODE=%q: %w", v, err))
		}
		f.Code = n
	}
	if v := env("DELAY", ""); v != "" {
		d, err := time.ParseDuration(v)
		if err != nil {
			errs = append(errs, fmt.Errorf("DELAY=%q: %w", v, err))
		}
		f.Delay = d
	}
	fs.Func("fail", "fail requests: a fraction \"0.25\" (random) or \"K/N\" (the first K of every N) [FAIL]", func(s string) error {
		spec, err := ParseFailSpec(s)
		f.Fail = spec
		return err
	})
	fs.IntVar(&f.Code, "fail-code", f.Code, "status of injected failures: HTTP 400-599 (default 503), ratings: gRPC code 1-16 (default 14) [FAIL_CODE]")
	fs.DurationVar(&f.Delay, "delay", f.Delay, "delay every response [DELAY]")
	return errs
}

// validate checks the fault for an instance of role.
func (f *Fault) validate(role Role) error {
	var errs []error
	if f.Code != 0 {
		if err := checkCode(role, f.Code); err != nil {
			errs = append(errs, err)
		}
	}
	if f.Delay < 0 || f.Delay > MaxDelay {
		errs = append(errs, fmt.Errorf("delay %s: want 0 to %s", f.Delay, MaxDelay))
	}
	return errors.Join(errs...)
}

func checkCode(role Role, code int) error {
	if role == RoleRatings {
		if code < 1 || code > 16 {
			return fmt.Errorf("fail code %d: want a gRPC code 1-16", code)
		}
		return nil
	}
	if code < 400 || code > 599 {
		return fmt.Errorf("fail code %d: want an HTTP status 400-599", code)
	}
	return nil
}

// override returns the fault for one request: the instance default with
// whatever the request's knobs (get returns a header or metadata value,
// "" when absent) override. Malformed knobs are an error.
func (f Fault) override(role Role, get func(string) string) (Fault, error) {
	out := f
	var errs []error
	if v := get(HeaderFail); v != "" {
		spec, err := ParseFailSpec(v)
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", HeaderFail, err))
		}
		out.Fail = spec
	}
	if v := get(HeaderFailCode); v != "" {
		n, err := strconv.Atoi(strings.TrimSpace(v))
		if err != nil {
			errs = append(errs, fmt.Errorf("%s %q: %w", HeaderFailCode, v, err))
		} else if err := checkCode(role, n); err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", HeaderFailCode, err))
		}
		out.Code = n
	}
	if v := get(HeaderDelay); v != "" {
		d, err := time.ParseDuration(strings.TrimSpace(v))
		if err != nil {
			errs = append(errs, fmt.Errorf("%s %q: %w", HeaderDelay, v, err))
		} else if d < 0 || d > MaxDelay {
			errs = append(errs, fmt.Errorf("%s %s: want 0 to %s", HeaderDelay, d, MaxDelay))
		}
		out.Delay = d
	}
	if err := errors.Join(errs...); err != nil {
		return Fault{}, err
	}
	return out, nil
}

// httpCode is the HTTP status of an injected failure.
func (f Fault) httpCode() int {
	if f.Code == 0 {
		return http.StatusServiceUnavailable
	}
	return f.Code
}

// grpcCode is the gRPC code of an injected failure.
func (f Fault) grpcCode() codes.Code {
	if f.Code == 0 {
		return codes.Unavailable
	}
	return codes.Code(f.Code)
}

// maxCounters bounds the deterministic counters one instance keeps (a
// client choosing a new K/N per request cannot grow memory without bound).
const maxCounters = 1024

// failer decides whether a request fails. Safe for concurrent use.
type failer struct {
	mu       sync.Mutex
	random   func() float64
	counters map[FailSpec]uint64
}

// newFailer returns a failer drawing random fractions from random (nil:
// math/rand/v2).
func newFailer(random func() float64) *failer {
	if random == nil {
		random = rand.Float64
	}
	return &failer{random: random, counters: make(map[FailSpec]uint64)}
}

// fail reports whether this request fails under spec.
func (f *failer) fail(spec FailSpec) bool {
	if spec.IsZero() {
		return false
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if spec.N == 0 {
		return f.random() < spec.Fraction
	}
	c, ok := f.counters[spec]
	if !ok && len(f.counters) >= maxCounters {
		clear(f.counters)
	}
	f.counters[spec] = c + 1
	return c%uint64(spec.N) < uint64(spec.K)
}

// sleep waits d or until ctx is done; it reports whether the whole delay passed.
func sleep(done <-chan struct{}, d time.Duration) bool {
	if d <= 0 {
		return true
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-done:
		return false
	}
}
