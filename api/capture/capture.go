// Package capture installs, removes and checks the in-pod traffic capture
// rules that send an enrolled pod's TCP traffic through ztunnel.
//
// The rules live in the network namespace of the calling thread: callers
// enter the pod's netns on a locked OS thread (for example with
// containernetworking/plugins ns.Do) and call Install, Remove or Check there.
//
// What gets installed (one nftables table, "inet amesh", written in one
// netlink transaction, plus one policy-routing rule and route per family):
//
//   - outbound: every new TCP connection a process in the pod opens is
//     REDIRECTed to 127.0.0.1:15001 (OutboundPort) — ztunnel reads the
//     original destination with SO_ORIGINAL_DST (OriginalDestination).
//     Traffic leaving through the loopback interface and sockets marked
//     Mark (0x539, ztunnel's own) are left alone.
//   - inbound: every new TCP connection arriving on a non-loopback
//     interface is REDIRECTed to 15006 (InboundPlaintextPort), except
//     connections to 15008 (InboundHBONEPort), which ztunnel terminates
//     itself, and kubelet health probes (see Config).
//   - connections the pod had open before its first Install keep their
//     path: Install lists the pod's TCP connections (sock_diag) into two
//     sets, open4 and open6, and a packet of one of them that does not
//     open a connection (not a SYN without ACK) is left alone. Conntrack
//     begins in a pod's netns with this table, so the next packet of such
//     a connection is new to it; redirecting it mid-stream would send it
//     to a ztunnel port that answers with a reset. Once let through, a
//     connection keeps its untranslated conntrack entry until it closes,
//     as enrolling a running pod should leave its open connections alone.
//     Every other packet that starts a conntrack entry is redirected,
//     mid-stream or not: a captured connection whose entry was lost
//     (expired while the application held it half-closed, say) goes back
//     to ztunnel — on through it while ztunnel holds the connection, else
//     reset — and is never sent on to its original destination in
//     plaintext. Install keeps the sets of an installed table (connections
//     opened since are not "open before"), so replacing the rules keeps
//     every flow where it is.
//   - reply routing: ztunnel connects to the application from inside the
//     pod with the original client's source address (IP_TRANSPARENT) and
//     Mark. The rules record such connections in the conntrack mark and
//     route the application's answers (mark ReplyMark) through routing
//     table RouteTable, whose only route is "local default dev lo", so they
//     come back to ztunnel instead of leaving through the pod's uplink.
//
// Kubelet probes: the kubelet connects to the pod in plaintext from the
// node. Letting them through must not open a plaintext path into the pod,
// so the exemption is as narrow as it can be: only connections whose
// source is one of Config.ProbeSources (the node's address toward the pod,
// i.e. the source address the node's kernel picks for the pod IP) AND
// whose destination port is one of Config.ProbePorts (the ports the pod's
// probes use) skip the capture. Everything else from the node, and every
// other port, is captured as usual. The packet mark cannot be used to
// recognise probes because the kernel clears it when a packet crosses into
// another network namespace. The remaining exposure is that other
// host-network processes on the same node can reach the probe ports in
// plaintext; they already run with the node's privileges.
//
// Leaving the mesh: removing the rules of a pod with connections through
// ztunnel would let their next packets out untranslated — in plaintext, to
// the original destination (and the application's answers on ztunnel's
// inbound connections out to the client). So a pod leaves in steps: Drain
// switches the rules to a form that captures no new connection but keeps
// the captured ones working (ztunnel drains them) and lists them;
// StillOpen follows them; past a deadline Reset aborts the rest; then
// Remove.
//
// Install replaces everything atomically and is idempotent; Remove is
// idempotent; Check reports whether exactly the rules for a Config are in
// place (of the open-connection sets, which hold the pod's connections
// rather than anything of the Config, it checks that they exist).
package capture

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"
)

// Ports, marks and routing identifiers shared by the node agent and ztunnel.
const (
	// OutboundPort is where ztunnel accepts the pod's captured outbound
	// connections, inside the pod's netns.
	OutboundPort = 15001
	// InboundPlaintextPort is where ztunnel accepts captured plaintext
	// inbound connections, inside the pod's netns.
	InboundPlaintextPort = 15006
	// InboundHBONEPort is ztunnel's HBONE listener inside the pod's netns;
	// connections to it are never redirected.
	InboundHBONEPort = 15008
	// DNSPort is reserved for ztunnel's DNS proxy (not captured yet).
	DNSPort = 15053
	// Mark is the SO_MARK ztunnel puts on every socket it opens; the
	// capture rules never redirect packets that carry it.
	Mark = 0x539
	// ReplyMark is the packet mark given to the application's answers on
	// connections ztunnel opened to it, so that they route back to ztunnel.
	ReplyMark = 0x111
	// RouteTable is the policy-routing table holding "local default dev lo".
	RouteTable = 100
	// RulePriority is the priority of the "fwmark ReplyMark lookup
	// RouteTable" policy-routing rule.
	RulePriority = 32764
	// TableName is the nftables table (family inet) holding the rules.
	TableName = "amesh"
)

// Errors returned by Check (wrapped, with details).
var (
	// ErrNotInstalled: no capture rules are present.
	ErrNotInstalled = errors.New("capture rules not installed")
	// ErrMismatch: capture rules are present but differ from the expected ones.
	ErrMismatch = errors.New("capture rules differ from the expected ones")
)

// Config parameterises the capture rules of one pod. The zero value
// captures everything and exempts no probes.
type Config struct {
	// ProbeSources are the addresses kubelet probes come from: the node's
	// address toward the pod. Connections from them to ProbePorts are not
	// captured.
	ProbeSources []netip.Addr
	// ProbePorts are the pod ports that kubelet probes connect to. With no
	// ports nothing is exempt.
	ProbePorts []uint16
}

// Validate reports whether the configuration can be installed.
func (c Config) Validate() error {
	var errs []error
	for _, a := range c.ProbeSources {
		if !a.IsValid() || a.IsUnspecified() {
			errs = append(errs, fmt.Errorf("capture: invalid probe source %v", a))
		}
	}
	for _, p := range c.ProbePorts {
		switch p {
		case 0:
			errs = append(errs, errors.New("capture: probe port 0"))
		case OutboundPort, InboundPlaintextPort, InboundHBONEPort:
			errs = append(errs, fmt.Errorf("capture: probe port %d is reserved for ztunnel", p))
		}
	}
	return errors.Join(errs...)
}

// normalized returns the configuration with sorted, de-duplicated entries
// and IPv4-mapped IPv6 addresses unmapped, split by family.
func (c Config) normalized() (v4, v6 []netip.Addr, ports []uint16) {
	for _, a := range c.ProbeSources {
		a = a.Unmap().WithZone("")
		if a.Is4() {
			v4 = append(v4, a)
		} else {
			v6 = append(v6, a)
		}
	}
	slices.SortFunc(v4, netip.Addr.Compare)
	slices.SortFunc(v6, netip.Addr.Compare)
	ports = slices.Clone(c.ProbePorts)
	slices.Sort(ports)
	return slices.Compact(v4), slices.Compact(v6), slices.Compact(ports)
}

// Install puts the capture rules for cfg in place in the current network
// namespace, replacing any previous version of them in one transaction. It
// is idempotent. The first Install (no table yet) lists the namespace's
// open TCP connections, which keep their path (see the package doc).
func Install(cfg Config) error {
	if err := cfg.Validate(); err != nil {
		return err
	}
	if err := installRouting(); err != nil {
		return fmt.Errorf("capture: reply routing: %w", err)
	}
	if err := installTable(cfg); err != nil {
		return fmt.Errorf("capture: nftables: %w", err)
	}
	return nil
}

// Remove deletes the capture rules from the current network namespace. It
// is idempotent: removing absent rules succeeds.
func Remove() error {
	if err := removeTable(); err != nil {
		return fmt.Errorf("capture: nftables: %w", err)
	}
	if err := removeRouting(); err != nil {
		return fmt.Errorf("capture: reply routing: %w", err)
	}
	return nil
}

// Check reports whether exactly the capture rules for cfg are installed in
// the current network namespace. It returns an error wrapping
// ErrNotInstalled when none are present and ErrMismatch when they differ.
func Check(cfg Config) error {
	if err := cfg.Validate(); err != nil {
		return err
	}
	if err := checkTable(build(cfg, openFlows{}, false)); err != nil {
		return err
	}
	return checkRouting()
}
