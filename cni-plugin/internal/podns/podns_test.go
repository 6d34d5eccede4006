package podns

import (
	"errors"
	"net/netip"
	"os"
	"os/exec"
	"testing"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/containernetworking/plugins/pkg/testutils"
)

// TestFindByIP: a namespace with a process in it and the pod's IP on an
// interface is found through /proc; unknown IPs are not.
func TestFindByIP(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: creates network namespaces")
	}
	n, err := testutils.NewNS()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		n.Close()
		if err := testutils.UnmountNS(n); err != nil {
			t.Errorf("cleanup: %v", err)
		}
	})
	ip := netip.MustParseAddr("198.19.251.7")
	sleep := exec.Command("sleep", "60")
	if err := n.Do(func(ns.NetNS) error {
		for _, args := range [][]string{
			{"link", "add", "v0", "type", "veth", "peer", "name", "v1"},
			{"addr", "add", ip.String() + "/32", "dev", "v0"},
			{"link", "set", "v0", "up"},
		} {
			if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
				return errors.New(string(out))
			}
		}
		return sleep.Start()
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = sleep.Process.Kill(); _ = sleep.Wait() })

	host, err := os.Open("/proc/self/ns/net")
	if err != nil {
		t.Fatal(err)
	}
	defer host.Close()
	f, err := FindByIP("/proc", []netip.Addr{netip.MustParseAddr("fd00::1"), ip}, host)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	want, _ := os.Open(n.Path())
	defer want.Close()
	a, _ := InodeOf(f)
	b, _ := InodeOf(want)
	if a != b {
		t.Fatalf("found namespace %v, want %v", a, b)
	}
	if _, err := FindByIP("/proc", []netip.Addr{netip.MustParseAddr("198.19.251.8")}, host); !errors.Is(err, ErrNotFound) {
		t.Fatalf("unknown IP: %v, want ErrNotFound", err)
	}
	if _, err := Open("/etc/hostname"); err == nil {
		t.Fatal("Open accepted a regular file")
	}
}
