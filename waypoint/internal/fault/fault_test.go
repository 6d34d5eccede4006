package fault

import (
	"testing"
	"time"

	discoveryv1 "github.com/amesh-dev/amesh/api/discovery/v1"
	"google.golang.org/protobuf/types/known/durationpb"
)

func TestDecidePercentages(t *testing.T) {
	f := &discoveryv1.FaultInjection{
		Delay: &discoveryv1.FaultDelay{Percent: 25, Duration: durationpb.New(time.Second)},
		Abort: &discoveryv1.FaultAbort{Percent: 50, HttpStatus: 418},
	}
	const n = 20000
	var delays, aborts int
	for range n {
		d := Decide(f, nil)
		if d.Delay > 0 {
			delays++
		}
		if d.Abort {
			aborts++
			if d.HTTPStatus != 418 {
				t.Fatalf("status %d", d.HTTPStatus)
			}
		}
	}
	// Binomial: sd of 25% of 20000 is ~61, of 50% ~71; allow 5 sd.
	if delays < 5000-310 || delays > 5000+310 {
		t.Errorf("delays %d of %d, want ~25%%", delays, n)
	}
	if aborts < 10000-355 || aborts > 10000+355 {
		t.Errorf("aborts %d of %d, want ~50%%", aborts, n)
	}
	if d := Decide(nil, nil); d.Abort || d.Delay != 0 {
		t.Error("nil fault injected something")
	}
	full := &discoveryv1.FaultInjection{Abort: &discoveryv1.FaultAbort{Percent: 100, GrpcStatus: 14}}
	if d := Decide(full, nil); !d.Abort || d.GRPCStatus != 14 || d.HTTPStatus != 503 {
		t.Errorf("grpc abort = %+v", d)
	}
}
