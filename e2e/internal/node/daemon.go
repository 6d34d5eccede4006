package node

import (
	"context"
	"os"
	"os/exec"
	"syscall"
)

// newDaemonCmd returns a node daemon's command: in the agent's network and
// mount namespaces, in cgroup cg, logging to logf, killed with the agent.
func newDaemonCmd(ctx context.Context, argv []string, logf, cg *os.File) *exec.Cmd {
	cmd := exec.CommandContext(ctx, argv[0], argv[1:]...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{
		Setsid:      true,
		Pdeathsig:   syscall.SIGKILL,
		UseCgroupFD: true,
		CgroupFD:    int(cg.Fd()),
	}
	cmd.Cancel = func() error { return cmd.Process.Signal(syscall.SIGTERM) }
	return cmd
}
