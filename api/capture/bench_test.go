package capture

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// The same ruleset as build(), in nft syntax, for the baseline.
const nftRuleset = `table inet amesh
delete table inet amesh
table inet amesh {
	set probe_src4 { type ipv4_addr; elements = { 198.18.0.1 } }
	set probe_src6 { type ipv6_addr; elements = { fd00:a5e5::1 } }
	set probe_ports { type inet_service; elements = { 8080 } }
	set open4 { type ipv4_addr . inet_service . ipv4_addr . inet_service; }
	set open6 { type ipv6_addr . inet_service . ipv6_addr . inet_service; }
	chain inbound {
		type nat hook prerouting priority dstnat; policy accept;
		iifname "lo" return
		meta l4proto tcp tcp dport 15008 return
		meta nfproto ipv4 meta l4proto tcp ip saddr @probe_src4 tcp dport @probe_ports return
		meta nfproto ipv6 meta l4proto tcp ip6 saddr @probe_src6 tcp dport @probe_ports return
		meta nfproto ipv4 meta l4proto tcp tcp flags & (syn | ack) != syn ip daddr . tcp dport . ip saddr . tcp sport @open4 return
		meta nfproto ipv6 meta l4proto tcp tcp flags & (syn | ack) != syn ip6 daddr . tcp dport . ip6 saddr . tcp sport @open6 return
		meta l4proto tcp redirect to :15006
	}
	chain outbound {
		type nat hook output priority -100; policy accept;
		oifname "lo" return
		meta mark 0x539 return
		meta nfproto ipv4 meta l4proto tcp tcp flags & (syn | ack) != syn ip saddr . tcp sport . ip daddr . tcp dport @open4 return
		meta nfproto ipv6 meta l4proto tcp tcp flags & (syn | ack) != syn ip6 saddr . tcp sport . ip6 daddr . tcp dport @open6 return
		meta l4proto tcp redirect to :15001
	}
	chain reply {
		type route hook output priority mangle; policy accept;
		meta mark 0x539 ct mark set 0x111 return
		ct mark 0x111 meta mark set 0x111
	}
}
`

// BenchmarkInstall measures installing (replacing) the nftables part of a
// pod's capture rules over netlink, the way the agent does per pod.
// BenchmarkInstallNftBinary is the baseline: the same ruleset through
// the nft binary (fork/exec + parse), as an iptables/nft-shelling agent
// would do it.
func BenchmarkInstall(b *testing.B) {
	needRootB(b)
	ns := newNS(b)
	cfg := Config{ProbeSources: []netip.Addr{nodeIP, nodeIP6}, ProbePorts: []uint16{8080}}
	if err := inNS(ns, func() error {
		for i := 0; i < b.N; i++ {
			if err := installTable(cfg); err != nil {
				return err
			}
		}
		return nil
	}); err != nil {
		b.Fatal(err)
	}
}

func BenchmarkInstallNftBinary(b *testing.B) {
	needRootB(b)
	if _, err := exec.LookPath("nft"); err != nil {
		b.Skip("needs the nft binary (Debian nftables) for the baseline")
	}
	ns := newNS(b)
	file := filepath.Join(b.TempDir(), "rules.nft")
	if err := os.WriteFile(file, []byte(nftRuleset), 0o644); err != nil {
		b.Fatal(err)
	}
	if err := inNS(ns, func() error {
		for i := 0; i < b.N; i++ {
			if out, err := exec.Command("nft", "-f", file).CombinedOutput(); err != nil {
				return fmt.Errorf("nft: %w: %s", err, strings.TrimSpace(string(out)))
			}
		}
		return nil
	}); err != nil {
		b.Fatal(err)
	}
}

func needRootB(b *testing.B) {
	if os.Geteuid() != 0 {
		b.Skip("needs root: creates network namespaces and nftables rules")
	}
}

// TestRulesetMatchesNft cross-checks the rules this package builds with
// the nft tool's own compilation of the same ruleset text (nftRuleset):
// after `nft -f`, Check finds exactly the expected rules.
func TestRulesetMatchesNft(t *testing.T) {
	needRoot(t)
	if _, err := exec.LookPath("nft"); err != nil {
		t.Skip("needs the nft binary (Debian nftables)")
	}
	ns := newNS(t)
	file := filepath.Join(t.TempDir(), "rules.nft")
	if err := os.WriteFile(file, []byte(nftRuleset), 0o644); err != nil {
		t.Fatal(err)
	}
	cfg := Config{ProbeSources: []netip.Addr{nodeIP, nodeIP6}, ProbePorts: []uint16{8080}}
	must(t, inNS(ns, func() error {
		if out, err := exec.Command("nft", "-f", file).CombinedOutput(); err != nil {
			return fmt.Errorf("nft: %w: %s", err, out)
		}
		if err := installRouting(); err != nil {
			return err
		}
		return Check(cfg)
	}))
	// The draining form (Drain), with an opening SYN returning before
	// each redirect, compiles the same way.
	var draining []string
	for _, l := range strings.Split(nftRuleset, "\n") {
		if strings.Contains(l, "redirect to") {
			draining = append(draining, "\t\tmeta l4proto tcp tcp flags & (syn | ack) == syn return")
		}
		draining = append(draining, l)
	}
	if err := os.WriteFile(file, []byte(strings.Join(draining, "\n")), 0o644); err != nil {
		t.Fatal(err)
	}
	must(t, inNS(ns, func() error {
		if out, err := exec.Command("nft", "-f", file).CombinedOutput(); err != nil {
			return fmt.Errorf("nft: %w: %s", err, out)
		}
		return checkTable(build(cfg, openFlows{}, true))
	}))
	// The rules of earlier versions, which redirected every flow's first
	// packet (also one of a connection open before), are a mismatch: the
	// agent's next Install replaces them.
	var legacy []string
	for _, l := range strings.Split(nftRuleset, "\n") {
		if !strings.Contains(l, "open4") && !strings.Contains(l, "open6") {
			legacy = append(legacy, l)
		}
	}
	if len(legacy) != len(strings.Split(nftRuleset, "\n"))-6 {
		t.Fatal("the baseline does not have the 6 lines of open connections to remove")
	}
	if err := os.WriteFile(file, []byte(strings.Join(legacy, "\n")), 0o644); err != nil {
		t.Fatal(err)
	}
	must(t, inNS(ns, func() error {
		if out, err := exec.Command("nft", "-f", file).CombinedOutput(); err != nil {
			return fmt.Errorf("nft: %w: %s", err, out)
		}
		if err := Check(cfg); !errors.Is(err, ErrMismatch) {
			return fmt.Errorf("Check of the legacy rules = %v, want ErrMismatch", err)
		}
		return nil
	}))
}
