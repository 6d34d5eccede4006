package zds

import (
	"bufio"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	zdsv1 "github.com/amesh-dev/amesh/api/zds/v1"
)

// listenInNetns opens a TCP listener inside the network namespace netns, on
// a locked OS thread of its own goroutine. The thread returns to its original
// namespace afterwards; if that fails it stays locked and dies with the
// goroutine instead of going back to the scheduler in the wrong namespace.
func listenInNetns(netns *os.File, addr string) (net.Listener, error) {
	type result struct {
		ln  net.Listener
		err error
	}
	ch := make(chan result, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := os.Open("/proc/thread-self/ns/net")
		if err != nil {
			runtime.UnlockOSThread()
			ch <- result{nil, err}
			return
		}
		defer orig.Close()
		if err := unix.Setns(int(netns.Fd()), unix.CLONE_NEWNET); err != nil {
			runtime.UnlockOSThread()
			ch <- result{nil, fmt.Errorf("setns into pod: %w", err)}
			return
		}
		ln, lerr := net.Listen("tcp", addr)
		if err := unix.Setns(int(orig.Fd()), unix.CLONE_NEWNET); err != nil {
			if ln != nil {
				_ = ln.Close()
			}
			ch <- result{nil, fmt.Errorf("setns back: %w", err)}
			return
		}
		runtime.UnlockOSThread()
		ch <- result{ln, lerr}
	}()
	r := <-ch
	return r.ln, r.err
}

// TestNetnsCrossesSocket creates a real network namespace, hands its
// descriptor from the "agent" to the "ztunnel" side over ZDS, enters it with
// setns on the receiving side, opens a listener there and connects to that
// listener from `ip netns exec` — proving the received descriptor is the very
// namespace the agent sent.
func TestNetnsCrossesSocket(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: creates a network namespace and calls setns")
	}
	if _, err := exec.LookPath("ip"); err != nil {
		t.Skip("needs iproute2's ip")
	}
	var rnd [4]byte
	_, _ = rand.Read(rnd[:])
	name := "zdstest-" + hex.EncodeToString(rnd[:])
	run := func(args ...string) string {
		t.Helper()
		out, err := exec.Command(args[0], args[1:]...).CombinedOutput()
		if err != nil {
			t.Fatalf("%s: %v\n%s", strings.Join(args, " "), err, out)
		}
		return string(out)
	}
	run("ip", "netns", "add", name)
	t.Cleanup(func() { _ = exec.Command("ip", "netns", "delete", name).Run() })
	run("ip", "netns", "exec", name, "ip", "link", "set", "lo", "up")

	sent, err := os.Open("/run/netns/" + name)
	if err != nil {
		t.Fatal(err)
	}
	defer sent.Close()

	agent, zt := pair(t)
	add := &zdsv1.AgentMessage{Payload: &zdsv1.AgentMessage_Add{Add: &zdsv1.AddWorkload{Uid: name}}}
	if err := agent.SendAgent(add, sent); err != nil {
		t.Fatalf("SendAgent: %v", err)
	}
	// The agent may close its copy right away; ztunnel's copy keeps the
	// namespace reachable.
	_ = sent.Close()

	_, netns, err := zt.RecvAgent()
	if err != nil {
		t.Fatalf("RecvAgent: %v", err)
	}
	if netns == nil {
		t.Fatal("RecvAgent returned no namespace")
	}
	defer netns.Close()

	ln, err := listenInNetns(netns, "127.0.0.1:0")
	if err != nil {
		t.Fatalf("listen inside the pod namespace: %v", err)
	}
	defer ln.Close()
	port := ln.Addr().(*net.TCPAddr).Port

	// The listener must not exist in the test's own namespace.
	if c, err := net.DialTimeout("tcp", ln.Addr().String(), time.Second); err == nil {
		_ = c.Close()
		// Another process could own that port on the host; make sure it
		// was not our listener that answered.
		_ = ln.(*net.TCPListener).SetDeadline(time.Now().Add(200 * time.Millisecond))
		if pc, err := ln.Accept(); err == nil {
			_ = pc.Close()
			t.Fatal("a connection from the host namespace reached the pod listener")
		}
		_ = ln.(*net.TCPListener).SetDeadline(time.Time{})
	}

	got := make(chan string, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			got <- "accept: " + err.Error()
			return
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(10 * time.Second))
		line, err := bufio.NewReader(c).ReadString('\n')
		if err != nil {
			got <- "read: " + err.Error()
			return
		}
		got <- strings.TrimSpace(line)
	}()
	msg := "hello-from-" + name
	script := fmt.Sprintf("exec 3<>/dev/tcp/127.0.0.1/%d && echo %s >&3", port, msg)
	run("ip", "netns", "exec", name, "bash", "-c", script)
	select {
	case line := <-got:
		if line != msg {
			t.Errorf("listener inside the namespace got %q, want %q", line, msg)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("no connection reached the listener inside the namespace")
	}
	if out := run("ip", "netns", "exec", name, "ss", "-Htln"); !strings.Contains(out, fmt.Sprintf("127.0.0.1:%d", port)) {
		t.Errorf("ss inside the namespace does not show the listener:\n%s", out)
	}
}
