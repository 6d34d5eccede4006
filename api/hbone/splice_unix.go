//go:build unix

package hbone

import (
	"io"
	"net"
	"os"
	"syscall"
)

// copyReady copies from a TCP socket, taking a buffer from the pool only
// once the socket is readable (the runtime poller waits without one).
func copyReady(dst io.Writer, tc *net.TCPConn) (total int64, handled bool, err error) {
	raw, err := tc.SyscallConn()
	if err != nil {
		return 0, false, nil
	}
	size := readySize
	if _, ok := dst.(*Stream); ok {
		size = streamReadSize
	}
	for {
		var (
			bp   *[]byte
			n    int
			rerr error
		)
		err := raw.Read(func(fd uintptr) bool {
			bp = readyPool.Get().(*[]byte)
			n, rerr = syscall.Read(int(fd), (*bp)[:size])
			if rerr == syscall.EAGAIN {
				readyPool.Put(bp)
				bp = nil
				return false
			}
			return true
		})
		if err == nil && rerr != nil {
			if rerr == syscall.EINTR {
				if bp != nil {
					readyPool.Put(bp)
				}
				continue
			}
			err = os.NewSyscallError("read", rerr)
		}
		if n > 0 && bp != nil {
			w, werr := dst.Write((*bp)[:n])
			total += int64(w)
			readyPool.Put(bp)
			if werr != nil {
				return total, true, werr
			}
			continue
		}
		if bp != nil {
			readyPool.Put(bp)
		}
		if err != nil {
			return total, true, err
		}
		return total, true, nil // EOF
	}
}
