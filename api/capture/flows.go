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

// Conn is one TCP connection of the pod, as its socket sees it.
type Conn struct {
	Local, Remote netip.AddrPort
	family        uint8     // of the socket: AF_INET6 for a v4-mapped one
	cookie        [2]uint32 // the socket's identity for sock_diag
}

func (c Conn) String() string { return c.Local.String() + "-" + c.Remote.String() }

// sockets lists the TCP connections of the current network namespace
// (sock_diag, both families), skipping listeners and sockets that carry
// no connection any more. Addresses are unmapped: an IPv6 socket talking
// to an IPv4-mapped address carries IPv4 packets. A kernel without TCP
// socket diagnostics has none to list.
func sockets() ([]Conn, error) {
	h, err := netlink.NewHandle(unix.NETLINK_INET_DIAG)
	if err != nil {
		if unsupported(err) {
			return nil, nil
		}
		return nil, fmt.Errorf("sock_diag: %w", err)
	}
	defer h.Close()
	var out []Conn
	for _, family := range []uint8{unix.AF_INET, unix.AF_INET6} {
		socks, err := dumpTCP(h, family)
		if err != nil {
			if unsupported(err) {
				continue
			}
			return nil, fmt.Errorf("sock_diag (family %d): %w", family, err)
		}
		for _, s := range socks {
			switch s.State {
			case tcpListen, tcpTimeWait, tcpClose:
				continue
			}
			local, ok1 := netip.AddrFromSlice(s.ID.Source)
			remote, ok2 := netip.AddrFromSlice(s.ID.Destination)
			if !ok1 || !ok2 {
				continue
			}
			local, remote = local.Unmap(), remote.Unmap()
			if local.Is4() != remote.Is4() {
				continue
			}
			out = append(out, Conn{
				Local: netip.AddrPortFrom(local, s.ID.SourcePort), Remote: netip.AddrPortFrom(remote, s.ID.DestinationPort),
				family: s.Family, cookie: s.ID.Cookie,
			})
		}
	}
	return out, nil
}

// openConnections lists the TCP connections open in the current network
// namespace as keys of the open sets. Without TCP socket diagnostics there
// are none: open connections are then reset by the capture, as with no
// exemption at all.
func openConnections() (openFlows, error) {
	conns, err := sockets()
	if err != nil {
		return openFlows{}, err
	}
	var out openFlows
	seen := map[string]bool{}
	for _, c := range conns {
		key := flowKey(c.Local, c.Remote)
		if seen[string(key)] {
			continue
		}
		seen[string(key)] = true
		if c.Local.Addr().Is4() {
			out.v4 = append(out.v4, nftables.SetElement{Key: key})
		} else {
			out.v6 = append(out.v6, nftables.SetElement{Key: key})
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
