package capture

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"syscall"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// ErrResetUnsupported: the kernel cannot abort sockets through sock_diag
// (CONFIG_INET_DIAG_DESTROY is off).
var ErrResetUnsupported = errors.New("capture: the kernel cannot reset sockets (no SOCK_DESTROY)")

// Drain switches the capture rules of the current network namespace to
// their draining form, for a pod that leaves the mesh. No new connection
// is captured any more. Connections already captured keep their
// translation and reply routing, so that ztunnel can drain them, and a
// packet of one that lost its conntrack entry is still sent back to
// ztunnel (and reset there) rather than on to its original destination.
//
// Remove must wait until the captured connections are over: once the
// rules are gone, a captured connection's next packet leaves the pod
// untranslated — in plaintext, to its original destination. Drain
// returns the pod's connections that may be captured (every connection
// but those open before the first Install and those over loopback),
// for the caller to wait for with StillOpen and, past a deadline, to end
// with Reset. Without installed rules Drain does nothing and returns no
// connection.
func Drain() ([]Conn, error) {
	installed, err := drainTable()
	if err != nil {
		return nil, fmt.Errorf("capture: nftables: %w", err)
	}
	if !installed {
		return nil, nil
	}
	// Listed after the switch: a connection opened before it is captured
	// and listed; one opened after it is direct (and listed only if it
	// came in between, which costs nothing but a wait).
	conns, err := sockets()
	if err != nil {
		return nil, fmt.Errorf("capture: %w", err)
	}
	c, err := newConn()
	if err != nil {
		return nil, err
	}
	open, _, err := installedOpenFlows(c)
	if err != nil {
		return nil, fmt.Errorf("capture: %w", err)
	}
	pre := map[string]bool{}
	for _, e := range append(open.v4, open.v6...) {
		pre[string(e.Key)] = true
	}
	local, err := localAddrs()
	if err != nil {
		return nil, fmt.Errorf("capture: %w", err)
	}
	var out []Conn
	for _, cn := range conns {
		if pre[string(flowKey(cn.Local, cn.Remote))] || cn.Remote.Addr().IsLoopback() || local[cn.Remote.Addr()] {
			continue
		}
		out = append(out, cn)
	}
	return out, nil
}

// localAddrs returns the addresses of the current network namespace:
// connections to them go over loopback and are never captured.
func localAddrs() (map[netip.Addr]bool, error) {
	h, err := netlink.NewHandle(unix.NETLINK_ROUTE)
	if err != nil {
		return nil, fmt.Errorf("netlink: %w", err)
	}
	defer h.Close()
	addrs, err := h.AddrList(nil, netlink.FAMILY_ALL)
	if err != nil {
		return nil, fmt.Errorf("list addresses: %w", err)
	}
	out := map[netip.Addr]bool{}
	for _, a := range addrs {
		if ip, ok := netip.AddrFromSlice(a.IP); ok {
			out[ip.Unmap()] = true
		}
	}
	return out, nil
}

// StillOpen returns those of conns whose sockets are still open in the
// current network namespace (listed by Drain there).
func StillOpen(conns []Conn) ([]Conn, error) {
	if len(conns) == 0 {
		return nil, nil
	}
	now, err := sockets()
	if err != nil {
		return nil, fmt.Errorf("capture: %w", err)
	}
	type id struct {
		family uint8
		cookie [2]uint32
		local  netip.AddrPort
		remote netip.AddrPort
	}
	present := map[id]bool{}
	for _, c := range now {
		present[id{c.family, c.cookie, c.Local, c.Remote}] = true
	}
	var out []Conn
	for _, c := range conns {
		if present[id{c.family, c.cookie, c.Local, c.Remote}] {
			out = append(out, c)
		}
	}
	return out, nil
}

// Reset aborts the sockets of conns in the current network namespace
// (sock_diag SOCK_DESTROY): each fails with ECONNABORTED and its peer
// gets a reset. Sockets already gone are skipped. It returns
// ErrResetUnsupported when the kernel cannot do it.
func Reset(conns []Conn) error {
	if len(conns) == 0 {
		return nil
	}
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.NETLINK_INET_DIAG)
	if err != nil {
		return fmt.Errorf("capture: sock_diag: %w", err)
	}
	defer unix.Close(fd)
	if err := unix.Bind(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return fmt.Errorf("capture: sock_diag: %w", err)
	}
	var errs []error
	buf := make([]byte, 4096)
	for i, c := range conns {
		seq := uint32(i + 1)
		if err := unix.Sendto(fd, destroyRequest(c, seq), 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
			return fmt.Errorf("capture: reset %s: %w", c, err)
		}
		n, _, err := unix.Recvfrom(fd, buf, 0)
		if err != nil {
			return fmt.Errorf("capture: reset %s: %w", c, err)
		}
		err = ackError(buf[:n])
		switch {
		case err == nil, errors.Is(err, unix.ENOENT):
		case errors.Is(err, unix.EOPNOTSUPP):
			return ErrResetUnsupported
		default:
			errs = append(errs, fmt.Errorf("capture: reset %s: %w", c, err))
		}
	}
	return errors.Join(errs...)
}

// destroyRequest is a SOCK_DESTROY netlink message for c: an nlmsghdr
// then an inet_diag_req_v2 naming the socket (family, addresses as the
// socket has them, ports, cookie).
func destroyRequest(c Conn, seq uint32) []byte {
	const reqLen = 56 // sizeof(struct inet_diag_req_v2)
	b := make([]byte, unix.NLMSG_HDRLEN+reqLen)
	ne := binary.NativeEndian
	ne.PutUint32(b[0:], uint32(len(b)))
	ne.PutUint16(b[4:], unix.SOCK_DESTROY)
	ne.PutUint16(b[6:], unix.NLM_F_REQUEST|unix.NLM_F_ACK)
	ne.PutUint32(b[8:], seq)
	r := b[unix.NLMSG_HDRLEN:]
	r[0] = c.family
	r[1] = unix.IPPROTO_TCP
	ne.PutUint32(r[4:], 0xffffffff) // any state
	binary.BigEndian.PutUint16(r[8:], c.Local.Port())
	binary.BigEndian.PutUint16(r[10:], c.Remote.Port())
	addr := func(a netip.Addr) []byte {
		if c.family == unix.AF_INET6 {
			s := a.As16() // v4-mapped for an IPv4 peer of an IPv6 socket
			return s[:]
		}
		s := a.As4()
		return s[:]
	}
	copy(r[12:28], addr(c.Local.Addr()))
	copy(r[28:44], addr(c.Remote.Addr()))
	// r[44:48] interface: any
	ne.PutUint32(r[48:], c.cookie[0])
	ne.PutUint32(r[52:], c.cookie[1])
	return b
}

// ackError decodes the kernel's answer to one request: nil for an ack,
// the errno of an error.
func ackError(b []byte) error {
	msgs, err := syscall.ParseNetlinkMessage(b)
	if err != nil {
		return fmt.Errorf("parse answer: %w", err)
	}
	for _, m := range msgs {
		if m.Header.Type != unix.NLMSG_ERROR {
			continue
		}
		if len(m.Data) < 4 {
			return errors.New("short netlink error message")
		}
		if code := int32(binary.NativeEndian.Uint32(m.Data)); code != 0 {
			return syscall.Errno(-code)
		}
		return nil
	}
	return errors.New("no ack in the answer")
}
