package sandbox

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"syscall"
)

// Options are how the parent starts the helper.
type Options struct {
	// Helper is the binary whose main runs Init for InitArg.
	Helper string
	// Stdin, Stdout and Stderr of the workload; nil means /dev/null.
	Stdin          io.Reader
	Stdout, Stderr io.Writer
	// Cgroup, when not nil, is a cgroup v2 directory the process starts in.
	Cgroup *os.File
	// NewIPC gives the sandbox its own IPC namespace.
	NewIPC bool
	// Pdeathsig is sent to the workload when its parent dies; set Spawner
	// too, or it fires when the forking thread ends.
	Pdeathsig syscall.Signal
	// Spawner, when set, forks the helper.
	Spawner *Spawner
}

// ErrInit wraps failures reported by the helper before the workload ran.
var ErrInit = errors.New("sandbox init failed")

// Start starts the sandboxed workload and returns once it has been exec'd
// (the returned command is running the workload) or the sandbox could not
// be built (the error wraps ErrInit and carries the helper's reason).
func Start(s *Spec, o Options) (*exec.Cmd, error) {
	if err := s.Validate(); err != nil {
		return nil, err
	}
	raw, err := json.Marshal(s)
	if err != nil {
		return nil, fmt.Errorf("encode sandbox spec: %w", err)
	}
	statusR, statusW, err := os.Pipe()
	if err != nil {
		return nil, fmt.Errorf("status pipe: %w", err)
	}
	defer statusR.Close()
	specR, specW, err := os.Pipe()
	if err != nil {
		statusW.Close()
		return nil, fmt.Errorf("spec pipe: %w", err)
	}

	cmd := exec.Command(o.Helper, InitArg)
	cmd.Env = []string{}
	cmd.Stdin, cmd.Stdout, cmd.Stderr = o.Stdin, o.Stdout, o.Stderr
	cmd.ExtraFiles = []*os.File{statusW, specR}
	flags := uintptr(syscall.CLONE_NEWNS)
	if s.Hostname != "" {
		flags |= syscall.CLONE_NEWUTS
	}
	if o.NewIPC {
		flags |= syscall.CLONE_NEWIPC
	}
	cmd.SysProcAttr = &syscall.SysProcAttr{Cloneflags: flags, Pdeathsig: o.Pdeathsig, Setsid: true}
	if o.Cgroup != nil {
		cmd.SysProcAttr.UseCgroupFD = true
		cmd.SysProcAttr.CgroupFD = int(o.Cgroup.Fd())
	}
	err = o.Spawner.Start(cmd)
	statusW.Close()
	specR.Close()
	if err != nil {
		specW.Close()
		return nil, fmt.Errorf("start sandbox helper: %w", err)
	}
	go func() {
		_, _ = specW.Write(raw)
		specW.Close()
	}()
	msg, _ := io.ReadAll(statusR)
	if len(msg) > 0 {
		_ = cmd.Wait()
		return nil, fmt.Errorf("%w: %s", ErrInit, msg)
	}
	return cmd, nil
}
