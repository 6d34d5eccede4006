// Package ztunneltest is a test ztunnel for the node agent's tests: it
// speaks ZDS like the real one, opens a TCP listener on 127.0.0.1:15001
// inside every pod network namespace it is handed (answering each
// connection with its original destination, then echoing it until the
// client closes), and records what it was told. Like the real one, it
// stops accepting for a deleted pod and keeps its live connections.
package ztunneltest

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"golang.org/x/sys/unix"

	"github.com/amesh-dev/amesh/api/capture"
	"github.com/amesh-dev/amesh/api/zds"
	zdsv1 "github.com/amesh-dev/amesh/api/zds/v1"
)

// Ztunnel is a connected test ztunnel.
type Ztunnel struct {
	conn   *zds.Conn
	events chan string
	// Stall, when set, stops acknowledging messages.
	Stall atomic.Bool

	mu     sync.Mutex
	reject map[string]bool
	pods   map[string]net.Listener
	nets   map[string]uint64 // netns inode per uid
	conns  map[net.Conn]bool // live connections
}

// Dial connects to the agent's ZDS socket (retrying for up to 5s while it
// starts) and says hello. Adds of the uids in reject are refused.
func Dial(socket string, reject ...string) (*Ztunnel, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	var conn *zds.Conn
	var err error
	for {
		if conn, err = zds.Dial(ctx, socket); err == nil || ctx.Err() != nil {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil {
		return nil, err
	}
	z := &Ztunnel{conn: conn, events: make(chan string, 1000), reject: map[string]bool{},
		pods: map[string]net.Listener{}, nets: map[string]uint64{}, conns: map[net.Conn]bool{}}
	for _, r := range reject {
		z.reject[r] = true
	}
	if err := conn.SendZtunnel(&zdsv1.ZtunnelMessage{Payload: &zdsv1.ZtunnelMessage_Hello{Hello: &zdsv1.Hello{Version: zdsv1.Version_VERSION_V1}}}); err != nil {
		conn.Close()
		return nil, err
	}
	go z.loop()
	return z, nil
}

// Close disconnects and closes every listener and connection.
func (z *Ztunnel) Close() {
	z.conn.Close()
	z.mu.Lock()
	defer z.mu.Unlock()
	for uid, l := range z.pods {
		l.Close()
		delete(z.pods, uid)
	}
	for c := range z.conns {
		c.Close()
	}
}

// Accept stops refusing the adds of uid.
func (z *Ztunnel) Accept(uid string) {
	z.mu.Lock()
	defer z.mu.Unlock()
	delete(z.reject, uid)
}

func (z *Ztunnel) rejects(uid string) bool {
	z.mu.Lock()
	defer z.mu.Unlock()
	return z.reject[uid]
}

// Serving reports whether the ztunnel holds the pod.
func (z *Ztunnel) Serving(uid string) bool {
	z.mu.Lock()
	defer z.mu.Unlock()
	return z.pods[uid] != nil
}

func (z *Ztunnel) loop() {
	defer close(z.events)
	for {
		m, fd, err := z.conn.RecvAgent()
		if err != nil {
			return
		}
		var ev, ackErr string
		switch p := m.GetPayload().(type) {
		case *zdsv1.AgentMessage_Add:
			uid := p.Add.GetUid()
			ev = "add " + uid
			if z.rejects(uid) {
				ackErr = "refused"
			} else if err := z.listenIn(uid, fd); err != nil {
				ackErr = err.Error()
			}
			fd.Close()
		case *zdsv1.AgentMessage_Keep:
			ev = "keep " + p.Keep.GetUid()
		case *zdsv1.AgentMessage_Delete:
			uid := p.Delete.GetUid()
			ev = "delete " + uid
			z.mu.Lock()
			if l := z.pods[uid]; l != nil {
				l.Close()
				delete(z.pods, uid)
			}
			z.mu.Unlock()
		case *zdsv1.AgentMessage_SnapshotSent:
			ev = "snapshot_sent"
		}
		z.events <- ev
		if z.Stall.Load() {
			continue
		}
		if err := z.conn.SendZtunnel(&zdsv1.ZtunnelMessage{Payload: &zdsv1.ZtunnelMessage_Ack{Ack: &zdsv1.Ack{Error: ackErr}}}); err != nil {
			return
		}
	}
}

// listenIn opens 127.0.0.1:15001 inside the namespace fd refers to.
func (z *Ztunnel) listenIn(uid string, fd *os.File) error {
	var st unix.Stat_t
	if err := unix.Fstat(int(fd.Fd()), &st); err != nil {
		return err
	}
	z.mu.Lock()
	defer z.mu.Unlock()
	if l := z.pods[uid]; l != nil {
		if z.nets[uid] == st.Ino {
			return nil // same namespace: idempotent
		}
		l.Close() // a new sandbox replaces the old one
		delete(z.pods, uid)
	}
	netns, err := ns.GetNS(fmt.Sprintf("/proc/self/fd/%d", fd.Fd()))
	if err != nil {
		return err
	}
	defer netns.Close()
	var l net.Listener
	if err := netns.Do(func(ns.NetNS) (err error) {
		l, err = net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", capture.OutboundPort))
		return err
	}); err != nil {
		return err
	}
	go z.serve(l)
	z.pods[uid] = l
	z.nets[uid] = st.Ino
	return nil
}

// serve answers each connection with "ztunnel <original destination>\n"
// and then echoes it until the client closes it.
func (z *Ztunnel) serve(l net.Listener) {
	for {
		c, err := l.Accept()
		if err != nil {
			return
		}
		z.mu.Lock()
		z.conns[c] = true
		z.mu.Unlock()
		go func() {
			defer func() {
				z.mu.Lock()
				delete(z.conns, c)
				z.mu.Unlock()
				c.Close()
			}()
			od := "-"
			if a, err := capture.OriginalDestination(c.(*net.TCPConn)); err == nil {
				od = a.String()
			}
			if _, err := fmt.Fprintf(c, "ztunnel %s\n", od); err != nil {
				return
			}
			_, _ = io.Copy(c, c)
		}()
	}
}

// Next returns the next event ("add <uid>", "keep <uid>", "delete <uid>",
// "snapshot_sent"), waiting up to timeout.
func (z *Ztunnel) Next(timeout time.Duration) (string, error) {
	select {
	case ev, ok := <-z.events:
		if !ok {
			return "", errors.New("ztunnel connection closed")
		}
		return ev, nil
	case <-time.After(timeout):
		return "", errors.New("timed out waiting for a ZDS message")
	}
}

// Expect consumes events until one equals want, or fails after timeout.
func (z *Ztunnel) Expect(want string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		ev, err := z.Next(time.Until(deadline))
		if err != nil {
			return fmt.Errorf("waiting for %q: %w", want, err)
		}
		if ev == want {
			return nil
		}
	}
}
