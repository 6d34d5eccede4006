// Package zds is the transport of the node agent ↔ ztunnel protocol (ZDS,
// messages in package zdsv1): a unix SOCK_SEQPACKET socket carrying exactly
// one protobuf message per packet, with a pod's network-namespace file
// descriptor passed as SCM_RIGHTS ancillary data beside AgentMessage.add.
//
// The node agent listens (Listen, Accept) and sends AgentMessages; ztunnel
// dials (Dial) and sends ZtunnelMessages. Decoding is strict: a packet larger
// than MaxPacketSize, truncated ancillary data (MSG_CTRUNC), an unexpected or
// missing descriptor, a descriptor that is not a network namespace, an empty
// or malformed message are all errors, and every descriptor that arrived with
// a refused packet is closed — never leaked. A refused packet does not break
// the connection: the next Recv reads the next packet.
//
// The package is Linux-only.
//
// Deadlines (SetDeadline and friends) apply to Send and Recv as on net.Conn.
// A Conn may be used by one sender and one receiver concurrently.
package zds

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/proto"

	zdsv1 "github.com/amesh-dev/amesh/api/zds/v1"
)

// DefaultSocket is where the node agent listens and ztunnel dials.
const DefaultSocket = "/var/run/amesh/zds.sock"

// MaxPacketSize is the largest message this package sends or accepts. ZDS
// messages are a few hundred bytes; the bound keeps a broken peer from making
// the receiver allocate.
const MaxPacketSize = 16 << 10

// maxFDs is how many descriptors one receive has room for. A valid packet
// carries at most one; room for a few more lets Recv see (and close) extras
// instead of having the kernel truncate the control message.
const maxFDs = 4

var (
	// ErrTooLarge: the packet exceeded MaxPacketSize (its tail was discarded
	// by the kernel).
	ErrTooLarge = errors.New("packet larger than the maximum size")
	// ErrControlTruncated: the ancillary data did not fit (MSG_CTRUNC); the
	// kernel dropped some of it.
	ErrControlTruncated = errors.New("ancillary data truncated (MSG_CTRUNC)")
	// ErrUnexpectedFD: a descriptor arrived with a message that takes none,
	// or more than one arrived.
	ErrUnexpectedFD = errors.New("unexpected file descriptor")
	// ErrMissingFD: an add arrived without its network-namespace descriptor.
	ErrMissingFD = errors.New("add without a network namespace descriptor")
	// ErrNotNetns: the descriptor is not a network namespace.
	ErrNotNetns = errors.New("descriptor is not a network namespace")
	// ErrInvalidMessage: the message does not decode or is not well formed
	// (no payload, empty uid…).
	ErrInvalidMessage = errors.New("invalid message")
)

// Listener accepts ZDS connections on a unix SOCK_SEQPACKET socket.
type Listener struct {
	ul *net.UnixListener
}

// Listen listens on path. The socket's directory is created if missing. A
// stale socket file left by a previous process is replaced; a socket someone
// still listens on is not (Listen fails). The socket is made accessible to
// its owner only (mode 0600).
func Listen(path string) (*Listener, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, fmt.Errorf("zds: listen: %w", err)
	}
	if err := removeStale(path); err != nil {
		return nil, err
	}
	ul, err := net.ListenUnix("unixpacket", &net.UnixAddr{Name: path, Net: "unixpacket"})
	if err != nil {
		return nil, fmt.Errorf("zds: listen: %w", err)
	}
	if err := os.Chmod(path, 0o600); err != nil {
		_ = ul.Close()
		return nil, fmt.Errorf("zds: listen: %w", err)
	}
	return &Listener{ul: ul}, nil
}

// removeStale removes path if it is a socket nobody listens on.
func removeStale(path string) error {
	fi, err := os.Lstat(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("zds: listen: %w", err)
	}
	if fi.Mode()&os.ModeSocket == 0 {
		return fmt.Errorf("zds: listen: %s exists and is not a socket", path)
	}
	c, err := net.DialTimeout("unixpacket", path, time.Second)
	if err == nil {
		_ = c.Close()
		return fmt.Errorf("zds: listen: %s: %w", path, syscall.EADDRINUSE)
	}
	if !errors.Is(err, syscall.ECONNREFUSED) {
		return fmt.Errorf("zds: listen: probing %s: %w", path, err)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("zds: listen: removing stale socket: %w", err)
	}
	return nil
}

// Accept waits for the next connection. It fails with net.ErrClosed once the
// listener is closed.
func (l *Listener) Accept() (*Conn, error) {
	uc, err := l.ul.AcceptUnix()
	if err != nil {
		return nil, fmt.Errorf("zds: accept: %w", err)
	}
	return newConn(uc), nil
}

// Addr is the listening address.
func (l *Listener) Addr() net.Addr { return l.ul.Addr() }

// Close stops listening and removes the socket file.
func (l *Listener) Close() error { return l.ul.Close() }

// Dial connects to the node agent's socket at path.
func Dial(ctx context.Context, path string) (*Conn, error) {
	var d net.Dialer
	c, err := d.DialContext(ctx, "unixpacket", path)
	if err != nil {
		return nil, fmt.Errorf("zds: dial: %w", err)
	}
	return newConn(c.(*net.UnixConn)), nil
}

// Conn is one ZDS connection.
type Conn struct {
	uc *net.UnixConn

	sendMu sync.Mutex

	recvMu sync.Mutex
	buf    []byte
	oob    []byte
}

func newConn(uc *net.UnixConn) *Conn {
	return &Conn{
		uc:  uc,
		buf: make([]byte, MaxPacketSize),
		oob: make([]byte, unix.CmsgSpace(maxFDs*4)),
	}
}

// SendAgent sends one AgentMessage. netns must be the pod's network
// namespace for an add and nil for everything else. The caller keeps
// ownership of netns (SendAgent does not close it).
func (c *Conn) SendAgent(m *zdsv1.AgentMessage, netns *os.File) error {
	if err := validateAgent(m); err != nil {
		return fmt.Errorf("zds: send: %w", err)
	}
	isAdd := m.GetAdd() != nil
	switch {
	case isAdd && netns == nil:
		return fmt.Errorf("zds: send: %w", ErrMissingFD)
	case !isAdd && netns != nil:
		return fmt.Errorf("zds: send: %w: only add carries a network namespace", ErrUnexpectedFD)
	}
	var oob []byte
	if netns != nil {
		sc, err := netns.SyscallConn()
		if err != nil {
			return fmt.Errorf("zds: send: netns: %w", err)
		}
		var cerr error
		err = sc.Control(func(fd uintptr) {
			if cerr = checkNetns(int(fd)); cerr != nil {
				cerr = fmt.Errorf("zds: send: %w", cerr)
				return
			}
			oob = unix.UnixRights(int(fd))
			cerr = c.send(m, oob)
		})
		if err != nil {
			return fmt.Errorf("zds: send: netns: %w", err)
		}
		return cerr
	}
	return c.send(m, nil)
}

// SendZtunnel sends one ZtunnelMessage.
func (c *Conn) SendZtunnel(m *zdsv1.ZtunnelMessage) error {
	if err := validateZtunnel(m); err != nil {
		return fmt.Errorf("zds: send: %w", err)
	}
	return c.send(m, nil)
}

func (c *Conn) send(m proto.Message, oob []byte) error {
	b, err := proto.Marshal(m)
	if err != nil {
		return fmt.Errorf("zds: send: %w", err)
	}
	if len(b) > MaxPacketSize {
		return fmt.Errorf("zds: send: %d bytes: %w", len(b), ErrTooLarge)
	}
	c.sendMu.Lock()
	defer c.sendMu.Unlock()
	n, oobn, err := c.uc.WriteMsgUnix(b, oob, nil)
	if err != nil {
		return fmt.Errorf("zds: send: %w", err)
	}
	if n != len(b) || oobn != len(oob) {
		return fmt.Errorf("zds: send: short write (%d of %d bytes, %d of %d ancillary)", n, len(b), oobn, len(oob))
	}
	return nil
}

// RecvAgent reads the next AgentMessage. For an add, the returned file is the
// pod's network namespace and the caller owns it (must close it). An error
// other than a refused packet (errors.Is one of the package's Err values) is
// fatal for the connection; io.EOF means the peer closed.
func (c *Conn) RecvAgent() (*zdsv1.AgentMessage, *os.File, error) {
	c.recvMu.Lock()
	defer c.recvMu.Unlock()
	data, fds, flags, err := c.recv()
	if err != nil {
		return nil, nil, err
	}
	m, fd, err := decodeAgent(data, fds, flags, sysFD)
	if err != nil {
		return nil, nil, err
	}
	var f *os.File
	if fd >= 0 {
		f = os.NewFile(uintptr(fd), "netns:"+m.GetAdd().GetUid())
	}
	return m, f, nil
}

// RecvZtunnel reads the next ZtunnelMessage. Errors are as for RecvAgent.
func (c *Conn) RecvZtunnel() (*zdsv1.ZtunnelMessage, error) {
	c.recvMu.Lock()
	defer c.recvMu.Unlock()
	data, fds, flags, err := c.recv()
	if err != nil {
		return nil, err
	}
	return decodeZtunnel(data, fds, flags, sysFD)
}

// recv reads one packet. The returned data aliases c.buf.
func (c *Conn) recv() (data []byte, fds []int, flags int, err error) {
	n, oobn, flags, _, err := c.uc.ReadMsgUnix(c.buf, c.oob)
	if oobn > 0 {
		// Descriptors may have been installed even when the read reports an
		// error; own them before anything else.
		var perr error
		fds, perr = parseRights(c.oob[:oobn])
		if perr != nil && err == nil {
			err = perr
		}
	}
	if err != nil {
		closeAll(fds, sysFD)
		return nil, nil, 0, fmt.Errorf("zds: recv: %w", err)
	}
	return c.buf[:n], fds, flags, nil
}

// SetDeadline sets the read and write deadlines.
func (c *Conn) SetDeadline(t time.Time) error { return c.uc.SetDeadline(t) }

// SetReadDeadline sets the deadline for Recv.
func (c *Conn) SetReadDeadline(t time.Time) error { return c.uc.SetReadDeadline(t) }

// SetWriteDeadline sets the deadline for Send.
func (c *Conn) SetWriteDeadline(t time.Time) error { return c.uc.SetWriteDeadline(t) }

// Close closes the connection; a blocked Recv or Send returns.
func (c *Conn) Close() error { return c.uc.Close() }

// PeerCredentials returns the peer process's credentials (SO_PEERCRED) as
// the kernel recorded them at connect time.
func (c *Conn) PeerCredentials() (*unix.Ucred, error) {
	sc, err := c.uc.SyscallConn()
	if err != nil {
		return nil, fmt.Errorf("zds: peer credentials: %w", err)
	}
	var cred *unix.Ucred
	var cerr error
	if err := sc.Control(func(fd uintptr) {
		cred, cerr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return nil, fmt.Errorf("zds: peer credentials: %w", err)
	}
	if cerr != nil {
		return nil, fmt.Errorf("zds: peer credentials: %w", cerr)
	}
	return cred, nil
}
