package sandbox

import (
	"os/exec"
	"runtime"
	"sync"
)

// Spawner starts processes from one OS thread that lives as long as the
// spawner. Linux ties a child's parent-death signal (Pdeathsig) to the
// thread that forked it, not to the process, and the Go runtime ends
// threads whose goroutine exits while locked (as namespace code does); a
// child forked from such a thread would be killed long before its parent
// dies. Forking only from the spawner's thread avoids that.
type Spawner struct {
	reqs chan func()
	once sync.Once
	done chan struct{}
}

// NewSpawner starts the spawner's thread.
func NewSpawner() *Spawner {
	s := &Spawner{reqs: make(chan func()), done: make(chan struct{})}
	go s.loop()
	return s
}

func (s *Spawner) loop() {
	defer close(s.done)
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	for f := range s.reqs {
		f()
	}
}

// Start starts cmd from the spawner's thread.
func (s *Spawner) Start(cmd *exec.Cmd) error {
	if s == nil {
		return cmd.Start()
	}
	var err error
	done := make(chan struct{})
	s.reqs <- func() {
		err = cmd.Start()
		close(done)
	}
	<-done
	return err
}

// Close stops the spawner's goroutine (its thread is returned to the
// runtime, not ended). Processes it started keep running.
func (s *Spawner) Close() {
	s.once.Do(func() { close(s.reqs) })
	<-s.done
}
