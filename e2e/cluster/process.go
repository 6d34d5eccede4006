package cluster

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"syscall"
	"time"

	"go.uber.org/zap"

	"github.com/amesh-dev/amesh/e2e/internal/cgroup"
	"github.com/amesh-dev/amesh/e2e/internal/nodeserver"
)

// proc is a supervised cluster process: restarted with backoff when it
// exits unexpectedly, stopped gracefully (SIGTERM, then SIGKILL of its
// whole cgroup).
type proc struct {
	name   string
	logf   string
	cgroup string
	// start launches the process; it must set the cgroup from cg.
	start func(logf, cg *os.File) (*exec.Cmd, error)

	mu       sync.Mutex
	cmd      *exec.Cmd
	stopping bool
	exits    int
	lastErr  error
	exited   chan struct{} // closed (and replaced) at every exit
	done     chan struct{} // closed when supervision ends
}

func newProc(name, logf, cg string, start func(logf, cg *os.File) (*exec.Cmd, error)) *proc {
	return &proc{name: name, logf: logf, cgroup: cg, start: start, exited: make(chan struct{}), done: make(chan struct{})}
}

// command returns a plain command for a control-plane binary.
func (c *Cluster) command(bin string, args ...string) func(logf, cg *os.File) (*exec.Cmd, error) {
	return func(logf, cg *os.File) (*exec.Cmd, error) {
		cmd := exec.Command(bin, args...)
		cmd.Stdout, cmd.Stderr = logf, logf
		cmd.Env = []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
		cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true, Pdeathsig: syscall.SIGKILL, UseCgroupFD: true, CgroupFD: int(cg.Fd())}
		return cmd, c.spawner.Start(cmd)
	}
}

func (p *proc) launch() (*exec.Cmd, error) {
	if err := cgroup.Create(p.cgroup); err != nil {
		return nil, err
	}
	cg, err := cgroup.Open(p.cgroup)
	if err != nil {
		return nil, err
	}
	defer cg.Close()
	logf, err := os.OpenFile(p.logf, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, fmt.Errorf("open %s log: %w", p.name, err)
	}
	defer logf.Close()
	fmt.Fprintf(logf, "==== %s starting %s ====\n", p.name, time.Now().Format(time.RFC3339))
	return p.start(logf, cg)
}

// supervise runs p until stop is called.
func (p *proc) supervise(log *zap.Logger) {
	defer close(p.done)
	backoff := time.Second
	for {
		started := time.Now()
		cmd, err := p.launch()
		p.mu.Lock()
		if err == nil {
			p.cmd = cmd
		}
		stopping := p.stopping
		p.mu.Unlock()
		if err == nil {
			if stopping {
				_ = cmd.Process.Signal(syscall.SIGTERM)
			}
			err = cmd.Wait()
			if err == nil {
				err = errors.New("exited")
			}
		}
		// Remove (not just kill) the cgroup: launch creates a fresh one.
		// Some kernels kill every child cloned into a cgroup that was
		// killed before (CLONE_INTO_CGROUP compares the parent's
		// cgroup.kill sequence with the target's), so a killed cgroup is
		// never reused.
		if err := cgroup.Remove(p.cgroup, 10*time.Second); err != nil {
			log.Warn("clean up cgroup", zap.String("process", p.name), zap.Error(err))
		}
		p.mu.Lock()
		p.cmd = nil
		p.exits++
		p.lastErr = err
		close(p.exited)
		p.exited = make(chan struct{})
		stopping = p.stopping
		p.mu.Unlock()
		if stopping {
			return
		}
		if time.Since(started) > time.Minute {
			backoff = time.Second
		}
		log.Warn("process exited; restarting", zap.String("process", p.name), zap.Error(err), zap.Duration("backoff", backoff))
		time.Sleep(backoff)
		backoff = min(2*backoff, 30*time.Second)
		p.mu.Lock()
		stopping = p.stopping
		p.mu.Unlock()
		if stopping {
			return
		}
	}
}

// stop terminates p gracefully within grace and waits for supervision to
// end.
func (p *proc) stop(grace time.Duration) {
	p.mu.Lock()
	p.stopping = true
	cmd := p.cmd
	p.mu.Unlock()
	if cmd != nil {
		_ = cmd.Process.Signal(syscall.SIGTERM)
	}
	select {
	case <-p.done:
		return
	case <-time.After(grace):
	}
	_ = cgroup.Kill(p.cgroup, 10*time.Second)
	<-p.done
}

// failures returns how often p exited and the tail of its log.
func (p *proc) failures() (int, string) {
	p.mu.Lock()
	n := p.exits
	p.mu.Unlock()
	tail, _ := nodeserver.LastLines(p.logf, 15)
	return n, tail
}

// waitFor polls check every interval until it succeeds, ctx ends, or one of
// procs has exited (a start failure); errors carry the process's log tail.
func waitFor(ctx context.Context, what string, interval time.Duration, procs []*proc, check func(context.Context) error) error {
	var last error
	for {
		cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		last = check(cctx)
		cancel()
		if last == nil {
			return nil
		}
		for _, p := range procs {
			if n, tail := p.failures(); n > 0 {
				return fmt.Errorf("waiting for %s: %s exited (%d times); last log lines of %s:\n%s", what, p.name, n, filepath.Base(p.logf), tail)
			}
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("waiting for %s: %w (last check: %v)", what, ctx.Err(), last)
		case <-time.After(interval):
		}
	}
}
