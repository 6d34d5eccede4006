package identity

import (
	"errors"
	"strings"
	"testing"
)

func TestID(t *testing.T) {
	for _, tc := range []struct {
		td, ns, sa string
		want       string // "" = error
	}{
		{"cluster.local", "default", "sleep", "spiffe://cluster.local/ns/default/sa/sleep"},
		{"example.org", "kube-system", "a.b-c", "spiffe://example.org/ns/kube-system/sa/a.b-c"},
		{"cluster.local", "Default", "sleep", ""},
		{"cluster.local", "", "sleep", ""},
		{"cluster.local", "default", "", ""},
		{"cluster.local", "-ns", "sa", ""},
		{"cluster.local", "ns", "sa-", ""},
		{"cluster.local", "ns", "a/b", ""},
		{"cluster.local", "ns", "a..b", ""},
		{"cluster.local", strings.Repeat("a", 64), "sa", ""},
		{"cluster.local", strings.Repeat("a", 63), "sa", "spiffe://cluster.local/ns/" + strings.Repeat("a", 63) + "/sa/sa"},
		{"Cluster.Local", "ns", "sa", ""},
		{"", "ns", "sa", ""},
		{"spiffe://cluster.local", "ns", "sa", ""},
	} {
		id, err := ID(tc.td, tc.ns, tc.sa)
		if tc.want == "" {
			if err == nil || !errors.Is(err, ErrInvalidID) {
				t.Errorf("ID(%q,%q,%q) = %v, %v; want ErrInvalidID", tc.td, tc.ns, tc.sa, id, err)
			}
			continue
		}
		if err != nil || id.String() != tc.want {
			t.Errorf("ID(%q,%q,%q) = %v, %v; want %s", tc.td, tc.ns, tc.sa, id, err, tc.want)
		}
	}
}

func TestParse(t *testing.T) {
	for _, tc := range []struct {
		in      string
		want    Workload // zero TrustDomain = error expected
		errPart string
	}{
		{in: "spiffe://cluster.local/ns/default/sa/sleep", want: Workload{TrustDomain: "cluster.local", Namespace: "default", ServiceAccount: "sleep"}},
		{in: "spiffe://td/ns/a/sa/b.c", want: Workload{TrustDomain: "td", Namespace: "a", ServiceAccount: "b.c"}},
		{in: "", errPart: "cannot be empty"},
		{in: "http://cluster.local/ns/a/sa/b", errPart: "scheme"},
		{in: "spiffe://cluster.local", errPart: "path must be"},
		{in: "spiffe://cluster.local/ns/a", errPart: "path must be"},
		{in: "spiffe://cluster.local/ns/a/sa/b/extra", errPart: "path must be"},
		{in: "spiffe://cluster.local/sa/a/ns/b", errPart: "path must be"},
		{in: "spiffe://cluster.local/ns/A/sa/b", errPart: "namespace"},
		{in: "spiffe://cluster.local/ns/a/sa/B", errPart: "service account"},
		{in: "spiffe://cluster.local/ns/a/sa/b/", errPart: "trailing slash"},
		{in: "spiffe://cluster.local/ns//sa/b", errPart: "empty segments"},
		{in: "spiffe://Cluster.local/ns/a/sa/b", errPart: "trust domain characters"},
		{in: "spiffe://cluster.local/ns/a/sa/b?x=1", errPart: "path segment characters"},
		{in: "spiffe://user@cluster.local/ns/a/sa/b", errPart: "trust domain characters"},
		{in: "spiffe://cluster.local:8080/ns/a/sa/b", errPart: "trust domain characters"},
	} {
		w, err := Parse(tc.in)
		if tc.want.TrustDomain == "" {
			if err == nil || !errors.Is(err, ErrInvalidID) || !strings.Contains(err.Error(), tc.errPart) {
				t.Errorf("Parse(%q) = %+v, %v; want ErrInvalidID mentioning %q", tc.in, w, err, tc.errPart)
			}
			continue
		}
		if err != nil {
			t.Errorf("Parse(%q): %v", tc.in, err)
			continue
		}
		if w.TrustDomain != tc.want.TrustDomain || w.Namespace != tc.want.Namespace ||
			w.ServiceAccount != tc.want.ServiceAccount || w.String() != tc.in {
			t.Errorf("Parse(%q) = %+v", tc.in, w)
		}
	}
}

func FuzzParse(f *testing.F) {
	for _, s := range []string{
		"spiffe://cluster.local/ns/default/sa/sleep",
		"spiffe://td/ns/a/sa/b.c",
		"spiffe://cluster.local/ns/a/sa/b/",
		"spiffe://x/ns/-/sa/-",
		"spiffe:///ns/a/sa/b",
		"spiffe://a/ns/a/sa/b%2F",
		"",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		w, err := Parse(s)
		if err != nil {
			if !errors.Is(err, ErrInvalidID) {
				t.Fatalf("Parse(%q) error %v does not wrap ErrInvalidID", s, err)
			}
			return
		}
		if w.String() != s {
			t.Fatalf("Parse(%q).String() = %q", s, w.String())
		}
		id, err := ID(w.TrustDomain, w.Namespace, w.ServiceAccount)
		if err != nil || id != w.ID {
			t.Fatalf("ID(%q,%q,%q) = %v, %v; Parse gave %v", w.TrustDomain, w.Namespace, w.ServiceAccount, id, err, w.ID)
		}
		if !isDNSLabel(w.Namespace) || !isDNSSubdomain(w.ServiceAccount) {
			t.Fatalf("Parse(%q) accepted bad names %+v", s, w)
		}
	})
}
