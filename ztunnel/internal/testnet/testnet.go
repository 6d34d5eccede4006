// Package testnet builds throw-away network namespaces, veth pairs and
// addresses for ztunnel's tests. Every namespace gets a random suffix and
// is deleted when the test ends; interfaces are created directly inside
// test namespaces, so nothing touches the host's interfaces.
package testnet

import (
	"crypto/rand"
	"encoding/hex"
	"os"
	"os/exec"
	"strings"
	"testing"

	"github.com/amesh-dev/amesh/ztunnel/internal/netns"
)

// RequireRoot skips the test unless it runs as root with the ip tool.
func RequireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: creates network namespaces")
	}
	if _, err := exec.LookPath("ip"); err != nil {
		t.Skip("needs the ip tool (iproute2)")
	}
}

// Suffix returns a short random string for unique names.
func Suffix() string {
	b := make([]byte, 4)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// NS is a named network namespace (ip netns).
type NS struct {
	Name string
	Path string
}

// NewNS creates a namespace named prefix-<random> with loopback up.
func NewNS(t testing.TB, prefix string) *NS {
	t.Helper()
	name := prefix + "-" + Suffix()
	Run(t, "ip", "netns", "add", name)
	n := &NS{Name: name, Path: "/run/netns/" + name}
	t.Cleanup(func() {
		// Kill anything a test left running in it, then delete it.
		if out, err := exec.Command("ip", "netns", "pids", name).Output(); err == nil {
			for _, p := range strings.Fields(string(out)) {
				_ = exec.Command("kill", "-9", p).Run()
			}
		}
		if out, err := exec.Command("ip", "netns", "del", name).CombinedOutput(); err != nil {
			t.Logf("ip netns del %s: %v: %s", name, err, out)
		}
	})
	n.Run(t, "ip", "link", "set", "lo", "up")
	return n
}

// Run runs a command in the namespace and fails the test on error.
func (n *NS) Run(t testing.TB, args ...string) string {
	t.Helper()
	return Run(t, append([]string{"ip", "netns", "exec", n.Name}, args...)...)
}

// Try runs a command in the namespace and returns its error.
func (n *NS) Try(args ...string) (string, error) {
	out, err := exec.Command("ip", append([]string{"netns", "exec", n.Name}, args...)...).CombinedOutput()
	return string(out), err
}

// Open opens the namespace; the handle is closed when the test ends.
func (n *NS) Open(t testing.TB) *netns.Namespace {
	t.Helper()
	h, err := netns.Open(n.Path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.Close() })
	return h
}

// Run runs a command and fails the test on error.
func Run(t testing.TB, args ...string) string {
	t.Helper()
	out, err := exec.Command(args[0], args[1:]...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

// Veth connects two namespaces with a veth pair created inside a (its peer
// moved to b) and brings both ends up.
func Veth(t testing.TB, a *NS, aIf string, b *NS, bIf string) {
	t.Helper()
	Run(t, "ip", "-n", a.Name, "link", "add", aIf, "type", "veth", "peer", "name", bIf, "netns", b.Name)
	Run(t, "ip", "-n", a.Name, "link", "set", aIf, "up")
	Run(t, "ip", "-n", b.Name, "link", "set", bIf, "up")
}

// Addr adds an address (CIDR) to an interface of the namespace.
func (n *NS) Addr(t testing.TB, ifname, cidr string) {
	t.Helper()
	Run(t, "ip", "-n", n.Name, "addr", "add", cidr, "dev", ifname)
}

// IP runs "ip -n <ns> args...".
func (n *NS) IP(t testing.TB, args ...string) string {
	t.Helper()
	return Run(t, append([]string{"ip", "-n", n.Name}, args...)...)
}
