package zds

import (
	"errors"
	"testing"

	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/proto"

	zdsv1 "github.com/amesh-dev/amesh/api/zds/v1"
)

// fakeFDs stands in for the process's descriptor table while fuzzing: the
// descriptors in fuzzed ancillary data are arbitrary numbers and must never
// reach a real close(2).
type fakeFDs struct {
	closed map[int]int
	netns  map[int]bool
}

func (f *fakeFDs) ops() fdOps {
	return fdOps{
		close: func(fd int) error { f.closed[fd]++; return nil },
		checkNetns: func(fd int) error {
			if !f.netns[fd] {
				return ErrNotNetns
			}
			return nil
		},
	}
}

func rights(fds ...int) []byte { return unix.UnixRights(fds...) }

// FuzzDecodeAgent decodes one raw packet (bytes, ancillary data, recvmsg
// flags) as the ztunnel side does and checks the ownership invariant: every
// descriptor that arrived is either returned (exactly one, with a valid add)
// or closed exactly once; a returned message is well formed.
func FuzzDecodeAgent(f *testing.F) {
	add, _ := proto.Marshal(&zdsv1.AgentMessage{Payload: &zdsv1.AgentMessage_Add{Add: &zdsv1.AddWorkload{Uid: "u", Info: &zdsv1.WorkloadInfo{Name: "p", Ips: []string{"10.0.0.1"}}}}})
	del, _ := proto.Marshal(&zdsv1.AgentMessage{Payload: &zdsv1.AgentMessage_Delete{Delete: &zdsv1.DeleteWorkload{Uid: "u"}}})
	snap, _ := proto.Marshal(&zdsv1.AgentMessage{Payload: &zdsv1.AgentMessage_SnapshotSent{SnapshotSent: &zdsv1.SnapshotSent{}}})
	f.Add(add, rights(7), 0, uint8(7))
	f.Add(add, rights(7, 8), 0, uint8(7))
	f.Add(add, rights(9), 0, uint8(7))
	f.Add(add, []byte(nil), 0, uint8(0))
	f.Add(del, rights(7), 0, uint8(7))
	f.Add(snap, []byte(nil), 0, uint8(0))
	f.Add(add, rights(7), unix.MSG_CTRUNC, uint8(7))
	f.Add(add, rights(7), unix.MSG_TRUNC, uint8(7))
	f.Add([]byte{0xff, 0x01}, rights(3), 0, uint8(3))
	f.Add(add, append(rights(7), 0xde, 0xad), 0, uint8(7))
	f.Fuzz(func(t *testing.T, data, oob []byte, flags int, netnsFD uint8) {
		fds, perr := parseRights(oob)
		table := &fakeFDs{closed: map[int]int{}, netns: map[int]bool{int(netnsFD): true}}
		var m *zdsv1.AgentMessage
		fd := -1
		var err error
		if perr != nil {
			closeAll(fds, table.ops())
			err = perr
		} else {
			m, fd, err = decodeAgent(data, fds, flags, table.ops())
		}
		if err != nil {
			if m != nil || fd != -1 {
				t.Fatalf("error %v with message %v fd %d", err, m, fd)
			}
			for _, d := range fds {
				if table.closed[d] < 1 {
					t.Fatalf("descriptor %d leaked on error %v", d, err)
				}
			}
			if !errors.Is(err, ErrInvalidMessage) && !errors.Is(err, ErrTooLarge) && !errors.Is(err, ErrControlTruncated) &&
				!errors.Is(err, ErrUnexpectedFD) && !errors.Is(err, ErrMissingFD) && !errors.Is(err, ErrNotNetns) {
				t.Fatalf("error %v is none of the package's errors", err)
			}
			return
		}
		if verr := validateAgent(m); verr != nil {
			t.Fatalf("decoded an invalid message: %v", verr)
		}
		if (m.GetAdd() != nil) != (fd >= 0) {
			t.Fatalf("add=%v but fd=%d", m.GetAdd() != nil, fd)
		}
		if fd >= 0 && (len(fds) != 1 || fds[0] != fd || !table.netns[fd]) {
			t.Fatalf("returned fd %d of %v", fd, fds)
		}
		if len(table.closed) != 0 {
			t.Fatalf("closed %v on success", table.closed)
		}
		if flags&(unix.MSG_TRUNC|unix.MSG_CTRUNC) != 0 {
			t.Fatalf("accepted a packet with flags %#x", flags)
		}
		// A decoded message survives a round trip unchanged.
		b, err := proto.Marshal(m)
		if err != nil {
			t.Fatal(err)
		}
		var again zdsv1.AgentMessage
		if err := proto.Unmarshal(b, &again); err != nil || !proto.Equal(&again, m) {
			t.Fatalf("round trip: %v", err)
		}
	})
}

// FuzzDecodeZtunnel decodes one raw packet as the node agent does: ztunnel
// never sends descriptors, so any that arrive are closed and refused.
func FuzzDecodeZtunnel(f *testing.F) {
	ack, _ := proto.Marshal(&zdsv1.ZtunnelMessage{Payload: &zdsv1.ZtunnelMessage_Ack{Ack: &zdsv1.Ack{Error: "boom"}}})
	hello, _ := proto.Marshal(&zdsv1.ZtunnelMessage{Payload: &zdsv1.ZtunnelMessage_Hello{Hello: &zdsv1.Hello{Version: zdsv1.Version_VERSION_V1}}})
	f.Add(ack, []byte(nil), 0)
	f.Add(hello, []byte(nil), 0)
	f.Add(ack, rights(5), 0)
	f.Add([]byte{}, []byte(nil), 0)
	f.Add(hello, []byte(nil), unix.MSG_TRUNC)
	f.Fuzz(func(t *testing.T, data, oob []byte, flags int) {
		fds, perr := parseRights(oob)
		if perr != nil {
			return
		}
		table := &fakeFDs{closed: map[int]int{}}
		m, err := decodeZtunnel(data, fds, flags, table.ops())
		for _, d := range fds {
			if table.closed[d] < 1 {
				t.Fatalf("descriptor %d leaked", d)
			}
		}
		if err != nil {
			if m != nil {
				t.Fatalf("message %v with error %v", m, err)
			}
			return
		}
		if len(fds) > 0 {
			t.Fatalf("accepted a message with descriptors %v", fds)
		}
		if verr := validateZtunnel(m); verr != nil {
			t.Fatalf("decoded an invalid message: %v", verr)
		}
	})
}
