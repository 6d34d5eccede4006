package proxy

import (
	"errors"
	"io"
	"sync"
)

var errDetached = errors.New("request body: attempt abandoned for a retry")

// replay lets a request body be sent again on a retry. Bytes read by an
// attempt are recorded up to limit; while the record holds everything read
// so far, a new attempt replays it and then continues with the unread rest.
// Once more than limit bytes were read the body is no longer replayable.
// Each attempt reads through its own view; starting a new view detaches the
// previous one (the transport may still touch it after RoundTrip returned).
type replay struct {
	mu       sync.Mutex
	src      io.ReadCloser
	buf      []byte
	limit    int
	overflow bool
	eof      bool
	srcErr   error
	cur      *replayView
	read     int64 // bytes taken from src, for telemetry
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

// replayable reports whether a new attempt can resend the body.
func (r *replay) replayable() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return !r.overflow
}

// view starts a new attempt's reader.
func (r *replay) view() io.ReadCloser {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.cur != nil {
		r.cur.detached = true
	}
	v := &replayView{r: r}
	r.cur = v
	return v
}

type replayView struct {
	r        *replay
	off      int
	detached bool
}

func (v *replayView) Read(p []byte) (int, error) {
	r := v.r
	r.mu.Lock()
	defer r.mu.Unlock()
	if v.detached {
		return 0, errDetached
	}
	if v.off < len(r.buf) {
		n := copy(p, r.buf[v.off:])
		v.off += n
		return n, nil
	}
	if r.eof {
		return 0, io.EOF
	}
	if r.srcErr != nil {
		return 0, r.srcErr
	}
	// Reading from the client while holding the lock is fine: only one
	// view is active, and a detached view returns before reaching here.
	n, err := r.src.Read(p)
	r.read += int64(n)
	if !r.overflow {
		if len(r.buf)+n <= r.limit {
			r.buf = append(r.buf, p[:n]...)
			v.off += n
		} else {
			r.overflow = true
			r.buf = nil
			v.off = 0
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
	return n, err
}

// Close of a view does not close the client's body: a retry may need it.
func (v *replayView) Close() error { return nil }
