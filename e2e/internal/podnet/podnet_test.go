package podnet

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"testing"

	"github.com/vishvananda/netlink"
	vnetns "github.com/vishvananda/netns"

	"github.com/amesh-dev/amesh/e2e/internal/netns"
)

// inNetns runs f on a thread inside the network namespace at path (CNI
// plugins run in the caller's namespace, as they do under a node agent).
func inNetns(t *testing.T, path string, f func()) {
	t.Helper()
	done := make(chan struct{})
	go func() {
		defer close(done)
		runtime.LockOSThread() // never unlocked: the thread is discarded
		h, err := vnetns.GetFromPath(path)
		if err != nil {
			t.Error(err)
			return
		}
		defer h.Close()
		if err := vnetns.Set(h); err != nil {
			t.Error(err)
			return
		}
		f()
	}()
	<-done
}

func TestRealChainAddDel(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: network namespaces and the reference CNI plugins")
	}
	if _, err := os.Stat("/usr/lib/cni/bridge"); err != nil {
		t.Skip("needs the reference CNI plugins in /usr/lib/cni (Debian containernetworking-plugins)")
	}
	tag := fmt.Sprintf("amt-%06x", rand.IntN(1<<24))
	nodePath, err := netns.Create(netns.DefaultDir, tag+"-node")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = netns.Delete(netns.DefaultDir, tag+"-node") })
	podPath, err := netns.Create(netns.DefaultDir, tag+"-pod")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = netns.Delete(netns.DefaultDir, tag+"-pod") })

	confDir, dataDir := t.TempDir(), t.TempDir()
	conf := fmt.Sprintf(`{"cniVersion":"1.0.0","name":"test","plugins":[{"type":"bridge","bridge":"cni0","isGateway":true,
	  "ipam":{"type":"host-local","dataDir":%q,"ranges":[[{"subnet":"10.77.1.0/24"}]]}}]}`, dataDir)
	if err := os.WriteFile(filepath.Join(confDir, "20-test.conflist"), []byte(conf), 0o644); err != nil {
		t.Fatal(err)
	}
	// A broken file sorting later must not matter; an earlier one would be
	// skipped with its error kept for the report.
	if err := os.WriteFile(filepath.Join(confDir, "30-broken.conflist"), []byte("{"), 0o644); err != nil {
		t.Fatal(err)
	}
	n := New(confDir, []string{"/usr/lib/cni"}, t.TempDir())
	pod := Pod{Namespace: "ns", Name: "p", UID: "uid-1", ID: "sandbox-1", Netns: podPath}
	ctx := context.Background()
	var ips []netip.Addr
	inNetns(t, nodePath, func() {
		ips, err = n.Add(ctx, pod)
	})
	if err != nil {
		t.Fatalf("ADD: %v", err)
	}
	if len(ips) != 1 || !netip.MustParsePrefix("10.77.1.0/24").Contains(ips[0]) {
		t.Fatalf("pod IPs %v, want one in 10.77.1.0/24", ips)
	}
	if _, err := os.Stat(filepath.Join(dataDir, "test", ips[0].String())); err != nil {
		t.Errorf("host-local did not record the allocation: %v", err)
	}
	ph, err := vnetns.GetFromPath(podPath)
	if err != nil {
		t.Fatal(err)
	}
	defer ph.Close()
	h, err := netlink.NewHandleAt(ph)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	eth, err := h.LinkByName("eth0")
	if err != nil {
		t.Fatalf("no eth0 in the pod: %v", err)
	}
	addrs, _ := h.AddrList(eth, netlink.FAMILY_V4)
	if len(addrs) != 1 || addrs[0].IP.String() != ips[0].String() {
		t.Errorf("eth0 addresses %v, want %s", addrs, ips[0])
	}
	if lo, err := h.LinkByName("lo"); err != nil || lo.Attrs().Flags&1 == 0 {
		t.Errorf("lo not up in the pod (%v)", err)
	}

	inNetns(t, nodePath, func() {
		for i := range 2 { // DEL is idempotent
			if err := n.Del(ctx, pod); err != nil {
				t.Errorf("DEL #%d: %v", i+1, err)
			}
		}
		gone := pod
		gone.Netns = "" // DEL after the namespace is gone
		if err := n.Del(ctx, gone); err != nil {
			t.Errorf("DEL without netns: %v", err)
		}
	})
	if _, err := h.LinkByName("eth0"); err == nil {
		t.Error("eth0 still in the pod after DEL")
	}
	if _, err := os.Stat(filepath.Join(dataDir, "test", ips[0].String())); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("IP still allocated after DEL: %v", err)
	}
}

func TestConfigSelection(t *testing.T) {
	dir := t.TempDir()
	n := New(dir, []string{"/usr/lib/cni"}, t.TempDir())
	if _, err := n.Config(); !errors.Is(err, ErrNoConfig) {
		t.Fatalf("empty dir: %v, want ErrNoConfig", err)
	}
	write := func(name, body string) {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write("05-broken.conflist", "{not json")
	write("10-single.conf", `{"cniVersion":"1.0.0","name":"single","type":"bridge"}`)
	write("20-list.conflist", `{"cniVersion":"1.0.0","name":"list","plugins":[{"type":"bridge"},{"type":"portmap"}]}`)
	list, err := n.Config()
	if err != nil {
		t.Fatal(err)
	}
	if list.Name != "single" || len(list.Plugins) != 1 || list.Plugins[0].Network.Type != "bridge" {
		t.Errorf("picked %s with %d plugins, want the first valid file (single .conf as a list of one)", list.Name, len(list.Plugins))
	}
	os.Remove(filepath.Join(dir, "10-single.conf"))
	if list, err = n.Config(); err != nil || list.Name != "list" || pluginTypes(list) != "bridge→portmap" {
		t.Errorf("picked %v (%v), want the chained list", list, err)
	}
}
