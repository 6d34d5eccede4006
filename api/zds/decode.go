package zds

import (
	"fmt"

	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/proto"

	zdsv1 "github.com/amesh-dev/amesh/api/zds/v1"
)

// fdOps are the descriptor operations decoding needs; the fuzz tests replace
// them so that arbitrary ancillary data never touches real descriptors.
type fdOps struct {
	close      func(fd int) error
	checkNetns func(fd int) error
}

var sysFD = fdOps{close: unix.Close, checkNetns: checkNetns}

// parseRights extracts the descriptors of every SCM_RIGHTS message in oob.
// Any other control message is an error; the descriptors found are returned
// even then, so that the caller can close them.
func parseRights(oob []byte) ([]int, error) {
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return nil, fmt.Errorf("%w: ancillary data: %v", ErrInvalidMessage, err)
	}
	var fds []int
	var bad error
	for i := range msgs {
		m := &msgs[i]
		if m.Header.Level != unix.SOL_SOCKET || m.Header.Type != unix.SCM_RIGHTS {
			bad = fmt.Errorf("%w: unexpected control message level %d type %d", ErrInvalidMessage, m.Header.Level, m.Header.Type)
			continue
		}
		if len(m.Data)%4 != 0 {
			// unix.ParseUnixRights panics on this (found by fuzzing); the
			// kernel never produces it.
			bad = fmt.Errorf("%w: SCM_RIGHTS payload of %d bytes", ErrInvalidMessage, len(m.Data))
			continue
		}
		r, err := unix.ParseUnixRights(m)
		if err != nil {
			bad = fmt.Errorf("%w: SCM_RIGHTS: %v", ErrInvalidMessage, err)
			continue
		}
		fds = append(fds, r...)
	}
	return fds, bad
}

func closeAll(fds []int, ops fdOps) {
	for _, fd := range fds {
		_ = ops.close(fd)
	}
}

// checkPacket applies the checks common to both directions.
func checkPacket(data []byte, flags int) error {
	if flags&unix.MSG_TRUNC != 0 {
		return ErrTooLarge
	}
	if flags&unix.MSG_CTRUNC != 0 {
		return ErrControlTruncated
	}
	if len(data) > MaxPacketSize {
		return ErrTooLarge
	}
	return nil
}

// decodeAgent decodes one packet from the node agent. It owns fds: the netns
// descriptor of a valid add is returned (fd ≥ 0), every other one is closed.
func decodeAgent(data []byte, fds []int, flags int, ops fdOps) (m *zdsv1.AgentMessage, fd int, err error) {
	defer func() {
		if err != nil {
			closeAll(fds, ops)
			m, fd = nil, -1
		}
	}()
	if err := checkPacket(data, flags); err != nil {
		return nil, -1, fmt.Errorf("zds: recv: %w", err)
	}
	m = &zdsv1.AgentMessage{}
	if err := proto.Unmarshal(data, m); err != nil {
		return nil, -1, fmt.Errorf("zds: recv: %w: %v", ErrInvalidMessage, err)
	}
	if err := validateAgent(m); err != nil {
		return nil, -1, fmt.Errorf("zds: recv: %w", err)
	}
	if m.GetAdd() == nil {
		if len(fds) > 0 {
			return nil, -1, fmt.Errorf("zds: recv: %w: %d with a message that takes none", ErrUnexpectedFD, len(fds))
		}
		return m, -1, nil
	}
	switch len(fds) {
	case 0:
		return nil, -1, fmt.Errorf("zds: recv: %w", ErrMissingFD)
	case 1:
	default:
		return nil, -1, fmt.Errorf("zds: recv: %w: %d with an add", ErrUnexpectedFD, len(fds))
	}
	if err := ops.checkNetns(fds[0]); err != nil {
		return nil, -1, fmt.Errorf("zds: recv: %w", err)
	}
	return m, fds[0], nil
}

// decodeZtunnel decodes one packet from ztunnel, which never carries
// descriptors; any that arrived are closed.
func decodeZtunnel(data []byte, fds []int, flags int, ops fdOps) (*zdsv1.ZtunnelMessage, error) {
	if len(fds) > 0 {
		closeAll(fds, ops)
		return nil, fmt.Errorf("zds: recv: %w: %d with a ztunnel message", ErrUnexpectedFD, len(fds))
	}
	if err := checkPacket(data, flags); err != nil {
		return nil, fmt.Errorf("zds: recv: %w", err)
	}
	m := &zdsv1.ZtunnelMessage{}
	if err := proto.Unmarshal(data, m); err != nil {
		return nil, fmt.Errorf("zds: recv: %w: %v", ErrInvalidMessage, err)
	}
	if err := validateZtunnel(m); err != nil {
		return nil, fmt.Errorf("zds: recv: %w", err)
	}
	return m, nil
}

// validateAgent checks an AgentMessage's shape; errors wrap ErrInvalidMessage.
func validateAgent(m *zdsv1.AgentMessage) error {
	switch p := m.GetPayload().(type) {
	case *zdsv1.AgentMessage_Add:
		if p.Add == nil || p.Add.GetUid() == "" {
			return fmt.Errorf("%w: add without uid", ErrInvalidMessage)
		}
	case *zdsv1.AgentMessage_Keep:
		if p.Keep == nil || p.Keep.GetUid() == "" {
			return fmt.Errorf("%w: keep without uid", ErrInvalidMessage)
		}
	case *zdsv1.AgentMessage_Delete:
		if p.Delete == nil || p.Delete.GetUid() == "" {
			return fmt.Errorf("%w: delete without uid", ErrInvalidMessage)
		}
	case *zdsv1.AgentMessage_SnapshotSent:
		if p.SnapshotSent == nil {
			return fmt.Errorf("%w: nil snapshot_sent", ErrInvalidMessage)
		}
	case nil:
		return fmt.Errorf("%w: agent message without payload", ErrInvalidMessage)
	default:
		return fmt.Errorf("%w: unknown agent payload %T", ErrInvalidMessage, p)
	}
	return nil
}

// validateZtunnel checks a ZtunnelMessage's shape.
func validateZtunnel(m *zdsv1.ZtunnelMessage) error {
	switch p := m.GetPayload().(type) {
	case *zdsv1.ZtunnelMessage_Hello:
		if p.Hello == nil {
			return fmt.Errorf("%w: nil hello", ErrInvalidMessage)
		}
	case *zdsv1.ZtunnelMessage_Ack:
		if p.Ack == nil {
			return fmt.Errorf("%w: nil ack", ErrInvalidMessage)
		}
	case nil:
		return fmt.Errorf("%w: ztunnel message without payload", ErrInvalidMessage)
	default:
		return fmt.Errorf("%w: unknown ztunnel payload %T", ErrInvalidMessage, p)
	}
	return nil
}
