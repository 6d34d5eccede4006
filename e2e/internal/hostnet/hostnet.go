// Package hostnet builds and removes the host side of a local cluster's
// network: one Linux bridge, and per node a network namespace joined to the
// bridge by a veth pair, with routes between the nodes' pod CIDRs. It only
// ever creates, and removes, links and namespaces whose names carry the
// cluster's prefix; it never touches the host's other interfaces or routes.
package hostnet

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"

	"github.com/vishvananda/netlink"
	vnetns "github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/amesh-dev/amesh/e2e/internal/netns"
)

// Node is one node's network.
type Node struct {
	// Netns is the name of the node's network namespace in Plan.NetnsDir.
	Netns string
	// HostVeth is the name of the host end of the node's veth pair.
	HostVeth string
	// IP is the node's address on the bridge network (its eth0).
	IP netip.Addr
	// PodCIDR is routed to the node.
	PodCIDR netip.Prefix
}

// Plan is the whole host network of one cluster.
type Plan struct {
	// Bridge is the host bridge's name.
	Bridge string
	// HostAddr is the bridge's address and the node network (for example
	// 172.30.0.1/24); the control plane listens on it.
	HostAddr netip.Prefix
	// ServiceCIDR is routed from every node to the host so that ClusterIPs
	// have a route before kube-proxy's DNAT rewrites them.
	ServiceCIDR netip.Prefix
	// NetnsDir is where node namespaces are pinned (netns.DefaultDir).
	NetnsDir string
	Nodes    []Node
}

// CheckFree fails if any of prefixes overlaps a route on the host or if the
// bridge already exists, so that a new cluster never shadows existing
// networks (another cluster's, or the host's own).
func CheckFree(bridge string, prefixes ...netip.Prefix) error {
	if _, err := netlink.LinkByName(bridge); err == nil {
		return fmt.Errorf("hostnet: link %s already exists (is this cluster already running? run its down command)", bridge)
	}
	routes, err := netlink.RouteListFiltered(netlink.FAMILY_V4, &netlink.Route{Table: unix.RT_TABLE_UNSPEC}, netlink.RT_FILTER_TABLE)
	if err != nil {
		return fmt.Errorf("list host routes: %w", err)
	}
	for _, r := range routes {
		if r.Dst == nil {
			continue
		}
		dst, ok := prefixFromIPNet(r.Dst)
		if !ok || dst.Bits() == 0 {
			continue
		}
		for _, p := range prefixes {
			if p.Overlaps(dst) {
				return fmt.Errorf("hostnet: %s overlaps the host route %s (table %d); choose other cluster address ranges", p, dst, r.Table)
			}
		}
	}
	return nil
}

// Setup creates the bridge, the node namespaces, veth pairs, addresses and
// routes. On error it removes what it created.
func Setup(p Plan) (err error) {
	defer func() {
		if err != nil {
			_ = Teardown(p)
		}
	}()
	br := &netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: p.Bridge}}
	if err := netlink.LinkAdd(br); err != nil {
		return fmt.Errorf("create bridge %s: %w", p.Bridge, err)
	}
	brLink, err := netlink.LinkByName(p.Bridge)
	if err != nil {
		return fmt.Errorf("find bridge %s: %w", p.Bridge, err)
	}
	// Bridged traffic between nodes must not depend on the host's iptables.
	_ = os.WriteFile(filepath.Join("/sys/class/net", p.Bridge, "bridge/nf_call_iptables"), []byte("0"), 0)
	if err := netlink.AddrAdd(brLink, &netlink.Addr{IPNet: ipNet(p.HostAddr)}); err != nil {
		return fmt.Errorf("address bridge %s: %w", p.Bridge, err)
	}
	if err := netlink.LinkSetUp(brLink); err != nil {
		return fmt.Errorf("bring up bridge %s: %w", p.Bridge, err)
	}
	for _, n := range p.Nodes {
		if err := setupNode(p, brLink, n); err != nil {
			return err
		}
	}
	// The host (control plane) reaches pods through their node.
	for _, n := range p.Nodes {
		r := &netlink.Route{LinkIndex: brLink.Attrs().Index, Dst: ipNet(n.PodCIDR.Masked()), Gw: net.IP(n.IP.AsSlice())}
		if err := netlink.RouteAdd(r); err != nil {
			return fmt.Errorf("route %s via %s on the host: %w", n.PodCIDR, n.IP, err)
		}
	}
	return nil
}

func setupNode(p Plan, brLink netlink.Link, n Node) error {
	path, err := netns.Create(p.NetnsDir, n.Netns)
	if err != nil {
		return err
	}
	nsh, err := vnetns.GetFromPath(path)
	if err != nil {
		return fmt.Errorf("open netns %s: %w", path, err)
	}
	defer nsh.Close()
	veth := &netlink.Veth{
		LinkAttrs:     netlink.LinkAttrs{Name: n.HostVeth, MasterIndex: brLink.Attrs().Index},
		PeerName:      "eth0",
		PeerNamespace: netlink.NsFd(nsh),
	}
	if err := netlink.LinkAdd(veth); err != nil {
		return fmt.Errorf("create veth %s for %s: %w", n.HostVeth, n.Netns, err)
	}
	host, err := netlink.LinkByName(n.HostVeth)
	if err != nil {
		return fmt.Errorf("find veth %s: %w", n.HostVeth, err)
	}
	if err := netlink.LinkSetUp(host); err != nil {
		return fmt.Errorf("bring up %s: %w", n.HostVeth, err)
	}

	h, err := netlink.NewHandleAt(nsh)
	if err != nil {
		return fmt.Errorf("netlink in %s: %w", n.Netns, err)
	}
	defer h.Close()
	lo, err := h.LinkByName("lo")
	if err != nil {
		return fmt.Errorf("find lo in %s: %w", n.Netns, err)
	}
	if err := h.LinkSetUp(lo); err != nil {
		return fmt.Errorf("bring up lo in %s: %w", n.Netns, err)
	}
	eth, err := h.LinkByName("eth0")
	if err != nil {
		return fmt.Errorf("find eth0 in %s: %w", n.Netns, err)
	}
	addr := netip.PrefixFrom(n.IP, p.HostAddr.Bits())
	if err := h.AddrAdd(eth, &netlink.Addr{IPNet: ipNet(addr)}); err != nil {
		return fmt.Errorf("address eth0 in %s: %w", n.Netns, err)
	}
	if err := h.LinkSetUp(eth); err != nil {
		return fmt.Errorf("bring up eth0 in %s: %w", n.Netns, err)
	}
	gw := net.IP(p.HostAddr.Addr().AsSlice())
	if err := h.RouteAdd(&netlink.Route{LinkIndex: eth.Attrs().Index, Dst: ipNet(p.ServiceCIDR.Masked()), Gw: gw}); err != nil {
		return fmt.Errorf("route services in %s: %w", n.Netns, err)
	}
	for _, o := range p.Nodes {
		if o.Netns == n.Netns {
			continue
		}
		r := &netlink.Route{LinkIndex: eth.Attrs().Index, Dst: ipNet(o.PodCIDR.Masked()), Gw: net.IP(o.IP.AsSlice())}
		if err := h.RouteAdd(r); err != nil {
			return fmt.Errorf("route %s via %s in %s: %w", o.PodCIDR, o.IP, n.Netns, err)
		}
	}
	return nil
}

// Teardown removes the bridge, the node veths and the node namespaces of p.
// It is idempotent.
func Teardown(p Plan) error {
	var errs []error
	for _, n := range p.Nodes {
		if err := deleteLink(n.HostVeth); err != nil {
			errs = append(errs, err)
		}
		if err := netns.Delete(p.NetnsDir, n.Netns); err != nil {
			errs = append(errs, err)
		}
	}
	if err := deleteLink(p.Bridge); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// Sweep removes every link and pinned namespace whose name is exactly name or
// starts with name+"-". It finds what a crashed cluster left behind even when
// its plan is lost.
func Sweep(netnsDir, name string) error {
	var errs []error
	nss, err := netns.List(netnsDir, name+"-")
	if err != nil {
		errs = append(errs, err)
	}
	for _, ns := range nss {
		if err := netns.Delete(netnsDir, ns); err != nil {
			errs = append(errs, err)
		}
	}
	links, err := Links(name)
	if err != nil {
		errs = append(errs, err)
	}
	for _, l := range links {
		if err := deleteLink(l); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// Links lists the host links named name or name-*.
func Links(name string) ([]string, error) {
	all, err := netlink.LinkList()
	if err != nil {
		return nil, fmt.Errorf("list links: %w", err)
	}
	var out []string
	for _, l := range all {
		n := l.Attrs().Name
		if n == name || strings.HasPrefix(n, name+"-") {
			out = append(out, n)
		}
	}
	return out, nil
}

func deleteLink(name string) error {
	l, err := netlink.LinkByName(name)
	if err != nil {
		var nf netlink.LinkNotFoundError
		if errors.As(err, &nf) {
			return nil
		}
		return fmt.Errorf("find link %s: %w", name, err)
	}
	if err := netlink.LinkDel(l); err != nil && !errors.Is(err, unix.ENODEV) {
		return fmt.Errorf("delete link %s: %w", name, err)
	}
	return nil
}

func ipNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: net.IP(p.Addr().AsSlice()), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}

func prefixFromIPNet(n *net.IPNet) (netip.Prefix, bool) {
	a, ok := netip.AddrFromSlice(n.IP)
	if !ok {
		return netip.Prefix{}, false
	}
	ones, _ := n.Mask.Size()
	return netip.PrefixFrom(a.Unmap(), ones), true
}
