package capture

import (
	"errors"
	"fmt"
	"net"
	"os"
	"strings"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

type familyDefault struct {
	family int
	dst    func() *net.IPNet
}

// families returns the address families the reply routing is installed
// for, with their "default" prefix.
func families() []familyDefault {
	return []familyDefault{
		{unix.AF_INET, func() *net.IPNet { return &net.IPNet{IP: net.IPv4zero.To4(), Mask: net.CIDRMask(0, 32)} }},
		{unix.AF_INET6, func() *net.IPNet { return &net.IPNet{IP: net.IPv6zero, Mask: net.CIDRMask(0, 128)} }},
	}
}

func replyRule(family int) *netlink.Rule {
	r := netlink.NewRule()
	r.Family = family
	r.Priority = RulePriority
	r.Table = RouteTable
	r.Mark = ReplyMark
	mask := uint32(0xffffffff)
	r.Mask = &mask
	return r
}

func replyRoute(family int, dst *net.IPNet, lo int) *netlink.Route {
	return &netlink.Route{
		Family:    family,
		LinkIndex: lo,
		Dst:       dst,
		Type:      unix.RTN_LOCAL,
		Table:     RouteTable,
		Scope:     netlink.SCOPE_HOST,
	}
}

// skipFamily reports whether family is IPv6 and IPv6 is disabled on the
// loopback interface of the current network namespace: then there is
// nothing to route back for IPv6. (/proc/sys/net follows the netns of the
// calling thread.)
func skipFamily(family int) bool {
	if family != unix.AF_INET6 {
		return false
	}
	b, err := os.ReadFile("/proc/sys/net/ipv6/conf/lo/disable_ipv6")
	return err != nil || strings.TrimSpace(string(b)) == "1"
}

// v6Unavailable reports whether err means that IPv6 is unavailable.
func v6Unavailable(family int, err error) bool {
	return family == unix.AF_INET6 && (errors.Is(err, unix.EAFNOSUPPORT) || errors.Is(err, unix.EACCES))
}

// installRouting adds, per family, "local default dev lo table RouteTable"
// and "fwmark ReplyMark lookup RouteTable". Both are idempotent.
func installRouting() error {
	h, err := netlink.NewHandle()
	if err != nil {
		return fmt.Errorf("netlink: %w", err)
	}
	defer h.Close()
	lo, err := h.LinkByName("lo")
	if err != nil {
		return fmt.Errorf("loopback: %w", err)
	}
	if lo.Attrs().Flags&net.FlagUp == 0 {
		if err := h.LinkSetUp(lo); err != nil {
			return fmt.Errorf("loopback up: %w", err)
		}
	}
	for _, f := range families() {
		if skipFamily(f.family) {
			continue
		}
		if err := h.RouteReplace(replyRoute(f.family, f.dst(), lo.Attrs().Index)); err != nil {
			if v6Unavailable(f.family, err) {
				continue
			}
			return fmt.Errorf("route (family %d): %w", f.family, err)
		}
		present, err := hasRule(h, f.family)
		if err != nil {
			return err
		}
		if present {
			continue
		}
		if err := h.RuleAdd(replyRule(f.family)); err != nil && !errors.Is(err, unix.EEXIST) {
			return fmt.Errorf("rule (family %d): %w", f.family, err)
		}
	}
	return nil
}

func hasRule(h *netlink.Handle, family int) (bool, error) {
	rules, err := h.RuleListFiltered(family, replyRule(family), netlink.RT_FILTER_TABLE|netlink.RT_FILTER_MARK|netlink.RT_FILTER_PRIORITY)
	if err != nil {
		if v6Unavailable(family, err) {
			return false, nil
		}
		return false, fmt.Errorf("list rules (family %d): %w", family, err)
	}
	return len(rules) > 0, nil
}

func removeRouting() error {
	h, err := netlink.NewHandle()
	if err != nil {
		return fmt.Errorf("netlink: %w", err)
	}
	defer h.Close()
	for _, f := range families() {
		if skipFamily(f.family) {
			continue
		}
		for {
			present, err := hasRule(h, f.family)
			if err != nil {
				return err
			}
			if !present {
				break
			}
			if err := h.RuleDel(replyRule(f.family)); err != nil && !errors.Is(err, unix.ENOENT) {
				return fmt.Errorf("delete rule (family %d): %w", f.family, err)
			}
		}
		routes, err := h.RouteListFiltered(f.family, &netlink.Route{Table: RouteTable}, netlink.RT_FILTER_TABLE)
		if err != nil {
			if v6Unavailable(f.family, err) {
				continue
			}
			return fmt.Errorf("list routes (family %d): %w", f.family, err)
		}
		for _, r := range routes {
			if r.Type != unix.RTN_LOCAL || r.Dst == nil || !isDefault(r.Dst) {
				continue
			}
			if err := h.RouteDel(&r); err != nil && !errors.Is(err, unix.ESRCH) {
				return fmt.Errorf("delete route (family %d): %w", f.family, err)
			}
		}
	}
	return nil
}

func isDefault(n *net.IPNet) bool {
	ones, _ := n.Mask.Size()
	return ones == 0
}

func checkRouting() error {
	h, err := netlink.NewHandle()
	if err != nil {
		return fmt.Errorf("netlink: %w", err)
	}
	defer h.Close()
	for _, f := range families() {
		if skipFamily(f.family) {
			continue
		}
		routes, err := h.RouteListFiltered(f.family, &netlink.Route{Table: RouteTable}, netlink.RT_FILTER_TABLE)
		if err != nil {
			if v6Unavailable(f.family, err) {
				continue
			}
			return fmt.Errorf("capture: list routes: %w", err)
		}
		found := false
		for _, r := range routes {
			if r.Type == unix.RTN_LOCAL && (r.Dst == nil || isDefault(r.Dst)) {
				found = true
			}
		}
		if !found {
			return fmt.Errorf("%w: no local default route in table %d (family %d)", ErrMismatch, RouteTable, f.family)
		}
		present, err := hasRule(h, f.family)
		if err != nil {
			return err
		}
		if !present {
			return fmt.Errorf("%w: no fwmark %#x rule (family %d)", ErrMismatch, ReplyMark, f.family)
		}
	}
	return nil
}
