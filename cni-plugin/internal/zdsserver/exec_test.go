package zdsserver

import (
	"fmt"
	osexec "os/exec"
)

func exec(name string, args ...string) error {
	if out, err := osexec.Command(name, args...).CombinedOutput(); err != nil {
		return fmt.Errorf("%s %v: %w: %s", name, args, err, out)
	}
	return nil
}
