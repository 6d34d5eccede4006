package capture

import (
	"errors"
	"fmt"
	"net/netip"

	"github.com/google/nftables"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// TCP socket states (include/net/tcp_states.h) that carry no connection.
const (
	tcpTimeWait = 6
	tcpClose    = 7
	tcpListen   = 10
)

// openConnections lists the TCP connections open in the current network
// namespace (sock_diag), as keys of the open sets. An IPv6 socket talking
// to an IPv4-mapped address carries IPv4 packets: it goes to the IPv4 set.
// A kernel without TCP socket diagnostics yields no connections (they
// are then reset by the capture, as with no exemption at all).
func openConnections() (openFlows, error) {
	h, err := netlink.NewHandle(unix.NETLINK_INET_DIAG)
	if err != nil {
		if unsupported(err) {
			return openFlows{}, nil
		}
		return openFlows{}, fmt.Errorf("sock_diag: %w", err)
	}
	defer h.Close()
	var out openFlows
	seen := map[string]bool{}
	for _, family := range []uint8{unix.AF_INET, unix.AF_INET6} {
		socks, err := dumpTCP(h, family)
		if err != nil {
			if unsupported(err) {
				continue
			}
			return openFlows{}, fmt.Errorf("sock_diag (family %d): %w", family, err)
		}
		for _, s := range socks {
			switch s.State {
			case tcpListen, tcpTimeWait, tcpClose:
				continue
			}
			local, ok1 := netip.AddrFromSlice(s.ID.Source)
			peer, ok2 := netip.AddrFromSlice(s.ID.Destination)
			if !ok1 || !ok2 {
				continue
			}
			local, peer = local.Unmap(), peer.Unmap()
			if local.Is4() != peer.Is4() {
				continue
			}
			key := flowKey(netip.AddrPortFrom(local, s.ID.SourcePort), netip.AddrPortFrom(peer, s.ID.DestinationPort))
			if seen[string(key)] {
				continue
			}
			seen[string(key)] = true
			if local.Is4() {
				out.v4 = append(out.v4, nftables.SetElement{Key: key})
			} else {
				out.v6 = append(out.v6, nftables.SetElement{Key: key})
			}
		}
	}
	return out, nil
}

// dumpTCP dumps the TCP sockets of one family, again when the kernel
// reports the dump interrupted by a concurrent change.
func dumpTCP(h *netlink.Handle, family uint8) ([]*netlink.Socket, error) {
	var err error
	for range 5 {
		var socks []*netlink.Socket
		socks, err = h.SocketDiagTCP(family)
		if !errors.Is(err, netlink.ErrDumpInterrupted) {
			return socks, err
		}
	}
	return nil, err
}

// unsupported reports whether err means that the kernel offers no TCP
// socket diagnostics (for this family).
func unsupported(err error) bool {
	return errors.Is(err, unix.EPROTONOSUPPORT) || errors.Is(err, unix.ENOENT) ||
		errors.Is(err, unix.EAFNOSUPPORT) || errors.Is(err, unix.EOPNOTSUPP)
}
