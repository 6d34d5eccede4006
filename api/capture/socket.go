package capture

import (
	"encoding/binary"
	"fmt"
	"net/netip"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// soOriginalDst is SO_ORIGINAL_DST (IPv4) and IP6T_SO_ORIGINAL_DST (IPv6);
// both are 80.
const soOriginalDst = 80

// OriginalDestination returns the address a redirected TCP connection was
// originally sent to (SO_ORIGINAL_DST, from conntrack). c is typically a
// *net.TCPConn accepted on OutboundPort or InboundPlaintextPort.
func OriginalDestination(c syscall.Conn) (netip.AddrPort, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("capture: original destination: %w", err)
	}
	var (
		dst  netip.AddrPort
		serr error
	)
	err = rc.Control(func(fd uintptr) {
		dst, serr = originalDst(int(fd))
	})
	if err == nil {
		err = serr
	}
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("capture: original destination: %w", err)
	}
	return dst, nil
}

func originalDst(fd int) (netip.AddrPort, error) {
	sa, err := unix.Getsockname(fd)
	if err != nil {
		return netip.AddrPort{}, err
	}
	var buf [unix.SizeofSockaddrInet6]byte
	// IPv4 connections accepted on a dual-stack IPv6 socket carry
	// v4-mapped addresses and an IPv4 conntrack entry: ask the IPv4 way.
	level := unix.SOL_IP
	if sa6, ok := sa.(*unix.SockaddrInet6); ok && !netip.AddrFrom16(sa6.Addr).Is4In6() {
		level = unix.SOL_IPV6
	}
	n := uint32(len(buf))
	_, _, errno := unix.Syscall6(unix.SYS_GETSOCKOPT, uintptr(fd), uintptr(level), soOriginalDst,
		uintptr(unsafe.Pointer(&buf[0])), uintptr(unsafe.Pointer(&n)), 0)
	if errno != 0 {
		return netip.AddrPort{}, errno
	}
	// struct sockaddr_in{,6}: family (host order), port (network order), ...
	port := binary.BigEndian.Uint16(buf[2:4])
	switch fam := binary.NativeEndian.Uint16(buf[0:2]); fam {
	case unix.AF_INET:
		return netip.AddrPortFrom(netip.AddrFrom4([4]byte(buf[4:8])), port), nil
	case unix.AF_INET6:
		return netip.AddrPortFrom(netip.AddrFrom16([16]byte(buf[8:24])).Unmap(), port), nil
	default:
		return netip.AddrPort{}, fmt.Errorf("unexpected address family %d", fam)
	}
}

// MarkSocket is a net.Dialer / net.ListenConfig Control function that puts
// Mark on the socket, so that the capture rules leave it alone. ztunnel
// uses it for every socket it opens inside a pod's network namespace.
func MarkSocket(_, _ string, c syscall.RawConn) error {
	var serr error
	if err := c.Control(func(fd uintptr) {
		serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_MARK, Mark)
	}); err != nil {
		return fmt.Errorf("capture: mark socket: %w", err)
	}
	if serr != nil {
		return fmt.Errorf("capture: mark socket: %w", serr)
	}
	return nil
}
