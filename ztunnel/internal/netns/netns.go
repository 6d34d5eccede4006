// Package netns opens sockets inside other network namespaces: listeners
// and outgoing connections of a pod, created on a locked OS thread that
// enters the pod's namespace with setns(2) and leaves it before the thread
// is given back to the Go scheduler. Sockets keep the namespace they were
// created in, so once open they are used from any goroutine.
//
// It also carries the socket options ztunnel needs: SO_MARK (so that the
// pod's capture rules skip ztunnel's own traffic), SO_REUSEPORT (so that a
// restarted ztunnel binds while the old one drains) and IP_TRANSPARENT (to
// connect to the application with the original client's source address).
package netns

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"runtime"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Namespace is an open network namespace.
type Namespace struct {
	f     *os.File
	inode uint64
	// home is the namespace of the process's threads (any thread not
	// inside Do), where Do returns its thread. Kept open: opening it for
	// every Do costs more than the two setns calls.
	home *os.File
}

// FromFile takes ownership of an open network namespace file (from
// /proc/<pid>/ns/net, a bind mount, or an SCM_RIGHTS descriptor). It must
// not be called from inside Do.
func FromFile(f *os.File) (*Namespace, error) {
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		f.Close()
		return nil, fmt.Errorf("stat netns: %w", err)
	}
	var fs unix.Statfs_t
	if err := unix.Fstatfs(int(f.Fd()), &fs); err != nil {
		f.Close()
		return nil, fmt.Errorf("statfs netns: %w", err)
	}
	if fs.Type != unix.NSFS_MAGIC {
		f.Close()
		return nil, fmt.Errorf("netns: %s is not a namespace file (fs type %#x)", f.Name(), fs.Type)
	}
	home, err := os.Open("/proc/thread-self/ns/net")
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("open own netns: %w", err)
	}
	return &Namespace{f: f, inode: st.Ino, home: home}, nil
}

// Open opens a network namespace by path.
func Open(path string) (*Namespace, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("open netns: %w", err)
	}
	return FromFile(f)
}

// Inode identifies the namespace: two files of one namespace have the same
// inode.
func (n *Namespace) Inode() uint64 { return n.inode }

// Close closes the namespace file. Sockets opened in it stay usable.
func (n *Namespace) Close() error {
	n.home.Close()
	return n.f.Close()
}

// Do runs fn on a locked OS thread inside the namespace. If the thread
// cannot return to the process's namespace it is left locked, so the Go
// runtime destroys it when fn's goroutine exits.
func (n *Namespace) Do(fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		if err := unix.Setns(int(n.f.Fd()), unix.CLONE_NEWNET); err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("setns: %w", err)
			return
		}
		ferr := fn()
		if err := unix.Setns(int(n.home.Fd()), unix.CLONE_NEWNET); err != nil {
			// Keep the thread locked: it dies with this goroutine.
			errc <- errors.Join(ferr, fmt.Errorf("setns back: %w", err))
			return
		}
		runtime.UnlockOSThread()
		errc <- ferr
	}()
	return <-errc
}

// SockOpts are the options set on a socket before bind/connect.
type SockOpts struct {
	// Mark is SO_MARK (0 = unset).
	Mark uint32
	// ReusePort sets SO_REUSEPORT.
	ReusePort bool
	// Transparent sets IP_TRANSPARENT / IPV6_TRANSPARENT.
	Transparent bool
}

func (o SockOpts) control(network, _ string, c syscall.RawConn) error {
	var serr error
	err := c.Control(func(fd uintptr) {
		s := int(fd)
		if o.Mark != 0 {
			if serr = unix.SetsockoptInt(s, unix.SOL_SOCKET, unix.SO_MARK, int(o.Mark)); serr != nil {
				serr = fmt.Errorf("SO_MARK: %w", serr)
				return
			}
		}
		if o.ReusePort {
			if serr = unix.SetsockoptInt(s, unix.SOL_SOCKET, unix.SO_REUSEPORT, 1); serr != nil {
				serr = fmt.Errorf("SO_REUSEPORT: %w", serr)
				return
			}
		}
		if o.Transparent {
			if network == "tcp6" {
				serr = unix.SetsockoptInt(s, unix.SOL_IPV6, unix.IPV6_TRANSPARENT, 1)
			} else {
				serr = unix.SetsockoptInt(s, unix.SOL_IP, unix.IP_TRANSPARENT, 1)
			}
			if serr != nil {
				serr = fmt.Errorf("IP_TRANSPARENT: %w", serr)
				return
			}
			// Pick the local port at connect time, so that many
			// connections from one client address share ports by 4-tuple.
			_ = unix.SetsockoptInt(s, unix.SOL_IP, unix.IP_BIND_ADDRESS_NO_PORT, 1)
		}
	})
	if err != nil {
		return err
	}
	return serr
}

// Listen opens a TCP listener on addr inside the namespace (nil n: the
// current namespace).
func (n *Namespace) Listen(ctx context.Context, network, addr string, o SockOpts) (net.Listener, error) {
	lc := net.ListenConfig{Control: o.control}
	var ln net.Listener
	listen := func() error {
		var err error
		ln, err = lc.Listen(ctx, network, addr)
		return err
	}
	var err error
	if n == nil {
		err = listen()
	} else {
		err = n.Do(listen)
	}
	if err != nil {
		return nil, fmt.Errorf("listen %s: %w", addr, err)
	}
	return ln, nil
}

// Dial opens a TCP connection from inside the namespace (nil n: the current
// namespace). A valid local address is bound first (with Transparent, any
// address, for example the original client's).
//
// Only the socket is created on a thread inside the namespace (a socket
// belongs to the namespace it was created in); binding and connecting
// happen on the caller's goroutine like any non-blocking connect. Waiting
// for the connection on the locked thread instead would cost two thread
// handoffs per dial.
func (n *Namespace) Dial(ctx context.Context, network, addr string, local netip.Addr, o SockOpts) (net.Conn, error) {
	if n == nil {
		return dialer(local, o).DialContext(ctx, network, addr)
	}
	raddr, err := netip.ParseAddrPort(addr)
	if err != nil || (network != "tcp" && network != "tcp4" && network != "tcp6") {
		// Names to resolve, other networks: all of it inside.
		var c net.Conn
		err := n.Do(func() error {
			var err error
			c, err = dialer(local, o).DialContext(ctx, network, addr)
			return err
		})
		return c, err
	}
	c, err := n.dialTCP(ctx, network, netip.AddrPortFrom(raddr.Addr().Unmap(), raddr.Port()), local.Unmap(), o)
	if err != nil {
		return nil, &net.OpError{Op: "dial", Net: network, Addr: net.TCPAddrFromAddrPort(raddr), Err: err}
	}
	return c, nil
}

func dialer(local netip.Addr, o SockOpts) *net.Dialer {
	d := &net.Dialer{Control: o.control}
	if local.IsValid() {
		d.LocalAddr = &net.TCPAddr{IP: local.AsSlice()}
	}
	return d
}

func (n *Namespace) dialTCP(ctx context.Context, network string, raddr netip.AddrPort, local netip.Addr, o SockOpts) (net.Conn, error) {
	family, sockNet := unix.AF_INET6, "tcp6"
	if raddr.Addr().Is4() && (!local.IsValid() || local.Is4()) && network != "tcp6" {
		family, sockNet = unix.AF_INET, "tcp4"
	}
	if (network == "tcp4" && family != unix.AF_INET) || (local.IsValid() && local.Is4() != raddr.Addr().Is4()) {
		return nil, fmt.Errorf("address families of %s and %s do not match %s", local, raddr, network)
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	fd := -1
	if err := n.Do(func() error {
		var err error
		fd, err = unix.Socket(family, unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, unix.IPPROTO_TCP)
		return os.NewSyscallError("socket", err)
	}); err != nil {
		return nil, err
	}
	f := os.NewFile(uintptr(fd), "tcp") // non-blocking: registered with the runtime poller
	defer f.Close()                     // FileConn below holds its own descriptor
	rc, err := f.SyscallConn()
	if err != nil {
		return nil, err
	}
	var cerr error
	if err := o.control(sockNet, "", rc); err != nil {
		return nil, err
	}
	if err := rc.Control(func(fd uintptr) {
		if local.IsValid() {
			if cerr = unix.Bind(int(fd), sockaddr(netip.AddrPortFrom(local, 0))); cerr != nil {
				cerr = os.NewSyscallError("bind", cerr)
				return
			}
		}
		cerr = unix.Connect(int(fd), sockaddr(raddr))
	}); err != nil {
		return nil, err
	}
	switch cerr {
	case nil:
	case unix.EINPROGRESS, unix.EALREADY, unix.EINTR:
		if cerr = waitConnect(ctx, f, rc); cerr != nil {
			return nil, cerr
		}
	default:
		var errno unix.Errno
		if errors.As(cerr, &errno) {
			cerr = os.NewSyscallError("connect", errno)
		}
		return nil, cerr
	}
	return net.FileConn(f)
}

// waitConnect waits until the non-blocking connect of f's socket ends,
// or ctx does.
func waitConnect(ctx context.Context, f *os.File, rc syscall.RawConn) error {
	if d, ok := ctx.Deadline(); ok {
		_ = f.SetWriteDeadline(d)
	}
	stop := context.AfterFunc(ctx, func() { _ = f.SetWriteDeadline(time.Unix(1, 0)) })
	defer stop()
	var cerr error
	err := rc.Write(func(fd uintptr) bool {
		v, err := unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_ERROR)
		if err != nil {
			cerr = os.NewSyscallError("getsockopt", err)
			return true
		}
		switch errno := unix.Errno(v); errno {
		case 0:
			// Writable without an error: connected, unless the wake-up
			// came before the connect ended.
			_, err := unix.Getpeername(int(fd))
			return err == nil
		case unix.EINPROGRESS, unix.EALREADY, unix.EINTR:
			return false
		default:
			cerr = os.NewSyscallError("connect", errno)
			return true
		}
	})
	if err != nil {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if errors.Is(err, os.ErrDeadlineExceeded) {
			return context.DeadlineExceeded
		}
		return err
	}
	return cerr
}

func sockaddr(ap netip.AddrPort) unix.Sockaddr {
	if ap.Addr().Is4() {
		return &unix.SockaddrInet4{Addr: ap.Addr().As4(), Port: int(ap.Port())}
	}
	return &unix.SockaddrInet6{Addr: ap.Addr().As16(), Port: int(ap.Port())}
}

// Mark returns a connection's SO_MARK.
func Mark(c net.Conn) (uint32, error) {
	sc, ok := c.(syscall.Conn)
	if !ok {
		return 0, fmt.Errorf("mark: %T has no file descriptor", c)
	}
	raw, err := sc.SyscallConn()
	if err != nil {
		return 0, err
	}
	var m int
	var serr error
	if err := raw.Control(func(fd uintptr) { m, serr = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_MARK) }); err != nil {
		return 0, err
	}
	return uint32(m), serr
}
