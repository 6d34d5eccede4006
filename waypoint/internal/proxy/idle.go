package proxy

import (
	"errors"
	"net/http"
	"sync"
	"sync/atomic"
	"time"
)

// DefaultRequestBodyIdleTimeout is Options.RequestBodyIdleTimeout's default.
const DefaultRequestBodyIdleTimeout = 60 * time.Second

// errBodyIdle is what a request body read returns once the client has sent
// nothing for the idle timeout.
var errBodyIdle = errors.New("request body: the client sent nothing within the idle timeout")

// bodyWatch ends a request whose client stops sending its body. Only time
// spent waiting in a body read counts (an upstream that is slow to take the
// body is not the client's fault), and a response byte written to the
// client meanwhile restarts the count (a bidirectional stream may be quiet
// one way). When the count reaches the timeout the read is cut by a read
// deadline in the past, on the HTTP/1.1 connection or the HTTP/2 stream,
// and fails with errBodyIdle.
type bodyWatch struct {
	timeout time.Duration
	rc      *http.ResponseController
	wrote   atomic.Int64 // Unix nanoseconds of the last response write

	mu      sync.Mutex
	timer   *time.Timer
	armed   bool
	waiting bool      // a body read is in progress
	since   time.Time // start of that read
	fired   bool
	done    bool // the handler returned: rc must not be used
}

// touch records a response write.
func (w *bodyWatch) touch() { w.wrote.Store(time.Now().UnixNano()) }

// enter is called before a body read; it fails once the watch has fired.
func (w *bodyWatch) enter() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.fired {
		return errBodyIdle
	}
	if w.done {
		return nil
	}
	w.waiting, w.since = true, time.Now()
	if !w.armed {
		w.armed = true
		if w.timer == nil {
			w.timer = time.AfterFunc(w.timeout, w.check)
		} else {
			w.timer.Reset(w.timeout)
		}
	}
	return nil
}

// exit is called after a body read with its error, which it replaces with
// errBodyIdle when the watch cut the read.
func (w *bodyWatch) exit(err error) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.waiting = false
	if w.fired && err != nil {
		return errBodyIdle
	}
	return err
}

func (w *bodyWatch) check() {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.armed = false
	if w.done || !w.waiting {
		return // the next read arms the timer again
	}
	last := w.since
	if wr := time.Unix(0, w.wrote.Load()); wr.After(last) {
		last = wr
	}
	if rest := w.timeout - time.Since(last); rest > 0 {
		w.armed = true
		w.timer.Reset(rest)
		return
	}
	w.fired = true
	_ = w.rc.SetReadDeadline(time.Now())
}

// timedOut reports whether the watch cut the request body.
func (w *bodyWatch) timedOut() bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.fired
}

// stop ends the watch; called before the handler returns.
func (w *bodyWatch) stop() {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.done = true
	if w.timer != nil {
		w.timer.Stop()
	}
}
