package proxy

import (
	"errors"
	"io"
	"sync"
)

var (
	// errAbandoned is what an abandoned attempt's transport reads.
	errAbandoned = errors.New("request body: attempt abandoned for a retry")
	// errNotReplayable: a new attempt would miss the beginning of the body
	// (never expected: retire decides before an attempt starts).
	errNotReplayable = errors.New("request body: no longer replayable")
)

// replay lets a request body be sent again on a retry. Bytes taken from the
// client are recorded up to limit; while the record holds everything taken
// so far, a new attempt replays it and then continues with the rest.
//
// Each attempt reads through its own view. Retiring an attempt (retire)
// kills its view at once, before the retry's backoff: the transport may
// still hold it after RoundTrip returned, and must not take any more of the
// client's bytes through it. The decision to retry is final: a read from
// the client never takes the record past limit unless it is the only live
// view's and that view is level with the client, so a read still in flight
// in a killed view cannot make the body unreplayable afterwards (its bytes
// join the record for the next attempt).
//
// The lock is never held while reading from the client: a retry must not
// wait for a slow client's next bytes. One read from the client is in
// flight at a time; a view that catches up with it waits for its end.
type replay struct {
	mu       sync.Mutex
	src      io.ReadCloser
	buf      []byte
	limit    int
	overflow bool  // more than limit bytes were taken: buf is dropped
	taken    int64 // bytes taken from src
	eof      bool
	srcErr   error
	reading  bool          // a read from src is in flight (without mu)
	wake     chan struct{} // closed when it ends; nil when nobody waits
	cur      *replayView
	// eofFn is called once, with the whole body, when src ends within
	// limit (to mirror a body of unknown length).
	eofFn func(body []byte)
}

// onEOF arranges for f to get the whole body once it has been read, if it
// fits the limit. Set it before the first read.
func (r *replay) onEOF(f func(body []byte)) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.eofFn = f
}

func newReplay(src io.ReadCloser, limit int) *replay { return &replay{src: src, limit: limit} }

// next starts a new attempt's view, killing the previous one. It fails when
// the record no longer holds the whole body taken so far.
func (r *replay) next() (*replayView, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.killLocked()
	if r.overflow {
		return nil, errNotReplayable
	}
	v := &replayView{r: r}
	r.cur = v
	return v, nil
}

// retire ends the attempt reading through v if the body can be replayed to
// a new one: then v is dead (its reads fail) and retire reports true. When
// the body cannot be replayed, v stays live (the attempt's response is
// what the client gets, and its upload may go on) and retire reports false.
func (r *replay) retire(v *replayView) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	// A read in flight from a full record may take the body past the
	// limit: not replayable.
	if r.overflow || r.srcErr != nil || r.reading && len(r.buf) == r.limit {
		return false
	}
	if r.cur == v {
		r.killLocked()
	}
	return true
}

// replayable reports whether a new attempt could resend the body now (the
// final say is retire's).
func (r *replay) replayable() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return !r.overflow && r.srcErr == nil
}

// clientFailed reports whether reading the client's body failed (the
// client reset or broke its upload): an attempt that failed then says
// nothing about the upstream.
func (r *replay) clientFailed() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.srcErr != nil
}

// killLocked kills the current view and wakes views waiting for a read.
func (r *replay) killLocked() {
	if r.cur != nil {
		r.cur.dead = true
		r.cur = nil
	}
	r.wakeLocked()
}

func (r *replay) wakeLocked() {
	if r.wake != nil {
		close(r.wake)
		r.wake = nil
	}
}

type replayView struct {
	r    *replay
	off  int64
	dead bool // guarded by r.mu
}

func (v *replayView) Read(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	r := v.r
	r.mu.Lock()
	for {
		if v.dead {
			r.mu.Unlock()
			return 0, errAbandoned
		}
		if v.off < r.taken {
			if r.overflow {
				// Never expected: views are level with the client once
				// the record is dropped.
				r.mu.Unlock()
				return 0, errNotReplayable
			}
			n := copy(p, r.buf[v.off:])
			v.off += int64(n)
			r.mu.Unlock()
			return n, nil
		}
		if r.eof {
			r.mu.Unlock()
			return 0, io.EOF
		}
		if r.srcErr != nil {
			err := r.srcErr
			r.mu.Unlock()
			return 0, err
		}
		if !r.reading {
			break
		}
		// A killed view's read is in flight: its bytes join the record.
		if r.wake == nil {
			r.wake = make(chan struct{})
		}
		ch := r.wake
		r.mu.Unlock()
		<-ch
		r.mu.Lock()
	}
	// Level with the client: read from it without the lock. While the
	// record is kept, a read never takes it past the limit; only the first
	// byte beyond drops it, and then v is the only live view.
	q := p
	if !r.overflow {
		if room := r.limit - len(r.buf); room > 0 && room < len(q) {
			q = q[:room]
		}
	}
	r.reading = true
	r.mu.Unlock()
	n, err := r.src.Read(q)
	r.mu.Lock()
	r.reading = false
	r.wakeLocked()
	r.taken += int64(n)
	if !r.overflow {
		if len(r.buf)+n <= r.limit {
			r.buf = append(r.buf, q[:n]...)
		} else {
			r.overflow = true
			r.buf = nil
		}
	}
	if err == io.EOF {
		r.eof = true
		if f := r.eofFn; f != nil && !r.overflow {
			r.eofFn = nil
			// buf no longer changes once the body has ended.
			f(r.buf)
		}
	} else if err != nil {
		r.srcErr = err
	}
	if v.dead {
		// Killed during the read: the bytes are recorded for the next
		// attempt, not sent by this one.
		r.mu.Unlock()
		return 0, errAbandoned
	}
	v.off += int64(n)
	r.mu.Unlock()
	return n, err
}

// Close of a view does not close the client's body (a retry may need it);
// the view is dead afterwards.
func (v *replayView) Close() error {
	r := v.r
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.cur == v {
		r.killLocked()
	}
	v.dead = true
	return nil
}
