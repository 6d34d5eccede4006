// Package fault decides fault injection (delay and abort by percentage) for
// one request.
package fault

import (
	"math/rand/v2"
	"time"

	discoveryv1 "github.com/amesh-dev/amesh/api/discovery/v1"
)

// Decision is what to inject into one request.
type Decision struct {
	Delay time.Duration
	// Abort is set when the request must be answered with HTTPStatus (or,
	// for gRPC with a GRPCStatus, with that grpc-status).
	Abort      bool
	HTTPStatus int
	GRPCStatus uint32
}

// Decide draws the faults for one request; rnd returns a float in [0,100).
// rnd may be nil.
func Decide(f *discoveryv1.FaultInjection, rnd func() float64) Decision {
	var d Decision
	if f == nil {
		return d
	}
	if rnd == nil {
		rnd = func() float64 { return rand.Float64() * 100 }
	}
	if dl := f.GetDelay(); dl != nil && dl.GetDuration().AsDuration() > 0 && rnd() < dl.GetPercent() {
		d.Delay = dl.GetDuration().AsDuration()
	}
	if ab := f.GetAbort(); ab != nil && (ab.GetHttpStatus() != 0 || ab.GetGrpcStatus() != 0) && rnd() < ab.GetPercent() {
		d.Abort = true
		d.HTTPStatus = int(ab.GetHttpStatus())
		if d.HTTPStatus < 200 || d.HTTPStatus > 599 {
			d.HTTPStatus = 503
		}
		d.GRPCStatus = ab.GetGrpcStatus()
	}
	return d
}
