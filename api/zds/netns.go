package zds

import (
	"fmt"

	"golang.org/x/sys/unix"
)

// checkNetns verifies that fd refers to a network namespace (NS_GET_NSTYPE,
// Linux ≥ 4.11).
func checkNetns(fd int) error {
	t, err := unix.IoctlRetInt(fd, unix.NS_GET_NSTYPE)
	if err != nil {
		return fmt.Errorf("%w: NS_GET_NSTYPE: %v", ErrNotNetns, err)
	}
	if t != unix.CLONE_NEWNET {
		return fmt.Errorf("%w: namespace type %#x", ErrNotNetns, t)
	}
	return nil
}
