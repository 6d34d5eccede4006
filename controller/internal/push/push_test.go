package push

import (
	"slices"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"

	pb "github.com/amesh-dev/amesh/api/discovery/v1"
	"github.com/amesh-dev/amesh/api/xds"
	"github.com/amesh-dev/amesh/controller/internal/translate"
)

// recorder is a Publisher that records calls.
type recorder struct {
	calls []call
}

type call struct {
	op, typeURL string
	names       []string
	removes     []string
}

func (r *recorder) Set(typeURL string, all []*xds.Resource) error {
	r.calls = append(r.calls, call{op: "set", typeURL: typeURL, names: names(all)})
	return nil
}

func (r *recorder) Update(typeURL string, upserts []*xds.Resource, removes []string) error {
	slices.Sort(removes)
	r.calls = append(r.calls, call{op: "update", typeURL: typeURL, names: names(upserts), removes: removes})
	return nil
}

func names(rs []*xds.Resource) []string {
	var out []string
	for _, r := range rs {
		out = append(out, r.Name)
	}
	slices.Sort(out)
	return out
}

// TestPublishIncremental: the first publication sets every type in full;
// later ones send only messages that are new objects, and removals.
func TestPublishIncremental(t *testing.T) {
	w1 := &pb.Workload{Uid: "a"}
	w2 := &pb.Workload{Uid: "b"}
	svc := &pb.Service{Namespace: "ns", Hostname: "s.ns.svc.cluster.local"}
	ws := &pb.WaypointService{Service: "ns/s.ns.svc.cluster.local", Gateway: "ns/wp"}
	out := &translate.Output{Workloads: []*pb.Workload{w1, w2}, Services: []*pb.Service{svc}, WaypointServices: []*pb.WaypointService{ws}}
	rec := &recorder{}
	prev := newPublished()
	if err := Publish(rec, prev, out); err != nil {
		t.Fatal(err)
	}
	if len(rec.calls) != 6 {
		t.Fatalf("first publication: %d calls, want a Set per type: %+v", len(rec.calls), rec.calls)
	}
	// Even a type with nothing in it is Set: the server answers a type
	// only once it has a state, and waypoints wait for WaypointGateway.
	if !slices.ContainsFunc(rec.calls, func(c call) bool { return c.typeURL == pb.WaypointGatewayType && len(c.names) == 0 }) {
		t.Errorf("no empty Set of WaypointGateway: %+v", rec.calls)
	}
	for _, c := range rec.calls {
		if c.op != "set" {
			t.Errorf("first publication used %s for %s", c.op, c.typeURL)
		}
	}

	// Unchanged: nothing is sent.
	rec.calls = nil
	if err := Publish(rec, prev, out); err != nil {
		t.Fatal(err)
	}
	if len(rec.calls) != 0 {
		t.Fatalf("unchanged output sent %+v", rec.calls)
	}

	// One workload replaced, one removed, one added.
	w1b := &pb.Workload{Uid: "a", Node: "n"}
	w3 := &pb.Workload{Uid: "c"}
	out2 := *out
	out2.Workloads = []*pb.Workload{w1b, w3}
	if err := Publish(rec, prev, &out2); err != nil {
		t.Fatal(err)
	}
	want := []call{{op: "update", typeURL: pb.WorkloadType, names: []string{"a", "c"}, removes: []string{"b"}}}
	if len(rec.calls) != 1 || rec.calls[0].op != want[0].op || rec.calls[0].typeURL != want[0].typeURL ||
		!slices.Equal(rec.calls[0].names, want[0].names) || !slices.Equal(rec.calls[0].removes, want[0].removes) {
		t.Fatalf("got %+v, want %+v", rec.calls, want)
	}
}

// TestSubscriberVisibility: ztunnel sees no WaypointService or
// WaypointGateway; a waypoint sees only those of its Gateway; everything else is visible to both.
func TestSubscriberVisibility(t *testing.T) {
	zt := NewSubscriber("ztunnel/node-a/zt", "")
	wp := NewSubscriber("waypoint/ns/wp/pod", "ns/wp")
	mine := &xds.Resource{Name: "ns/a", Scope: ScopeGateway + "ns/wp"}
	other := &xds.Resource{Name: "ns/b", Scope: ScopeGateway + "ns/other"}
	for _, tc := range []struct {
		sub     *Subscriber
		typeURL string
		r       *xds.Resource
		want    bool
	}{
		{zt, pb.WorkloadType, &xds.Resource{Name: "w"}, true},
		{zt, pb.WaypointServiceType, mine, false},
		{wp, pb.WaypointServiceType, mine, true},
		{wp, pb.WaypointServiceType, other, false},
		{zt, pb.WaypointGatewayType, mine, false},
		{wp, pb.WaypointGatewayType, mine, true},
		{wp, pb.WaypointGatewayType, other, false},
		{wp, pb.ServiceType, &xds.Resource{Name: "s"}, true},
		{wp, pb.AuthorizationType, &xds.Resource{Name: "a"}, true},
	} {
		if got := tc.sub.Visible(tc.typeURL, tc.r); got != tc.want {
			t.Errorf("%s sees %s %s: %v, want %v", tc.sub.ID(), tc.typeURL, tc.r.Name, got, tc.want)
		}
	}
}

// TestStoreTriggers: updates that cannot change the translation (status
// the controller writes itself) are stored without starting one; others
// start one.
func TestStoreTriggers(t *testing.T) {
	svc := &corev1.Service{ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: "s"}}
	svcStatus := svc.DeepCopy()
	svcStatus.Status.Conditions = []metav1.Condition{{Type: "amesh.dev/WaypointBound", Status: metav1.ConditionTrue}}
	svcLabel := svc.DeepCopy()
	svcLabel.Labels = map[string]string{"amesh.dev/use-waypoint": "wp"}
	route := &gwv1.HTTPRoute{ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: "r", Generation: 1}}
	routeStatus := route.DeepCopy()
	routeStatus.Status.Parents = []gwv1.RouteParentStatus{{ControllerName: "x"}}
	routeSpec := route.DeepCopy()
	routeSpec.Generation = 2
	rs := &appsv1.ReplicaSet{ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: "rs", Generation: 1}}
	rsOwned := rs.DeepCopy()
	rsOwned.OwnerReferences = []metav1.OwnerReference{{Kind: "Deployment", Name: "d", UID: "u"}}
	gc := &gwv1.GatewayClass{ObjectMeta: metav1.ObjectMeta{Name: "amesh-waypoint", Generation: 1}}
	gcStatus := gc.DeepCopy()
	gcStatus.Status.Conditions = []metav1.Condition{{Type: "Accepted", Status: metav1.ConditionTrue}}
	gcSpec := gc.DeepCopy()
	gcSpec.Generation = 2
	gcSpec.Spec.ControllerName = "example.com/gw"
	ignore := map[string]func(old, cur client.Object) bool{}
	for _, k := range kinds() {
		ignore[kindOf(k.obj)] = k.ignore
	}
	for _, tc := range []struct {
		name     string
		old, cur client.Object
		want     bool
	}{
		{"service status", svc, svcStatus, false},
		{"service label", svc, svcLabel, true},
		{"route status", route, routeStatus, false},
		{"route spec", route, routeSpec, true},
		{"replicaset adopted", rs, rsOwned, true},
		{"gatewayclass status", gc, gcStatus, false},
		{"gatewayclass spec", gc, gcSpec, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := newStore()
			fired := false
			h := s.handler(ignore[kindOf(tc.old)], func() { fired = true })
			h.OnUpdate(tc.old, tc.cur)
			if fired != tc.want {
				t.Errorf("translation started: %v, want %v", fired, tc.want)
			}
			if got := s.objs[kindOf(tc.cur)][tc.cur.GetNamespace()+"/"+tc.cur.GetName()]; got != tc.cur {
				t.Errorf("the store does not hold the new object")
			}
		})
	}
}
