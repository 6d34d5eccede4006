package hbone

import (
	"errors"
	"fmt"
	"net/http"

	"golang.org/x/net/http2"
)

// Handler decision errors and the statuses they map to (and back, on the
// client, through StatusError).
var (
	ErrDenied      = errors.New("hbone: denied")            // 401
	ErrBadTarget   = errors.New("hbone: bad target")        // 400
	ErrUnreachable = errors.New("hbone: unreachable")       // 503
	ErrStatus      = errors.New("hbone: unexpected status") // any other non-200
	// ErrReset reports a stream reset by either side (see ResetError).
	ErrReset = errors.New("hbone: stream reset")
	// ErrClientClosed is returned by Dial after Close.
	ErrClientClosed = errors.New("hbone: client closed")
	// errRefused: the server did not process the stream (REFUSED_STREAM or
	// beyond its GOAWAY); safe to retry on another connection.
	errRefused = errors.New("hbone: stream refused")
	// errConnClosed: the HTTP/2 connection is gone.
	errConnClosed = errors.New("hbone: connection closed")
)

// StatusError is a non-200 answer to CONNECT. It wraps ErrDenied (401),
// ErrBadTarget (400), ErrUnreachable (503) or ErrStatus.
type StatusError struct {
	Code int
}

func (e *StatusError) Error() string {
	return fmt.Sprintf("hbone: CONNECT answered %d %s", e.Code, http.StatusText(e.Code))
}

func (e *StatusError) Unwrap() error {
	switch e.Code {
	case http.StatusUnauthorized, http.StatusForbidden:
		return ErrDenied
	case http.StatusBadRequest:
		return ErrBadTarget
	case http.StatusServiceUnavailable, http.StatusBadGateway, http.StatusGatewayTimeout:
		return ErrUnreachable
	}
	return ErrStatus
}

// statusFor maps a handler error to the status sent to the client.
func statusFor(err error) int {
	switch {
	case errors.Is(err, ErrDenied):
		return http.StatusUnauthorized
	case errors.Is(err, ErrBadTarget):
		return http.StatusBadRequest
	default:
		return http.StatusServiceUnavailable
	}
}

// ResetError is the error of a stream reset with RST_STREAM. It wraps ErrReset.
type ResetError struct {
	Code   http2.ErrCode
	Remote bool // the peer reset the stream
}

func (e *ResetError) Error() string {
	if e.Remote {
		return fmt.Sprintf("hbone: stream reset by peer (%v)", e.Code)
	}
	return fmt.Sprintf("hbone: stream reset (%v)", e.Code)
}

func (e *ResetError) Unwrap() error { return ErrReset }
