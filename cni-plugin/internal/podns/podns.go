// Package podns finds, opens and enters pod network namespaces.
//
// Mapping a pod to its network namespace: the CNI ADD hands the agent the
// sandbox's netns path (for example /var/run/netns/cni-…), which the
// agent opens and keeps. For pods that started before the agent (or whose
// ADD the agent missed), FindByIP scans /proc/*/ns/net, visits every
// distinct namespace once and picks the one that holds the pod's IP on a
// non-loopback interface. That works with any runtime that puts the pod's
// processes in the namespace the CNI chain configured, including the local
// cluster's node agent.
package podns

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// ErrNotFound: no network namespace holds the address.
var ErrNotFound = errors.New("no network namespace holds the pod's address")

// Open opens a network namespace by path and checks that it is one. The
// returned file refers to the namespace through the calling thread's
// /proc/thread-self/ns/net while inside it, not through path: holding it
// does not pin the runtime's bind mount at path (which would make the
// runtime's unmount fail with EBUSY when the sandbox goes away).
func Open(path string) (*os.File, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("podns: %w", err)
	}
	defer f.Close()
	var st unix.Statfs_t
	if err := unix.Fstatfs(int(f.Fd()), &st); err != nil {
		return nil, fmt.Errorf("podns: statfs %s: %w", path, err)
	}
	if st.Type != unix.NSFS_MAGIC && st.Type != unix.PROC_SUPER_MAGIC {
		return nil, fmt.Errorf("podns: %s is not a network namespace", path)
	}
	var out *os.File
	if err := Do(f, func() (err error) {
		out, err = os.Open("/proc/thread-self/ns/net")
		return err
	}); err != nil {
		return nil, fmt.Errorf("podns: %s: %w", path, err)
	}
	return out, nil
}

// Do runs fn with the calling goroutine's OS thread inside the namespace f
// (locked for the duration; restored afterwards).
func Do(f *os.File, fn func() error) error {
	n, err := ns.GetNS(fmt.Sprintf("/proc/self/fd/%d", f.Fd()))
	if err != nil {
		return fmt.Errorf("podns: %w", err)
	}
	defer n.Close()
	return n.Do(func(ns.NetNS) error { return fn() })
}

// Inode identifies a namespace (device and inode of its nsfs file).
type Inode struct{ Dev, Ino uint64 }

// InodeOf returns the identity of the namespace file f.
func InodeOf(f *os.File) (Inode, error) {
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		return Inode{}, err
	}
	return Inode{st.Dev, st.Ino}, nil
}

// Holds reports whether the namespace f has one of ips on a non-loopback
// interface.
func Holds(f *os.File, ips []netip.Addr) (bool, error) {
	found := false
	err := Do(f, func() error {
		addrs, err := netlink.AddrList(nil, netlink.FAMILY_ALL)
		if err != nil {
			return err
		}
		for _, a := range addrs {
			ip, ok := netip.AddrFromSlice(a.IP)
			if !ok || ip.IsLoopback() {
				continue
			}
			for _, want := range ips {
				if ip.Unmap() == want.Unmap() {
					found = true
				}
			}
		}
		return nil
	})
	return found, err
}

// FindByIP returns the network namespace, among those of the processes in
// procRoot ("/proc"), that holds one of ips. Namespaces identical to
// exclude (the host's) are skipped.
func FindByIP(procRoot string, ips []netip.Addr, exclude *os.File) (*os.File, error) {
	if len(ips) == 0 {
		return nil, fmt.Errorf("podns: %w: pod has no IP", ErrNotFound)
	}
	seen := map[Inode]bool{}
	if exclude != nil {
		if id, err := InodeOf(exclude); err == nil {
			seen[id] = true
		}
	}
	entries, err := os.ReadDir(procRoot)
	if err != nil {
		return nil, fmt.Errorf("podns: %w", err)
	}
	for _, e := range entries {
		if _, err := strconv.Atoi(e.Name()); err != nil {
			continue
		}
		f, err := os.Open(filepath.Join(procRoot, e.Name(), "ns", "net"))
		if err != nil {
			continue // process gone or not ours to see
		}
		id, err := InodeOf(f)
		if err != nil || seen[id] {
			f.Close()
			continue
		}
		seen[id] = true
		if ok, err := Holds(f, ips); err == nil && ok {
			return f, nil
		}
		f.Close()
	}
	return nil, fmt.Errorf("podns: %w (%v)", ErrNotFound, ips)
}
