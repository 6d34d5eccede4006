package identity

import (
	"errors"
	"fmt"
	"strings"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// DefaultTrustDomain is the trust domain used when none is configured.
const DefaultTrustDomain = "cluster.local"

// ErrInvalidID reports a SPIFFE ID that is not a well-formed amesh workload
// identity.
var ErrInvalidID = errors.New("invalid workload identity")

// Workload is a parsed workload identity.
type Workload struct {
	TrustDomain    string
	Namespace      string
	ServiceAccount string
	ID             spiffeid.ID
}

// String returns the SPIFFE ID.
func (w Workload) String() string { return w.ID.String() }

// ID returns spiffe://<trustDomain>/ns/<namespace>/sa/<serviceAccount>. The
// namespace must be a DNS-1123 label and the service account a DNS-1123
// subdomain, as Kubernetes requires.
func ID(trustDomain, namespace, serviceAccount string) (spiffeid.ID, error) {
	td, err := spiffeid.TrustDomainFromString(trustDomain)
	if err != nil {
		return spiffeid.ID{}, fmt.Errorf("%w: trust domain %q: %w", ErrInvalidID, trustDomain, err)
	}
	if strings.Contains(trustDomain, "://") {
		// TrustDomainFromString also accepts a full SPIFFE ID; here only a name is meant.
		return spiffeid.ID{}, fmt.Errorf("%w: trust domain %q: want a name, not a URI", ErrInvalidID, trustDomain)
	}
	if err := checkNames(namespace, serviceAccount); err != nil {
		return spiffeid.ID{}, err
	}
	id, err := spiffeid.FromSegments(td, "ns", namespace, "sa", serviceAccount)
	if err != nil {
		return spiffeid.ID{}, fmt.Errorf("%w: %w", ErrInvalidID, err)
	}
	return id, nil
}

// Parse parses a workload identity spiffe://<td>/ns/<ns>/sa/<sa>. Errors wrap
// ErrInvalidID and say what is wrong.
func Parse(s string) (Workload, error) {
	id, err := spiffeid.FromString(s)
	if err != nil {
		return Workload{}, fmt.Errorf("%w: %q: %w", ErrInvalidID, s, err)
	}
	return FromID(id)
}

// FromID checks that id is a workload identity and splits it into its parts.
func FromID(id spiffeid.ID) (Workload, error) {
	if id.IsZero() {
		return Workload{}, fmt.Errorf("%w: empty SPIFFE ID", ErrInvalidID)
	}
	segs := strings.Split(strings.TrimPrefix(id.Path(), "/"), "/")
	if len(segs) != 4 || segs[0] != "ns" || segs[2] != "sa" {
		return Workload{}, fmt.Errorf("%w: %q: path must be /ns/<namespace>/sa/<service-account>", ErrInvalidID, id)
	}
	if err := checkNames(segs[1], segs[3]); err != nil {
		return Workload{}, fmt.Errorf("%q: %w", id, err)
	}
	return Workload{
		TrustDomain:    id.TrustDomain().Name(),
		Namespace:      segs[1],
		ServiceAccount: segs[3],
		ID:             id,
	}, nil
}

func checkNames(namespace, serviceAccount string) error {
	if !isDNSLabel(namespace) {
		return fmt.Errorf("%w: namespace %q is not a DNS-1123 label", ErrInvalidID, namespace)
	}
	if !isDNSSubdomain(serviceAccount) {
		return fmt.Errorf("%w: service account %q is not a DNS-1123 subdomain", ErrInvalidID, serviceAccount)
	}
	return nil
}

// isDNSLabel reports whether s is a DNS-1123 label: at most 63 lower-case
// alphanumerics or '-', starting and ending with an alphanumeric.
func isDNSLabel(s string) bool {
	return len(s) <= 63 && isAlnumDash(s)
}

// isAlnumDash reports whether s is non-empty lower-case alphanumerics and '-',
// starting and ending with an alphanumeric.
func isAlnumDash(s string) bool {
	if len(s) == 0 {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c >= 'a' && c <= 'z', c >= '0' && c <= '9':
		case c == '-' && i > 0 && i < len(s)-1:
		default:
			return false
		}
	}
	return true
}

// isDNSSubdomain reports whether s is a DNS-1123 subdomain: at most 253
// characters of dot-separated parts as in a label (Kubernetes does not limit
// the parts to 63 characters).
func isDNSSubdomain(s string) bool {
	if len(s) == 0 || len(s) > 253 {
		return false
	}
	for _, l := range strings.Split(s, ".") {
		if !isAlnumDash(l) {
			return false
		}
	}
	return true
}
