package zds

import (
	"context"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/proto"

	zdsv1 "github.com/amesh-dev/amesh/api/zds/v1"
)

// pair returns a connected (agent, ztunnel) pair over a real socket file.
func pair(t *testing.T) (agent, zt *Conn) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "zds.sock")
	ln, err := Listen(path)
	if err != nil {
		t.Fatalf("Listen: %v", err)
	}
	t.Cleanup(func() { _ = ln.Close() })
	accepted := make(chan *Conn, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			t.Errorf("Accept: %v", err)
		}
		accepted <- c
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	zt, err = Dial(ctx, path)
	if err != nil {
		t.Fatalf("Dial: %v", err)
	}
	agent = <-accepted
	if agent == nil {
		t.FailNow()
	}
	t.Cleanup(func() { _ = agent.Close(); _ = zt.Close() })
	return agent, zt
}

func openSelfNetns(t *testing.T) *os.File {
	t.Helper()
	f, err := os.Open("/proc/thread-self/ns/net")
	if err != nil {
		t.Fatalf("open own netns: %v", err)
	}
	t.Cleanup(func() { _ = f.Close() })
	return f
}

func inode(t *testing.T, f *os.File) uint64 {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		t.Fatalf("fstat: %v", err)
	}
	return st.Ino
}

func TestRoundTrip(t *testing.T) {
	agent, zt := pair(t)
	netns := openSelfNetns(t)

	if err := zt.SendZtunnel(&zdsv1.ZtunnelMessage{Payload: &zdsv1.ZtunnelMessage_Hello{Hello: &zdsv1.Hello{Version: zdsv1.Version_VERSION_V1}}}); err != nil {
		t.Fatalf("SendZtunnel hello: %v", err)
	}
	hello, err := agent.RecvZtunnel()
	if err != nil || hello.GetHello().GetVersion() != zdsv1.Version_VERSION_V1 {
		t.Fatalf("RecvZtunnel hello = %v, %v", hello, err)
	}

	add := &zdsv1.AgentMessage{Payload: &zdsv1.AgentMessage_Add{Add: &zdsv1.AddWorkload{
		Uid:  "uid-1",
		Info: &zdsv1.WorkloadInfo{Name: "p", Namespace: "ns", ServiceAccount: "sa", Ips: []string{"10.1.0.5", "fd00::5"}, Node: "n1"},
	}}}
	msgs := []struct {
		m     *zdsv1.AgentMessage
		netns *os.File
	}{
		{add, netns},
		{&zdsv1.AgentMessage{Payload: &zdsv1.AgentMessage_Keep{Keep: &zdsv1.KeepWorkload{Uid: "uid-2"}}}, nil},
		{&zdsv1.AgentMessage{Payload: &zdsv1.AgentMessage_SnapshotSent{SnapshotSent: &zdsv1.SnapshotSent{}}}, nil},
		{&zdsv1.AgentMessage{Payload: &zdsv1.AgentMessage_Delete{Delete: &zdsv1.DeleteWorkload{Uid: "uid-1"}}}, nil},
	}
	for _, tc := range msgs {
		if err := agent.SendAgent(tc.m, tc.netns); err != nil {
			t.Fatalf("SendAgent(%v): %v", tc.m, err)
		}
		got, f, err := zt.RecvAgent()
		if err != nil {
			t.Fatalf("RecvAgent: %v", err)
		}
		if !proto.Equal(got, tc.m) {
			t.Errorf("RecvAgent = %v, want %v", got, tc.m)
		}
		if (f != nil) != (tc.netns != nil) {
			t.Fatalf("RecvAgent file = %v, want one: %v", f, tc.netns != nil)
		}
		if f != nil {
			if a, b := inode(t, f), inode(t, tc.netns); a != b {
				t.Errorf("received namespace inode %d, sent %d", a, b)
			}
			if f.Fd() == tc.netns.Fd() {
				t.Errorf("received the sender's own descriptor number; expected a new one")
			}
			_ = f.Close()
		}
		if err := zt.SendZtunnel(&zdsv1.ZtunnelMessage{Payload: &zdsv1.ZtunnelMessage_Ack{Ack: &zdsv1.Ack{}}}); err != nil {
			t.Fatalf("SendZtunnel ack: %v", err)
		}
		ack, err := agent.RecvZtunnel()
		if err != nil || ack.GetAck() == nil {
			t.Fatalf("RecvZtunnel ack = %v, %v", ack, err)
		}
	}

	cred, err := agent.PeerCredentials()
	if err != nil {
		t.Fatalf("PeerCredentials: %v", err)
	}
	if int(cred.Pid) != os.Getpid() {
		t.Errorf("peer pid = %d, want %d", cred.Pid, os.Getpid())
	}

	if err := zt.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := agent.RecvZtunnel(); !errors.Is(err, io.EOF) {
		t.Errorf("RecvZtunnel after peer close = %v, want io.EOF", err)
	}
}

func TestSendRefusesMalformed(t *testing.T) {
	agent, zt := pair(t)
	netns := openSelfNetns(t)
	pr, pw, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = pr.Close(); _ = pw.Close() })

	add := &zdsv1.AgentMessage{Payload: &zdsv1.AgentMessage_Add{Add: &zdsv1.AddWorkload{Uid: "u"}}}
	del := &zdsv1.AgentMessage{Payload: &zdsv1.AgentMessage_Delete{Delete: &zdsv1.DeleteWorkload{Uid: "u"}}}
	huge := &zdsv1.AgentMessage{Payload: &zdsv1.AgentMessage_Add{Add: &zdsv1.AddWorkload{
		Uid: "u", Info: &zdsv1.WorkloadInfo{Name: string(make([]byte, MaxPacketSize))}}}}
	tests := []struct {
		name  string
		m     *zdsv1.AgentMessage
		netns *os.File
		want  error
	}{
		{"empty", &zdsv1.AgentMessage{}, nil, ErrInvalidMessage},
		{"add without uid", &zdsv1.AgentMessage{Payload: &zdsv1.AgentMessage_Add{Add: &zdsv1.AddWorkload{}}}, netns, ErrInvalidMessage},
		{"delete without uid", &zdsv1.AgentMessage{Payload: &zdsv1.AgentMessage_Delete{Delete: &zdsv1.DeleteWorkload{}}}, nil, ErrInvalidMessage},
		{"add without netns", add, nil, ErrMissingFD},
		{"delete with netns", del, netns, ErrUnexpectedFD},
		{"add with a pipe", add, pw, ErrNotNetns},
		{"too large", huge, netns, ErrTooLarge},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if err := agent.SendAgent(tc.m, tc.netns); !errors.Is(err, tc.want) {
				t.Errorf("SendAgent = %v, want %v", err, tc.want)
			}
		})
	}
	if err := zt.SendZtunnel(&zdsv1.ZtunnelMessage{}); !errors.Is(err, ErrInvalidMessage) {
		t.Errorf("SendZtunnel(empty) = %v, want ErrInvalidMessage", err)
	}
	// Nothing of the refused messages reached the peer.
	_ = zt.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
	if m, f, err := zt.RecvAgent(); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Errorf("RecvAgent after refused sends = %v, %v, %v; want a timeout", m, f, err)
	}
}

// pipeWithPeerCheck returns the write end of a pipe to send, and a function
// that reports whether every copy of that write end has been closed (the
// read end sees EOF). The caller's own copy is closed by the check.
func pipeWithPeerCheck(t *testing.T) (*os.File, func() bool) {
	t.Helper()
	pr, pw, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = pr.Close(); _ = pw.Close() })
	return pw, func() bool {
		_ = pw.Close()
		_ = pr.SetReadDeadline(time.Now().Add(2 * time.Second))
		var b [1]byte
		_, err := pr.Read(b[:])
		return errors.Is(err, io.EOF)
	}
}

func rawSend(t *testing.T, c *Conn, data []byte, files ...*os.File) {
	t.Helper()
	var oob []byte
	if len(files) > 0 {
		fds := make([]int, len(files))
		for i, f := range files {
			fds[i] = int(f.Fd())
		}
		oob = unix.UnixRights(fds...)
	}
	if _, _, err := c.uc.WriteMsgUnix(data, oob, nil); err != nil {
		t.Fatalf("raw send: %v", err)
	}
}

func mustMarshal(t *testing.T, m proto.Message) []byte {
	t.Helper()
	b, err := proto.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestRecvStrict sends hostile packets with a raw socket and checks that each
// is refused with the right error, that every descriptor that came with it is
// closed, and that the connection stays usable.
func TestRecvStrict(t *testing.T) {
	agent, zt := pair(t)
	addB := mustMarshal(t, &zdsv1.AgentMessage{Payload: &zdsv1.AgentMessage_Add{Add: &zdsv1.AddWorkload{Uid: "u"}}})
	delB := mustMarshal(t, &zdsv1.AgentMessage{Payload: &zdsv1.AgentMessage_Delete{Delete: &zdsv1.DeleteWorkload{Uid: "u"}}})
	good := &zdsv1.AgentMessage{Payload: &zdsv1.AgentMessage_Keep{Keep: &zdsv1.KeepWorkload{Uid: "still-works"}}}

	tests := []struct {
		name  string
		data  []byte
		nfds  int
		netns bool // also attach a real netns first
		want  error
	}{
		{"oversized", make([]byte, MaxPacketSize+1), 0, false, ErrTooLarge},
		{"oversized with fd", make([]byte, MaxPacketSize+100), 1, false, ErrTooLarge},
		{"garbage", []byte{0xff, 0xff, 0xff, 0xff}, 0, false, ErrInvalidMessage},
		{"garbage with fd", []byte{0x0a, 0x05, 0x01}, 1, false, ErrInvalidMessage},
		{"no payload", []byte{0x78, 0x01}, 0, false, ErrInvalidMessage}, // unknown field 15 only
		{"delete with fd", delB, 1, false, ErrUnexpectedFD},
		{"add without fd", addB, 0, false, ErrMissingFD},
		{"add with a pipe", addB, 1, false, ErrNotNetns},
		{"add with netns and a pipe", addB, 1, true, ErrUnexpectedFD},
		{"add with too many fds", addB, maxFDs + 3, false, ErrControlTruncated},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var files []*os.File
			var checks []func() bool
			if tc.netns {
				files = append(files, openSelfNetns(t))
			}
			for range tc.nfds {
				f, closed := pipeWithPeerCheck(t)
				files = append(files, f)
				checks = append(checks, closed)
			}
			rawSend(t, agent, tc.data, files...)
			_ = zt.SetReadDeadline(time.Now().Add(5 * time.Second))
			m, f, err := zt.RecvAgent()
			if !errors.Is(err, tc.want) {
				t.Fatalf("RecvAgent = %v, %v, %v; want %v", m, f, err, tc.want)
			}
			if m != nil || f != nil {
				t.Errorf("RecvAgent returned %v, %v with an error", m, f)
			}
			for i, closed := range checks {
				if !closed() {
					t.Errorf("descriptor %d leaked in the receiver", i)
				}
			}
			// The connection still works.
			if err := agent.SendAgent(good, nil); err != nil {
				t.Fatal(err)
			}
			got, _, err := zt.RecvAgent()
			if err != nil || !proto.Equal(got, good) {
				t.Fatalf("RecvAgent after refusal = %v, %v", got, err)
			}
		})
	}

	t.Run("ztunnel message with fd", func(t *testing.T) {
		f, closed := pipeWithPeerCheck(t)
		rawSend(t, zt, mustMarshal(t, &zdsv1.ZtunnelMessage{Payload: &zdsv1.ZtunnelMessage_Ack{Ack: &zdsv1.Ack{}}}), f)
		if _, err := agent.RecvZtunnel(); !errors.Is(err, ErrUnexpectedFD) {
			t.Errorf("RecvZtunnel = %v, want ErrUnexpectedFD", err)
		}
		if !closed() {
			t.Error("descriptor leaked in the receiver")
		}
	})
	t.Run("empty packet reads as EOF", func(t *testing.T) {
		// A zero-length SOCK_SEQPACKET read is indistinguishable from the
		// peer closing (and Go sends a dummy byte when only ancillary
		// data is given, so descriptors never come with an empty packet).
		rawSend(t, zt, nil)
		if _, err := agent.RecvZtunnel(); !errors.Is(err, io.EOF) {
			t.Errorf("RecvZtunnel = %v, want io.EOF", err)
		}
	})
}

func TestDeadline(t *testing.T) {
	agent, zt := pair(t)
	if err := zt.SetReadDeadline(time.Now().Add(20 * time.Millisecond)); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if _, _, err := zt.RecvAgent(); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("RecvAgent = %v, want deadline exceeded", err)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("deadline took %v", d)
	}
	// Fill the socket buffer: a write deadline must stop a blocked send.
	if err := agent.SetWriteDeadline(time.Now().Add(100 * time.Millisecond)); err != nil {
		t.Fatal(err)
	}
	big := &zdsv1.AgentMessage{Payload: &zdsv1.AgentMessage_Keep{Keep: &zdsv1.KeepWorkload{Uid: string(make([]byte, MaxPacketSize-16))}}}
	var err error
	for i := 0; i < 100000 && err == nil; i++ {
		err = agent.SendAgent(big, nil)
	}
	if !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("SendAgent into a full socket = %v, want deadline exceeded", err)
	}
	// Clearing the deadline and draining makes it usable again.
	_ = agent.SetDeadline(time.Time{})
	_ = zt.SetDeadline(time.Time{})
	if _, _, err := zt.RecvAgent(); err != nil {
		t.Fatalf("RecvAgent after draining one: %v", err)
	}
}

func TestCloseUnblocks(t *testing.T) {
	agent, zt := pair(t)
	done := make(chan error, 1)
	go func() { _, _, err := zt.RecvAgent(); done <- err }()
	time.Sleep(20 * time.Millisecond)
	_ = zt.Close()
	select {
	case err := <-done:
		if !errors.Is(err, net.ErrClosed) {
			t.Errorf("RecvAgent after Close = %v, want net.ErrClosed", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Close did not unblock RecvAgent")
	}
	_ = agent
}

func TestListen(t *testing.T) {
	dir := t.TempDir()

	t.Run("creates directory, socket mode 0600, Close removes it", func(t *testing.T) {
		path := filepath.Join(dir, "sub", "a.sock")
		ln, err := Listen(path)
		if err != nil {
			t.Fatal(err)
		}
		fi, err := os.Stat(path)
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode()&os.ModeSocket == 0 || fi.Mode().Perm() != 0o600 {
			t.Errorf("socket mode = %v", fi.Mode())
		}
		done := make(chan error, 1)
		go func() { _, err := ln.Accept(); done <- err }()
		_ = ln.Close()
		if err := <-done; !errors.Is(err, net.ErrClosed) {
			t.Errorf("Accept after Close = %v, want net.ErrClosed", err)
		}
		if _, err := os.Stat(path); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("socket file after Close: %v", err)
		}
	})
	t.Run("replaces a stale socket", func(t *testing.T) {
		path := filepath.Join(dir, "stale.sock")
		ul, err := net.ListenUnix("unixpacket", &net.UnixAddr{Name: path, Net: "unixpacket"})
		if err != nil {
			t.Fatal(err)
		}
		ul.SetUnlinkOnClose(false)
		_ = ul.Close() // leaves the file behind, as a crashed agent would
		ln, err := Listen(path)
		if err != nil {
			t.Fatalf("Listen over a stale socket: %v", err)
		}
		_ = ln.Close()
	})
	t.Run("refuses a live socket", func(t *testing.T) {
		path := filepath.Join(dir, "live.sock")
		ln, err := Listen(path)
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		go func() {
			if c, err := ln.Accept(); err == nil {
				_ = c.Close()
			}
		}()
		if ln2, err := Listen(path); !errors.Is(err, unix.EADDRINUSE) {
			if ln2 != nil {
				_ = ln2.Close()
			}
			t.Errorf("second Listen = %v, want EADDRINUSE", err)
		}
	})
	t.Run("refuses a regular file", func(t *testing.T) {
		path := filepath.Join(dir, "file")
		if err := os.WriteFile(path, []byte("x"), 0o600); err != nil {
			t.Fatal(err)
		}
		if _, err := Listen(path); err == nil {
			t.Error("Listen over a regular file succeeded")
		}
		if b, _ := os.ReadFile(path); string(b) != "x" {
			t.Error("Listen clobbered a regular file")
		}
	})
	t.Run("dial without listener", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		if _, err := Dial(ctx, filepath.Join(dir, "nobody.sock")); err == nil {
			t.Error("Dial to a missing socket succeeded")
		}
	})
}
