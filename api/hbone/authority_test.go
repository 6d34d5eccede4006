package hbone

import (
	"errors"
	"net/netip"
	"testing"
)

func TestParseAuthority(t *testing.T) {
	for _, tc := range []struct {
		in, want string // want "" = error
	}{
		{"10.0.0.1:80", "10.0.0.1:80"},
		{"[fd00::1]:443", "[fd00::1]:443"},
		{"[::ffff:10.0.0.1]:80", "10.0.0.1:80"},
		{"[FD00:0::1]:443", "[fd00::1]:443"},
		{"10.0.0.1:65535", "10.0.0.1:65535"},
		{"", ""},
		{"10.0.0.1", ""},
		{"10.0.0.1:", ""},
		{"10.0.0.1:0", ""},
		{"10.0.0.1:65536", ""},
		{"10.0.0.1:080", ""},
		{"10.0.0.1:+80", ""},
		{"10.0.0.1:8a", ""},
		{"example.com:80", ""},
		{"localhost:80", ""},
		{"fd00::1:443", ""},
		{"[10.0.0.1]:80", ""},
		{"[fe80::1%eth0]:80", ""},
		{"010.0.0.1:80", ""},
		{" 10.0.0.1:80", ""},
		{"10.0.0.1:80/x", ""},
		{"user@10.0.0.1:80", ""},
	} {
		got, err := ParseAuthority(tc.in)
		if tc.want == "" {
			if err == nil || !errors.Is(err, ErrBadTarget) {
				t.Errorf("ParseAuthority(%q) = %v, %v; want ErrBadTarget", tc.in, got, err)
			}
			continue
		}
		if err != nil || got.String() != tc.want {
			t.Errorf("ParseAuthority(%q) = %v, %v; want %s", tc.in, got, err, tc.want)
		}
	}
}

func FuzzParseAuthority(f *testing.F) {
	for _, s := range []string{"10.0.0.1:80", "[fd00::1]:443", "[::ffff:1.2.3.4]:1", "a:1", "[fe80::1%x]:2", ":80", "1.2.3.4:0"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		ap, err := ParseAuthority(s)
		if err != nil {
			if !errors.Is(err, ErrBadTarget) {
				t.Fatalf("ParseAuthority(%q): error %v does not wrap ErrBadTarget", s, err)
			}
			return
		}
		if !ap.IsValid() || ap.Port() == 0 || ap.Addr().Zone() != "" || ap.Addr().Is4In6() {
			t.Fatalf("ParseAuthority(%q) accepted %v", s, ap)
		}
		// The canonical form parses to the same value.
		again, err := ParseAuthority(ap.String())
		if err != nil || again != ap {
			t.Fatalf("ParseAuthority(%q) = %v, but its form %q gives %v, %v", s, ap, ap.String(), again, err)
		}
		if want, err := netip.ParseAddrPort(s); err != nil || netip.AddrPortFrom(want.Addr().Unmap(), want.Port()) != ap {
			t.Fatalf("ParseAuthority(%q) = %v disagrees with netip: %v, %v", s, ap, want, err)
		}
	})
}
