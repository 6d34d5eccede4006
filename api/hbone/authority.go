package hbone

import (
	"fmt"
	"net/netip"
	"strings"
)

// ParseAuthority parses a CONNECT :authority, which in HBONE is always a
// literal ip:port ("10.0.0.1:8080", "[fd00::1]:80"): no host names, no zone,
// port 1-65535 in plain decimal. An IPv4-mapped IPv6 address is returned as
// IPv4. Errors wrap ErrBadTarget.
func ParseAuthority(s string) (netip.AddrPort, error) {
	if s == "" {
		return netip.AddrPort{}, fmt.Errorf("%w: empty authority", ErrBadTarget)
	}
	i := strings.LastIndexByte(s, ':')
	if i < 0 {
		return netip.AddrPort{}, fmt.Errorf("%w: authority %q has no port", ErrBadTarget, s)
	}
	port := s[i+1:]
	if port == "" || len(port) > 5 || (port[0] == '0') {
		return netip.AddrPort{}, fmt.Errorf("%w: authority %q: bad port", ErrBadTarget, s)
	}
	for _, c := range []byte(port) {
		if c < '0' || c > '9' {
			return netip.AddrPort{}, fmt.Errorf("%w: authority %q: bad port", ErrBadTarget, s)
		}
	}
	ap, err := netip.ParseAddrPort(s)
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("%w: authority %q: %w", ErrBadTarget, s, err)
	}
	if ap.Addr().Zone() != "" {
		return netip.AddrPort{}, fmt.Errorf("%w: authority %q: zones are not allowed", ErrBadTarget, s)
	}
	if ap.Addr().Is4() && strings.HasPrefix(s, "[") {
		return netip.AddrPort{}, fmt.Errorf("%w: authority %q: IPv4 in brackets", ErrBadTarget, s)
	}
	if ap.Port() == 0 {
		return netip.AddrPort{}, fmt.Errorf("%w: authority %q: port 0", ErrBadTarget, s)
	}
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port()), nil
}
