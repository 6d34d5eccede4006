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

	"golang.org/x/sys/unix"
)

// Namespace is an open network namespace.
type Namespace struct {
	f     *os.File
	inode uint64
}

// FromFile takes ownership of an open network namespace file (from
// /proc/<pid>/ns/net, a bind mount, or an SCM_RIGHTS descriptor).
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
	return &Namespace{f: f, inode: st.Ino}, nil
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
func (n *Namespace) Close() error { return n.f.Close() }

// Do runs fn on a locked OS thread inside the namespace. If the thread
// cannot return to its original namespace it is left locked, so the Go
// runtime destroys it when fn's goroutine exits.
func (n *Namespace) Do(fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := os.Open(fmt.Sprintf("/proc/self/task/%d/ns/net", unix.Gettid()))
		if err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("open current netns: %w", err)
			return
		}
		defer orig.Close()
		if err := unix.Setns(int(n.f.Fd()), unix.CLONE_NEWNET); err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("setns: %w", err)
			return
		}
		ferr := fn()
		if err := unix.Setns(int(orig.Fd()), unix.CLONE_NEWNET); err != nil {
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
func (n *Namespace) Dial(ctx context.Context, network, addr string, local netip.Addr, o SockOpts) (net.Conn, error) {
	d := net.Dialer{Control: o.control}
	if local.IsValid() {
		d.LocalAddr = &net.TCPAddr{IP: local.AsSlice()}
	}
	var c net.Conn
	dial := func() error {
		var err error
		c, err = d.DialContext(ctx, network, addr)
		return err
	}
	var err error
	if n == nil {
		err = dial()
	} else {
		err = n.Do(dial)
	}
	if err != nil {
		return nil, err
	}
	return c, nil
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
