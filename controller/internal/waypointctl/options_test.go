package waypointctl

import (
	"errors"
	"fmt"
	"net"
	"net/url"
	"strings"
	"syscall"
	"testing"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	"k8s.io/apimachinery/pkg/runtime/schema"
)

func TestApplyOptionsValidate(t *testing.T) {
	good := applyOptions{name: "waypoint", forTraffic: "service", timeout: time.Second}
	for _, tc := range []struct {
		name   string
		mutate func(*applyOptions)
		err    string
	}{
		{"defaults", func(*applyOptions) {}, ""},
		{"for all, yaml", func(o *applyOptions) { o.forTraffic, o.output = "all", "yaml" }, ""},
		{"service account", func(o *applyOptions) { o.serviceAccount = "reviews" }, ""},
		{"name that cannot name a Service", func(o *applyOptions) { o.name = "Way.point" }, "--name"},
		{"for none is not offered", func(o *applyOptions) { o.forTraffic = "none" }, "--for"},
		{"bad service account", func(o *applyOptions) { o.serviceAccount = "Bad_SA" }, "--service-account"},
		{"timeout", func(o *applyOptions) { o.timeout = 0 }, "--timeout"},
		{"output", func(o *applyOptions) { o.output = "wide" }, "--output"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			o := good
			tc.mutate(&o)
			err := o.validate()
			if tc.err == "" && err != nil || tc.err != "" && (err == nil || !strings.Contains(err.Error(), tc.err)) {
				t.Fatalf("validate() = %v, want %q", err, tc.err)
			}
		})
	}
}

// TestApplyDefaults: a service account's waypoint is named after it and
// serves workloads unless told otherwise.
func TestApplyDefaults(t *testing.T) {
	for _, tc := range []struct {
		name                string
		o                   applyOptions
		nameGiven, forGiven bool
		wantName, wantFor   string
	}{
		{"plain", applyOptions{}, false, false, "waypoint", "service"},
		{"service account", applyOptions{serviceAccount: "reviews"}, false, false, "reviews-waypoint", "workload"},
		{"service account, --for all", applyOptions{serviceAccount: "reviews", forTraffic: "all"}, false, true, "reviews-waypoint", "all"},
		{"service account, --for service is kept", applyOptions{serviceAccount: "reviews", forTraffic: "service"}, false, true,
			"reviews-waypoint", "service"},
		{"--name and --for", applyOptions{name: "l7", forTraffic: "all"}, true, true, "l7", "all"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			o := tc.o
			o.defaults(tc.nameGiven, tc.forGiven)
			if o.name != tc.wantName || o.forTraffic != tc.wantFor {
				t.Errorf("name %q, for %q; want %q, %q", o.name, o.forTraffic, tc.wantName, tc.wantFor)
			}
		})
	}
}

func TestExplain(t *testing.T) {
	gr := schema.GroupResource{Group: "gateway.networking.k8s.io", Resource: "gateways"}
	refused := &url.Error{Op: "Get", URL: "https://10.0.0.1:6443/api", Err: &net.OpError{Op: "dial", Net: "tcp", Err: syscall.ECONNREFUSED}}
	for _, tc := range []struct {
		name string
		err  error
		want string
	}{
		{"no kind", &meta.NoKindMatchError{GroupKind: schema.GroupKind{Group: gr.Group, Kind: "Gateway"}, SearchedVersions: []string{"v1"}},
			"Gateway API CRDs"},
		{"forbidden", apierrors.NewForbidden(gr, "x", errors.New("no")), "list gateways: permission denied"},
		{"unauthorized", apierrors.NewUnauthorized("who"), "rejected your credentials"},
		{"refused", refused, "cannot reach the Kubernetes API server at https://10.0.0.1:6443"},
		{"other", apierrors.NewConflict(gr, "x", errors.New("busy")), "list gateways: Operation cannot be fulfilled"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := explain(tc.err, "https://10.0.0.1:6443", "list gateways")
			if !strings.Contains(got.Error(), tc.want) {
				t.Errorf("explain = %q, want it to contain %q", got, tc.want)
			}
			if !errors.Is(got, tc.err) {
				t.Errorf("explain lost the original error: %v", fmt.Sprint(got))
			}
		})
	}
}
