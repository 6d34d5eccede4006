package deployer_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/controller-runtime/pkg/client"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"
)

const (
	tr = metav1.ConditionTrue
	fa = metav1.ConditionFalse
)

// TestDeployer runs the deployer against a real apiserver (with the
// garbage collector of kube-controller-manager) and checks what it makes of
// waypoint Gateways: the owned objects, their repair, the status, the
// rejections and the removals.
func TestDeployer(t *testing.T) {
	e := startEnv(t)
	ctx := context.Background()

	e.eventually("GatewayClass amesh-waypoint accepted", func() error {
		var gc gwv1.GatewayClass
		if err := e.get("", "amesh-waypoint", &gc); err != nil {
			return err
		}
		return conditionIs(gc.Status.Conditions, "Accepted", tr, "Accepted")
	})

	t.Run("deploys and reports status", func(t *testing.T) {
		e := e.on(t)
		e.namespace("shop")
		gw := waypoint("shop", "waypoint")
		gw.Labels = map[string]string{"amesh.dev/waypoint-for": "service"}
		gw.Spec.Infrastructure = &gwv1.GatewayInfrastructure{
			Labels:      map[gwv1.LabelKey]gwv1.LabelValue{"team": "shop"},
			Annotations: map[gwv1.AnnotationKey]gwv1.AnnotationValue{"example.com/owner": "shop-team"},
		}
		e.create(gw)
		gw = e.gateway("shop", "waypoint")

		var (
			sa  corev1.ServiceAccount
			svc corev1.Service
			dep appsv1.Deployment
		)
		e.eventually("ServiceAccount, Service and Deployment", func() error {
			return errors.Join(e.get("shop", "waypoint", &sa), e.get("shop", "waypoint", &svc), e.get("shop", "waypoint", &dep))
		})
		for _, o := range []client.Object{&sa, &svc, &dep} {
			checkOwner(t, o, gw)
			l := o.GetLabels()
			if l["gateway.networking.k8s.io/gateway-name"] != "waypoint" || l["team"] != "shop" {
				t.Errorf("%T labels %v: want the gateway-name and the infrastructure labels", o, l)
			}
			if o.GetAnnotations()["example.com/owner"] != "shop-team" {
				t.Errorf("%T annotations %v: want the infrastructure annotations", o, o.GetAnnotations())
			}
		}
		if sa.AutomountServiceAccountToken == nil || *sa.AutomountServiceAccountToken {
			t.Error("the waypoint's ServiceAccount automounts an API token")
		}
		checkService(t, &svc)
		checkDeployment(t, &dep)

		e.eventually("Accepted, waiting for the Deployment", func() error {
			gw := e.gateway("shop", "waypoint")
			return errors.Join(
				conditionIs(gw.Status.Conditions, "Accepted", tr, "Accepted"),
				conditionIs(gw.Status.Conditions, "Programmed", fa, "Pending"),
				addressesAre(gw, svc.Spec.ClusterIP, "waypoint.shop.svc.cluster.local"),
				listenerIs(gw, "mesh", "Accepted", tr, "Accepted"),
				listenerIs(gw, "mesh", "Programmed", fa, "Pending"),
			)
		})
		gw = e.gateway("shop", "waypoint")
		if c := findCond(gw.Status.Conditions, "Accepted"); c.ObservedGeneration != gw.Generation {
			t.Errorf("Accepted observedGeneration %d, want %d", c.ObservedGeneration, gw.Generation)
		}
		// The namespace has no root certificate yet: the status says why
		// no pod can start, until the controller publishes it.
		const hint = "its pods cannot start before the ConfigMap amesh-root-cert exists"
		if m := findCond(gw.Status.Conditions, "Programmed").Message; !strings.Contains(m, hint) {
			t.Errorf("Programmed message %q does not explain the missing root certificate", m)
		}
		e.create(&corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Namespace: "shop", Name: "amesh-root-cert"},
			Data: map[string]string{"root-cert.pem": "roots"}})
		e.eventually("the hint goes with the missing ConfigMap", func() error {
			c := findCond(e.gateway("shop", "waypoint").Status.Conditions, "Programmed")
			if strings.Contains(c.Message, hint) || c.Reason != "Pending" {
				return fmt.Errorf("Programmed %s %q", c.Reason, c.Message)
			}
			return nil
		})

		// What the Deployment controller and kubelet would report once a
		// waypoint pod is ready.
		e.setAvailable(&dep, 1)
		e.eventually("Programmed", func() error {
			gw := e.gateway("shop", "waypoint")
			return errors.Join(
				conditionIs(gw.Status.Conditions, "Programmed", tr, "Programmed"),
				listenerIs(gw, "mesh", "Programmed", tr, "Programmed"),
			)
		})
		gw = e.gateway("shop", "waypoint")
		if m := findCond(gw.Status.Conditions, "Programmed").Message; !strings.Contains(m, svc.Spec.ClusterIP+":15008") {
			t.Errorf("Programmed message %q does not give the HBONE address", m)
		}
		// The last replica goes away: no longer programmed.
		e.setAvailable(&dep, 0)
		e.eventually("Programmed again false", func() error {
			return conditionIs(e.gateway("shop", "waypoint").Status.Conditions, "Programmed", fa, "Pending")
		})
	})

	t.Run("repairs drift and keeps what it does not own", func(t *testing.T) {
		e := e.on(t)
		e.namespace("drift")
		e.create(waypoint("drift", "waypoint"))
		var dep appsv1.Deployment
		e.eventually("Deployment", func() error { return e.get("drift", "waypoint", &dep) })
		want := dep.Spec.Template.DeepCopy()

		// An operator scales it; someone tampers with the image, the
		// capture opt-out label and the arguments.
		e.update(&dep, func() {
			dep.Spec.Replicas = ptr.To[int32](3)
			c := &dep.Spec.Template.Spec.Containers[0]
			c.Image = "registry.example/evil:1"
			c.Args = []string{"-gateway=other/x"}
			delete(dep.Spec.Template.Labels, "amesh.dev/dataplane-mode")
		})
		e.eventually("Deployment repaired", func() error {
			var d appsv1.Deployment
			if err := e.get("drift", "waypoint", &d); err != nil {
				return err
			}
			got, w := d.Spec.Template.Spec.Containers[0], want.Spec.Containers[0]
			switch {
			case got.Image != w.Image:
				return fmt.Errorf("image %s", got.Image)
			case !slices.Equal(got.Args, w.Args):
				return fmt.Errorf("args %v", got.Args)
			case d.Spec.Template.Labels["amesh.dev/dataplane-mode"] != "none":
				return fmt.Errorf("pod labels %v", d.Spec.Template.Labels)
			}
			if d.Spec.Replicas == nil || *d.Spec.Replicas != 3 {
				return fmt.Errorf("replicas %v: the operator's scaling was undone", d.Spec.Replicas)
			}
			return nil
		})

		var svc corev1.Service
		if err := e.get("drift", "waypoint", &svc); err != nil {
			t.Fatal(err)
		}
		e.update(&svc, func() { svc.Spec.Selector = map[string]string{"app": "evil"} })
		e.eventually("Service selector repaired", func() error {
			var s corev1.Service
			if err := e.get("drift", "waypoint", &s); err != nil {
				return err
			}
			if len(s.Spec.Selector) != 1 || s.Spec.Selector["gateway.networking.k8s.io/gateway-name"] != "waypoint" {
				return fmt.Errorf("selector %v", s.Spec.Selector)
			}
			return nil
		})

		// Deleted objects come back.
		var sa corev1.ServiceAccount
		if err := e.get("drift", "waypoint", &sa); err != nil {
			t.Fatal(err)
		}
		if err := e.c.Delete(ctx, &sa); err != nil {
			t.Fatal(err)
		}
		if err := e.c.Delete(ctx, &svc); err != nil {
			t.Fatal(err)
		}
		e.eventually("ServiceAccount and Service recreated", func() error {
			var sa2 corev1.ServiceAccount
			var svc2 corev1.Service
			if err := errors.Join(e.get("drift", "waypoint", &sa2), e.get("drift", "waypoint", &svc2)); err != nil {
				return err
			}
			if sa2.UID == sa.UID || svc2.UID == svc.UID {
				return errors.New("not recreated yet")
			}
			return nil
		})
	})

	t.Run("updates follow the Gateway", func(t *testing.T) {
		e := e.on(t)
		e.namespace("upd")
		gw := waypoint("upd", "waypoint")
		gw.Spec.Infrastructure = &gwv1.GatewayInfrastructure{
			Labels:      map[gwv1.LabelKey]gwv1.LabelValue{"team": "a"},
			Annotations: map[gwv1.AnnotationKey]gwv1.AnnotationValue{"example.com/drop": "me"},
		}
		e.create(gw)
		var dep appsv1.Deployment
		e.eventually("Deployment", func() error { return e.get("upd", "waypoint", &dep) })
		e.update(gw, func() {
			gw.Spec.Infrastructure = &gwv1.GatewayInfrastructure{Labels: map[gwv1.LabelKey]gwv1.LabelValue{"team": "b"}}
		})
		e.eventually("infrastructure labels and annotations follow", func() error {
			var d appsv1.Deployment
			if err := e.get("upd", "waypoint", &d); err != nil {
				return err
			}
			if d.Labels["team"] != "b" || d.Spec.Template.Labels["team"] != "b" {
				return fmt.Errorf("labels %v, pod labels %v", d.Labels, d.Spec.Template.Labels)
			}
			if _, ok := d.Annotations["example.com/drop"]; ok {
				return fmt.Errorf("annotations %v: the removed one is still there", d.Annotations)
			}
			return nil
		})
	})

	t.Run("rejects listeners other than HBONE on 15008", func(t *testing.T) {
		e := e.on(t)
		e.namespace("lst")
		e.create(waypoint("lst", "waypoint",
			gwv1.Listener{Name: "http", Port: 80, Protocol: gwv1.HTTPProtocolType},
			gwv1.Listener{Name: "alt", Port: 15009, Protocol: "HBONE"},
		))
		e.eventually("listener status", func() error {
			gw := e.gateway("lst", "waypoint")
			return errors.Join(
				conditionIs(gw.Status.Conditions, "Accepted", tr, "ListenersNotValid"),
				listenerIs(gw, "mesh", "Accepted", tr, "Accepted"),
				listenerIs(gw, "http", "Accepted", fa, "UnsupportedProtocol"),
				listenerIs(gw, "http", "Programmed", fa, "Invalid"),
				listenerIs(gw, "alt", "Accepted", fa, "PortUnavailable"),
			)
		})
		var dep appsv1.Deployment
		if err := e.get("lst", "waypoint", &dep); err != nil {
			t.Fatalf("the valid mesh listener is still deployed: %v", err)
		}
	})

	t.Run("a Gateway without the mesh listener is not deployed, and is removed when it loses it", func(t *testing.T) {
		e := e.on(t)
		e.namespace("bad")
		gw := waypoint("bad", "web")
		gw.Spec.Listeners = []gwv1.Listener{{Name: "web", Port: 80, Protocol: gwv1.HTTPProtocolType}}
		e.create(gw)
		e.eventually("not accepted", func() error {
			gw := e.gateway("bad", "web")
			return errors.Join(
				conditionIs(gw.Status.Conditions, "Accepted", fa, "ListenersNotValid"),
				conditionIs(gw.Status.Conditions, "Programmed", fa, "Invalid"),
			)
		})
		if g := e.gateway("bad", "web"); len(g.Status.Addresses) != 0 {
			t.Errorf("addresses %v on a Gateway that is not accepted", g.Status.Addresses)
		}
		e.absent("bad", "web")

		later := waypoint("bad", "later")
		e.create(later)
		var dep appsv1.Deployment
		e.eventually("deployed", func() error { return e.get("bad", "later", &dep) })
		e.update(later, func() {
			later.Spec.Listeners = []gwv1.Listener{{Name: "web", Port: 80, Protocol: gwv1.HTTPProtocolType}}
		})
		e.eventually("removed", func() error {
			for _, o := range []client.Object{&corev1.ServiceAccount{}, &corev1.Service{}, &appsv1.Deployment{}} {
				if err := e.get("bad", "later", o); !apierrors.IsNotFound(err) {
					return fmt.Errorf("%T still there (%v)", o, err)
				}
			}
			return nil
		})
	})

	t.Run("an object of the same name that it does not own blocks the waypoint", func(t *testing.T) {
		e := e.on(t)
		e.namespace("taken")
		e.create(&corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Namespace: "taken", Name: "waypoint"}})
		e.create(waypoint("taken", "waypoint"))
		e.eventually("blocked", func() error {
			gw := e.gateway("taken", "waypoint")
			if err := conditionIs(gw.Status.Conditions, "Programmed", fa, "Invalid"); err != nil {
				return err
			}
			if m := findCond(gw.Status.Conditions, "Programmed").Message; !strings.Contains(m, "ServiceAccount taken/waypoint exists") {
				return fmt.Errorf("message %q", m)
			}
			return nil
		})
		var sa corev1.ServiceAccount
		if err := e.get("taken", "waypoint", &sa); err != nil {
			t.Fatal(err)
		}
		if len(sa.OwnerReferences) != 0 || len(sa.Labels) != 0 {
			t.Errorf("the user's ServiceAccount was taken over: %v %v", sa.OwnerReferences, sa.Labels)
		}
		var dep appsv1.Deployment
		if err := e.get("taken", "waypoint", &dep); !apierrors.IsNotFound(err) {
			t.Errorf("Deployment deployed next to a foreign ServiceAccount (%v)", err)
		}
		// Once the user's object is gone, the waypoint deploys.
		if err := e.c.Delete(ctx, &sa); err != nil {
			t.Fatal(err)
		}
		e.eventually("deployed after the conflict went away", func() error {
			return errors.Join(e.get("taken", "waypoint", &sa), e.get("taken", "waypoint", &dep))
		})
	})

	t.Run("two waypoints for one service account: the older serves, the conflict is reported", func(t *testing.T) {
		e := e.on(t)
		e.namespace("persa")
		a := waypoint("persa", "a-reviews")
		a.Annotations = map[string]string{"amesh.dev/for-service-account": "reviews"}
		e.create(a)
		e.eventually("a serves", func() error {
			return conditionIs(e.gateway("persa", "a-reviews").Status.Conditions, "amesh.dev/ForServiceAccount", tr, "Serving")
		})
		b := waypoint("persa", "b-reviews")
		b.Annotations = map[string]string{"amesh.dev/for-service-account": "reviews"}
		e.create(b)
		e.eventually("b conflicted, a told", func() error {
			gb, ga := e.gateway("persa", "b-reviews"), e.gateway("persa", "a-reviews")
			if err := errors.Join(
				conditionIs(gb.Status.Conditions, "amesh.dev/ForServiceAccount", fa, "Conflicted"),
				conditionIs(ga.Status.Conditions, "amesh.dev/ForServiceAccount", tr, "Serving"),
			); err != nil {
				return err
			}
			if m := findCond(gb.Status.Conditions, "amesh.dev/ForServiceAccount").Message; !strings.Contains(m, "a-reviews") {
				return fmt.Errorf("b's message %q does not name a-reviews", m)
			}
			if m := findCond(ga.Status.Conditions, "amesh.dev/ForServiceAccount").Message; !strings.Contains(m, "b-reviews") {
				return fmt.Errorf("a's message %q does not name b-reviews", m)
			}
			return nil
		})
		if err := e.c.Delete(ctx, a); err != nil {
			t.Fatal(err)
		}
		e.eventually("b serves once a is gone", func() error {
			return conditionIs(e.gateway("persa", "b-reviews").Status.Conditions, "amesh.dev/ForServiceAccount", tr, "Serving")
		})
	})

	t.Run("other classes are left alone", func(t *testing.T) {
		e := e.on(t)
		e.namespace("others")
		e.create(&gwv1.GatewayClass{
			ObjectMeta: metav1.ObjectMeta{Name: "other"},
			Spec:       gwv1.GatewayClassSpec{ControllerName: "example.com/other"},
		})
		e.create(&gwv1.GatewayClass{
			ObjectMeta: metav1.ObjectMeta{Name: "amesh-other"},
			Spec:       gwv1.GatewayClassSpec{ControllerName: "amesh.dev/waypoint-controller"},
		})
		ingress := waypoint("others", "ingress")
		ingress.Spec.GatewayClassName = "other"
		e.create(ingress)
		e.eventually("a second class naming amesh is refused", func() error {
			var gc gwv1.GatewayClass
			if err := e.get("", "amesh-other", &gc); err != nil {
				return err
			}
			return conditionIs(gc.Status.Conditions, "Accepted", fa, "Unsupported")
		})
		// A waypoint created after the foreign Gateway is reconciled; by
		// then the foreign one has long been seen.
		e.create(waypoint("others", "waypoint"))
		e.eventually("the waypoint deploys", func() error { return e.get("others", "waypoint", &appsv1.Deployment{}) })
		time.Sleep(500 * time.Millisecond)
		e.absent("others", "ingress")
		var gc gwv1.GatewayClass
		if err := e.get("", "other", &gc); err != nil {
			t.Fatal(err)
		}
		if g := e.gateway("others", "ingress"); !untouched(g.Status.Conditions) || len(g.Status.Listeners) != 0 || !untouched(gc.Status.Conditions) {
			t.Errorf("status written on a foreign Gateway %v or GatewayClass %v", g.Status, gc.Status.Conditions)
		}
	})

	t.Run("deleting the Gateway removes what it owns", func(t *testing.T) {
		e := e.on(t)
		e.namespace("gc")
		gw := waypoint("gc", "waypoint")
		e.create(gw)
		var dep appsv1.Deployment
		e.eventually("deployed", func() error {
			return errors.Join(e.get("gc", "waypoint", &corev1.ServiceAccount{}), e.get("gc", "waypoint", &corev1.Service{}), e.get("gc", "waypoint", &dep))
		})
		if err := e.c.Delete(ctx, gw); err != nil {
			t.Fatal(err)
		}
		e.eventually("collected", func() error {
			for _, o := range []client.Object{&corev1.ServiceAccount{}, &corev1.Service{}, &appsv1.Deployment{}} {
				if err := e.get("gc", "waypoint", o); !apierrors.IsNotFound(err) {
					return fmt.Errorf("%T still there (%v)", o, err)
				}
			}
			return nil
		})
	})
}

// on returns e reporting to t.
func (e *env) on(t *testing.T) *env {
	c := *e
	c.t = t
	return &c
}

// absent checks that nothing was deployed under name.
func (e *env) absent(ns, name string) {
	e.t.Helper()
	for _, o := range []client.Object{&corev1.ServiceAccount{}, &corev1.Service{}, &appsv1.Deployment{}} {
		if err := e.get(ns, name, o); !apierrors.IsNotFound(err) {
			e.t.Errorf("%T %s/%s exists (%v)", o, ns, name, err)
		}
	}
}

func (e *env) setAvailable(dep *appsv1.Deployment, n int32) {
	e.t.Helper()
	for range 10 {
		if err := e.get(dep.Namespace, dep.Name, dep); err != nil {
			e.t.Fatal(err)
		}
		dep.Status = appsv1.DeploymentStatus{
			ObservedGeneration: dep.Generation,
			Replicas:           n, UpdatedReplicas: n, ReadyReplicas: n, AvailableReplicas: n,
		}
		err := e.c.Status().Update(context.Background(), dep)
		if err == nil {
			return
		}
		if !apierrors.IsConflict(err) {
			e.t.Fatal(err)
		}
	}
	e.t.Fatal("deployment status: conflicts")
}

// untouched reports whether conditions are only the CRD's defaults
// (Unknown, Pending): no controller wrote them.
func untouched(conds []metav1.Condition) bool {
	for _, c := range conds {
		if c.Status != metav1.ConditionUnknown || c.Reason != "Pending" {
			return false
		}
	}
	return true
}

func findCond(conds []metav1.Condition, typ string) metav1.Condition {
	for _, c := range conds {
		if c.Type == typ {
			return c
		}
	}
	return metav1.Condition{}
}

func listenerIs(gw *gwv1.Gateway, name, typ string, status metav1.ConditionStatus, reason string) error {
	for _, l := range gw.Status.Listeners {
		if string(l.Name) == name {
			if err := conditionIs(l.Conditions, typ, status, reason); err != nil {
				return fmt.Errorf("listener %s: %w", name, err)
			}
			return nil
		}
	}
	return fmt.Errorf("no status for listener %s in %v", name, gw.Status.Listeners)
}

func addressesAre(gw *gwv1.Gateway, ip, host string) error {
	want := []gwv1.GatewayStatusAddress{
		{Type: ptr.To(gwv1.IPAddressType), Value: ip},
		{Type: ptr.To(gwv1.HostnameAddressType), Value: host},
	}
	if len(gw.Status.Addresses) != 2 || *gw.Status.Addresses[0].Type != *want[0].Type || gw.Status.Addresses[0].Value != ip ||
		*gw.Status.Addresses[1].Type != *want[1].Type || gw.Status.Addresses[1].Value != host {
		return fmt.Errorf("addresses %v, want IP %s and hostname %s", gw.Status.Addresses, ip, host)
	}
	return nil
}

func checkOwner(t *testing.T, o client.Object, gw *gwv1.Gateway) {
	t.Helper()
	refs := o.GetOwnerReferences()
	if len(refs) != 1 {
		t.Fatalf("%T owner references %v, want the Gateway", o, refs)
	}
	r := refs[0]
	if r.APIVersion != "gateway.networking.k8s.io/v1" || r.Kind != "Gateway" || r.Name != gw.Name || r.UID != gw.UID ||
		r.Controller == nil || !*r.Controller || r.BlockOwnerDeletion == nil || !*r.BlockOwnerDeletion {
		t.Errorf("%T owner reference %+v, want controller Gateway %s (%s)", o, r, gw.Name, gw.UID)
	}
}

func checkService(t *testing.T, svc *corev1.Service) {
	t.Helper()
	if svc.Spec.Type != corev1.ServiceTypeClusterIP || svc.Spec.ClusterIP == "" || svc.Spec.ClusterIP == corev1.ClusterIPNone {
		t.Errorf("service type %s cluster IP %q, want a ClusterIP service with an address", svc.Spec.Type, svc.Spec.ClusterIP)
	}
	ports := map[int32]string{}
	for _, p := range svc.Spec.Ports {
		ports[p.Port] = p.Name
		if p.TargetPort.IntValue() != int(p.Port) {
			t.Errorf("port %d targets %s", p.Port, p.TargetPort.String())
		}
	}
	if len(ports) != 2 || ports[15008] != "mesh" || ports[15020] != "http-metrics" {
		t.Errorf("service ports %v, want 15008 mesh and 15020 http-metrics", ports)
	}
	if len(svc.Spec.Selector) != 1 || svc.Spec.Selector["gateway.networking.k8s.io/gateway-name"] != "waypoint" {
		t.Errorf("selector %v", svc.Spec.Selector)
	}
}

func checkDeployment(t *testing.T, dep *appsv1.Deployment) {
	t.Helper()
	tpl := dep.Spec.Template
	if tpl.Labels["amesh.dev/dataplane-mode"] != "none" || tpl.Labels["gateway.networking.k8s.io/gateway-name"] != "waypoint" {
		t.Errorf("pod labels %v: want dataplane-mode=none and gateway-name", tpl.Labels)
	}
	if sel := dep.Spec.Selector.MatchLabels; len(sel) != 1 || sel["gateway.networking.k8s.io/gateway-name"] != "waypoint" {
		t.Errorf("selector %v", sel)
	}
	ps := tpl.Spec
	if ps.ServiceAccountName != "waypoint" || ps.AutomountServiceAccountToken == nil || *ps.AutomountServiceAccountToken {
		t.Errorf("service account %q automount %v", ps.ServiceAccountName, ps.AutomountServiceAccountToken)
	}
	if len(ps.Containers) != 1 {
		t.Fatalf("containers %v", ps.Containers)
	}
	c := ps.Containers[0]
	if c.Image != testImage {
		t.Errorf("image %s, want %s", c.Image, testImage)
	}
	if c.ReadinessProbe == nil || c.ReadinessProbe.HTTPGet == nil || c.ReadinessProbe.HTTPGet.Path != "/healthz/ready" ||
		c.ReadinessProbe.HTTPGet.Port.IntValue() != 15021 {
		t.Errorf("readiness probe %+v, want GET /healthz/ready on 15021", c.ReadinessProbe)
	}
	if c.Resources.Requests.Cpu().IsZero() || c.Resources.Requests.Memory().IsZero() {
		t.Errorf("resource requests %v", c.Resources.Requests)
	}
	// The Go GC is told the container's memory limit, in bytes.
	if c.Resources.Limits.Memory().IsZero() {
		t.Errorf("no memory limit: %v", c.Resources.Limits)
	}
	var memLimit *corev1.ResourceFieldSelector
	for _, v := range c.Env {
		if v.Name == "GOMEMLIMIT" && v.ValueFrom != nil {
			memLimit = v.ValueFrom.ResourceFieldRef
		}
	}
	if memLimit == nil || memLimit.ContainerName != c.Name || memLimit.Resource != "limits.memory" || memLimit.Divisor.Value() != 1 {
		t.Errorf("GOMEMLIMIT from %+v, want limits.memory of container %s in bytes", memLimit, c.Name)
	}
	ports := map[int32]bool{}
	for _, p := range c.Ports {
		ports[p.ContainerPort] = true
	}
	for _, p := range []int32{15008, 15020, 15021} {
		if !ports[p] {
			t.Errorf("container port %d missing (%v)", p, c.Ports)
		}
	}
	if a := ps.Affinity; a == nil || a.PodAntiAffinity == nil || len(a.PodAntiAffinity.PreferredDuringSchedulingIgnoredDuringExecution) != 1 ||
		a.PodAntiAffinity.PreferredDuringSchedulingIgnoredDuringExecution[0].PodAffinityTerm.TopologyKey != corev1.LabelHostname {
		t.Errorf("affinity %+v, want anti-affinity across nodes", ps.Affinity)
	}
	if sc := c.SecurityContext; sc == nil || sc.RunAsNonRoot == nil || !*sc.RunAsNonRoot || sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem {
		t.Errorf("security context %+v", c.SecurityContext)
	}

	// The projected token (audience amesh) and the root certificate are
	// mounted where the arguments say.
	var token *corev1.ServiceAccountTokenProjection
	var rootCM string
	for _, v := range ps.Volumes {
		if v.Projected != nil {
			for _, s := range v.Projected.Sources {
				if s.ServiceAccountToken != nil {
					token = s.ServiceAccountToken
				}
			}
		}
		if v.ConfigMap != nil {
			rootCM = v.ConfigMap.Name
		}
	}
	if token == nil || token.Audience != "amesh" {
		t.Errorf("projected token %+v, want audience amesh", token)
	}
	if rootCM != "amesh-root-cert" {
		t.Errorf("root certificate ConfigMap %q", rootCM)
	}
	mounts := map[string]string{}
	for _, m := range c.VolumeMounts {
		mounts[m.MountPath] = m.Name
	}
	args := map[string]string{}
	for _, a := range c.Args {
		k, v, _ := strings.Cut(strings.TrimPrefix(a, "-"), "=")
		args[k] = v
	}
	if d, f := filepath.Split(args["token-file"]); token == nil || f != token.Path || mounts[filepath.Clean(d)] == "" {
		t.Errorf("token-file %q is not the mounted projected token", args["token-file"])
	}
	if d := filepath.Dir(args["root-cert"]); mounts[d] == "" {
		t.Errorf("root-cert %q is not mounted", args["root-cert"])
	}
	if args["gateway"] != "shop/waypoint" || args["controller"] != "amesh-controller.amesh-system.svc:15012" ||
		args["controller-server-name"] != "amesh-controller.amesh-system.svc" {
		t.Errorf("args %v", c.Args)
	}
	// Every argument is a flag of the waypoint binary, and every $(VAR) is
	// defined in the container's environment.
	flags := waypointFlags(t)
	env := map[string]bool{}
	for _, v := range c.Env {
		env[v.Name] = true
	}
	for _, a := range c.Args {
		k, v, _ := strings.Cut(strings.TrimPrefix(a, "-"), "=")
		if !flags[k] {
			t.Errorf("argument %q: the waypoint has no flag -%s", a, k)
		}
		for _, m := range regexp.MustCompile(`\$\(([A-Z_]+)\)`).FindAllStringSubmatch(v, -1) {
			if !env[m[1]] {
				t.Errorf("argument %q uses $(%s), which is not in the environment", a, m[1])
			}
		}
	}
	for _, need := range []string{"namespace", "service-account", "gateway", "controller", "root-cert", "token-file"} {
		if _, ok := args[need]; !ok {
			t.Errorf("required waypoint flag -%s is not passed", need)
		}
	}
}

// waypointFlags reads the flag names the waypoint registers from its
// source (the controller module cannot import the waypoint's internals).
func waypointFlags(t *testing.T) map[string]bool {
	t.Helper()
	src, err := os.ReadFile(filepath.Join("..", "..", "..", "waypoint", "internal", "app", "config.go"))
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]bool{}
	for _, m := range regexp.MustCompile(`fs\.\w+\(&c\.\w+, "([a-z0-9-]+)"`).FindAllStringSubmatch(string(src), -1) {
		out[m[1]] = true
	}
	if len(out) < 10 {
		t.Fatalf("found only %d waypoint flags in its config.go: has its shape changed?", len(out))
	}
	return out
}
