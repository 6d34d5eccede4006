// Package deployer deploys waypoints: it accepts the amesh-waypoint
// GatewayClass and turns each Gateway of that class into a ServiceAccount,
// a Deployment running the waypoint and a Service (15008 HBONE, 15020
// metrics), all owned by the Gateway and kept in their declared state with
// server-side apply, and it reports the Gateway's Accepted and Programmed
// conditions, address and listeners. It runs on the leader only.
package deployer

import (
	"context"
	"errors"
	"fmt"
	"time"

	"go.uber.org/zap"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/selection"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/utils/ptr"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/builder"
	"sigs.k8s.io/controller-runtime/pkg/cache"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/controller"
	"sigs.k8s.io/controller-runtime/pkg/handler"
	"sigs.k8s.io/controller-runtime/pkg/predicate"
	"sigs.k8s.io/controller-runtime/pkg/reconcile"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"
	gwac "sigs.k8s.io/gateway-api/applyconfiguration/apis/v1"

	"github.com/amesh-dev/amesh/controller/internal/gatewayclass"
	"github.com/amesh-dev/amesh/controller/internal/label"
)

// Deployer reconciles waypoint Gateways and their GatewayClass.
type Deployer struct {
	c    client.Client
	api  client.Reader
	opts Options
	log  *zap.Logger
	now  func() time.Time
}

// New returns a Deployer writing through c (whose reads may come from a
// cache) and reading objects the cache does not hold through api.
func New(c client.Client, api client.Reader, opts Options, log *zap.Logger) (*Deployer, error) {
	if err := opts.Validate(); err != nil {
		return nil, fmt.Errorf("deployer: %w", err)
	}
	if c == nil || api == nil {
		return nil, errors.New("deployer: no Kubernetes client")
	}
	if log == nil {
		log = zap.NewNop()
	}
	return &Deployer{c: c, api: api, opts: opts, log: log, now: time.Now}, nil
}

// Setup builds a Deployer on mgr's clients and registers its controllers
// with mgr (they run on the elected leader only).
func Setup(mgr ctrl.Manager, opts Options, log *zap.Logger) error {
	d, err := New(mgr.GetClient(), mgr.GetAPIReader(), opts, log)
	if err != nil {
		return err
	}
	return d.SetupWithManager(mgr)
}

// CacheByObject restricts the manager's cache of Deployments and
// ServiceAccounts to the ones the deployer makes (merge it into
// cache.Options.ByObject). Optional: without it every Deployment and
// ServiceAccount of the cluster is cached. The deployer also watches
// ConfigMaps, but only the root certificate one matters: a cache limited to
// that name (as amesh-controller's is) serves it.
func CacheByObject() map[client.Object]cache.ByObject {
	req, err := labels.NewRequirement(labelManagedBy, selection.Equals, []string{managedBy})
	if err != nil {
		panic(err) // constant input
	}
	comp, err := labels.NewRequirement(labelComponent, selection.Equals, []string{componentValue})
	if err != nil {
		panic(err)
	}
	sel := labels.NewSelector().Add(*req, *comp)
	return map[client.Object]cache.ByObject{
		&appsv1.Deployment{}: {Label: sel},
		&metav1.PartialObjectMetadata{TypeMeta: serviceAccountType}: {Label: sel},
	}
}

var serviceAccountType = metav1.TypeMeta{APIVersion: "v1", Kind: "ServiceAccount"}

// SetupWithManager registers the Gateway and GatewayClass controllers.
func (d *Deployer) SetupWithManager(mgr ctrl.Manager) error {
	sa := &metav1.PartialObjectMetadata{TypeMeta: serviceAccountType}
	// A process may run several managers (replicas in tests); the names
	// only label metrics.
	opts := controller.Options{SkipNameValidation: ptr.To(true)}
	err := ctrl.NewControllerManagedBy(mgr).
		Named("waypoint-deployer").
		WithOptions(opts).
		For(&gwv1.Gateway{}).
		Owns(&appsv1.Deployment{}).
		Owns(&corev1.Service{}).
		Owns(sa).
		Watches(&gwv1.GatewayClass{}, handler.EnqueueRequestsFromMapFunc(d.gatewaysOfClass)).
		Watches(&gwv1.Gateway{}, handler.EnqueueRequestsFromMapFunc(d.serviceAccountClaimants)).
		Watches(&corev1.ConfigMap{}, handler.EnqueueRequestsFromMapFunc(d.rootCertWaiters)).
		Complete(reconcile.Func(d.reconcileGateway))
	if err != nil {
		return fmt.Errorf("deployer: gateway controller: %w", err)
	}
	err = ctrl.NewControllerManagedBy(mgr).
		Named("waypoint-gatewayclass").
		WithOptions(opts).
		For(&gwv1.GatewayClass{}, builder.WithPredicates(predicate.NewPredicateFuncs(func(o client.Object) bool {
			gc, ok := o.(*gwv1.GatewayClass)
			return ok && string(gc.Spec.ControllerName) == d.opts.ControllerName
		}))).
		Complete(reconcile.Func(d.reconcileClass))
	if err != nil {
		return fmt.Errorf("deployer: gatewayclass controller: %w", err)
	}
	return nil
}

// reconcileClass accepts the waypoint GatewayClass (and refuses any other
// class naming this controller).
func (d *Deployer) reconcileClass(ctx context.Context, req reconcile.Request) (reconcile.Result, error) {
	var gc gwv1.GatewayClass
	if err := d.c.Get(ctx, req.NamespacedName, &gc); err != nil {
		return reconcile.Result{}, client.IgnoreNotFound(err)
	}
	if !gatewayclass.Ours(&gc, d.opts.ControllerName) {
		return reconcile.Result{}, nil
	}
	c := gatewayClassAccepted(&gc, d.opts.Class)
	ac := gwac.GatewayClass(gc.Name).WithStatus(gwac.GatewayClassStatus().
		WithConditions(applyCond(gc.Status.Conditions, c, gc.Generation, d.now())))
	if err := d.c.Status().Apply(ctx, ac, client.FieldOwner(d.opts.FieldOwner), client.ForceOwnership); err != nil {
		return reconcile.Result{}, client.IgnoreNotFound(fmt.Errorf("deployer: status of GatewayClass %s: %w", gc.Name, err))
	}
	return reconcile.Result{}, nil
}

// reconcileGateway deploys one waypoint and reports its status.
func (d *Deployer) reconcileGateway(ctx context.Context, req reconcile.Request) (reconcile.Result, error) {
	var gw gwv1.Gateway
	if err := d.c.Get(ctx, req.NamespacedName, &gw); err != nil {
		return reconcile.Result{}, client.IgnoreNotFound(err)
	}
	if gw.DeletionTimestamp != nil {
		// The garbage collector removes what the Gateway owns.
		return reconcile.Result{}, nil
	}
	ours, classCond, err := d.class(ctx, &gw)
	if err != nil {
		return reconcile.Result{}, err
	}
	if !ours {
		// Not (or no longer) a waypoint: take away what was deployed for it.
		return reconcile.Result{}, d.remove(ctx, &gw)
	}

	v := evaluate(&gw)
	if !classCond.status {
		v.accepted = cond{string(gwv1.GatewayConditionAccepted), false, string(gwv1.GatewayReasonInvalid),
			fmt.Sprintf("GatewayClass %s is not accepted: %s", gw.Spec.GatewayClassName, classCond.message)}
	}
	var o observed
	if v.deploy() {
		if o, err = d.deploy(ctx, &gw); err != nil {
			return reconcile.Result{}, err
		}
	} else if err := d.remove(ctx, &gw); err != nil {
		return reconcile.Result{}, err
	}
	if _, ok := gw.Annotations[label.ForServiceAccount]; ok {
		var siblings gwv1.GatewayList
		if err := d.c.List(ctx, &siblings, client.InNamespace(gw.Namespace)); err != nil {
			return reconcile.Result{}, fmt.Errorf("deployer: list gateways in %s: %w", gw.Namespace, err)
		}
		var unavailable string
		switch {
		case !v.deploy():
			unavailable = "it is not accepted: " + v.accepted.message
		case o.conflict != "":
			unavailable = o.conflict
		}
		o.forSA = forServiceAccount(&gw, siblings.Items, d.opts.Class, unavailable)
	}

	st := gatewayStatus(&gw, v, o, d.now())
	ac := gwac.Gateway(gw.Name, gw.Namespace).WithStatus(st)
	if err := d.c.Status().Apply(ctx, ac, client.FieldOwner(d.opts.FieldOwner), client.ForceOwnership); err != nil {
		return reconcile.Result{}, client.IgnoreNotFound(fmt.Errorf("deployer: status of Gateway %s: %w", req.NamespacedName, err))
	}
	if o.conflict != "" {
		return reconcile.Result{RequeueAfter: d.opts.BlockedRetry}, nil
	}
	return reconcile.Result{}, nil
}

// class reports whether gw's GatewayClass is the waypoint class served by
// this controller, and its Accepted condition.
func (d *Deployer) class(ctx context.Context, gw *gwv1.Gateway) (bool, cond, error) {
	if string(gw.Spec.GatewayClassName) != d.opts.Class {
		return false, cond{}, nil
	}
	var gc gwv1.GatewayClass
	if err := d.c.Get(ctx, types.NamespacedName{Name: d.opts.Class}, &gc); err != nil {
		if apierrors.IsNotFound(err) {
			return false, cond{}, nil
		}
		return false, cond{}, fmt.Errorf("deployer: get GatewayClass %s: %w", d.opts.Class, err)
	}
	if !gatewayclass.Ours(&gc, d.opts.ControllerName) {
		return false, cond{}, nil
	}
	return true, gatewayClassAccepted(&gc, d.opts.Class), nil
}

// owned lists the kinds of object made for a Gateway, each as an empty
// object of the type the cache holds.
func owned() []client.Object {
	return []client.Object{
		&metav1.PartialObjectMetadata{TypeMeta: serviceAccountType},
		&corev1.Service{},
		&appsv1.Deployment{},
	}
}

// find reads the object named like gw into obj: from the cache, else (the
// cache may hold only the deployer's own objects) from the API server. It
// reports whether it exists.
func (d *Deployer) find(ctx context.Context, gw *gwv1.Gateway, obj client.Object) (bool, error) {
	key := types.NamespacedName{Namespace: gw.Namespace, Name: gw.Name}
	err := d.c.Get(ctx, key, obj)
	if apierrors.IsNotFound(err) {
		err = d.api.Get(ctx, key, obj)
	}
	switch {
	case apierrors.IsNotFound(err):
		return false, nil
	case err != nil:
		return false, fmt.Errorf("deployer: get %s %s: %w", kindOf(obj), key, err)
	}
	return true, nil
}

func kindOf(obj client.Object) string {
	switch o := obj.(type) {
	case *metav1.PartialObjectMetadata:
		return o.Kind
	case *corev1.Service:
		return "Service"
	case *appsv1.Deployment:
		return "Deployment"
	}
	return fmt.Sprintf("%T", obj)
}

func controlledBy(obj client.Object, gw *gwv1.Gateway) bool {
	ref := metav1.GetControllerOf(obj)
	return ref != nil && ref.UID == gw.UID
}

// ours reports whether obj was made by the deployer for gw.
func ours(obj client.Object, gw *gwv1.Gateway) bool {
	l := obj.GetLabels()
	return controlledBy(obj, gw) && l[labelManagedBy] == managedBy && l[labelComponent] == componentValue
}

// deploy applies the ServiceAccount, Service and Deployment of gw, unless
// an object of the same name that gw does not control is in the way.
func (d *Deployer) deploy(ctx context.Context, gw *gwv1.Gateway) (observed, error) {
	var o observed
	for _, obj := range owned() {
		found, err := d.find(ctx, gw, obj)
		if err != nil {
			return o, err
		}
		if found && !controlledBy(obj, gw) {
			o.conflict = fmt.Sprintf("%s %s/%s exists and does not belong to this Gateway; delete it or give the waypoint another name",
				kindOf(obj), gw.Namespace, gw.Name)
			d.log.Info("waypoint blocked by an existing object", zap.String("gateway", gw.Namespace+"/"+gw.Name), zap.String("reason", o.conflict))
			return o, nil
		}
	}
	apply := func(what string, ac runtime.ApplyConfiguration) error {
		if err := d.c.Apply(ctx, ac, client.FieldOwner(d.opts.FieldOwner), client.ForceOwnership); err != nil {
			return fmt.Errorf("deployer: apply %s %s/%s: %w", what, gw.Namespace, gw.Name, err)
		}
		return nil
	}
	if err := apply("ServiceAccount", serviceAccount(gw)); err != nil {
		return o, err
	}
	svc := service(gw)
	if err := apply("Service", svc); err != nil {
		return o, err
	}
	if svc.Spec != nil && svc.Spec.ClusterIP != nil {
		o.clusterIP = *svc.Spec.ClusterIP
	}
	o.hostname = gw.Name + "." + gw.Namespace + ".svc." + d.opts.ClusterDomain
	dep := deployment(gw, d.opts)
	if err := apply("Deployment", dep); err != nil {
		return o, err
	}
	if dep.Spec != nil && dep.Spec.Replicas != nil {
		o.desired = *dep.Spec.Replicas
	}
	if dep.Status != nil && dep.Status.AvailableReplicas != nil {
		o.available = *dep.Status.AvailableReplicas
	}
	if o.available < 1 {
		var cm corev1.ConfigMap
		err := d.c.Get(ctx, types.NamespacedName{Namespace: gw.Namespace, Name: d.opts.RootCertConfigMap}, &cm)
		switch {
		case apierrors.IsNotFound(err):
			o.missingRootCert = d.opts.RootCertConfigMap
		case err != nil:
			return o, fmt.Errorf("deployer: get ConfigMap %s/%s: %w", gw.Namespace, d.opts.RootCertConfigMap, err)
		}
	}
	return o, nil
}

// remove deletes what the deployer made for gw.
func (d *Deployer) remove(ctx context.Context, gw *gwv1.Gateway) error {
	var errs []error
	for _, obj := range owned() {
		key := types.NamespacedName{Namespace: gw.Namespace, Name: gw.Name}
		if err := d.c.Get(ctx, key, obj); err != nil {
			if !apierrors.IsNotFound(err) {
				errs = append(errs, fmt.Errorf("deployer: get %s %s: %w", kindOf(obj), key, err))
			}
			continue
		}
		if !ours(obj, gw) {
			continue
		}
		uid := obj.GetUID()
		err := d.c.Delete(ctx, obj, client.Preconditions{UID: &uid}, client.PropagationPolicy(metav1.DeletePropagationBackground))
		if err != nil && !apierrors.IsNotFound(err) {
			errs = append(errs, fmt.Errorf("deployer: delete %s %s: %w", kindOf(obj), key, err))
			continue
		}
		d.log.Info("removed waypoint object", zap.String("gateway", key.String()), zap.String("kind", kindOf(obj)))
	}
	return errors.Join(errs...)
}

// rootCertWaiters enqueues the waypoints of a namespace when its root
// certificate ConfigMap comes or goes.
func (d *Deployer) rootCertWaiters(ctx context.Context, o client.Object) []reconcile.Request {
	if o.GetName() != d.opts.RootCertConfigMap {
		return nil
	}
	var list gwv1.GatewayList
	if err := d.c.List(ctx, &list, client.InNamespace(o.GetNamespace())); err != nil {
		d.log.Error("list gateways", zap.String("namespace", o.GetNamespace()), zap.Error(err))
		return nil
	}
	var out []reconcile.Request
	for i := range list.Items {
		if string(list.Items[i].Spec.GatewayClassName) == d.opts.Class {
			out = append(out, reconcile.Request{NamespacedName: client.ObjectKeyFromObject(&list.Items[i])})
		}
	}
	return out
}

// gatewaysOfClass enqueues every Gateway of a GatewayClass.
func (d *Deployer) gatewaysOfClass(ctx context.Context, o client.Object) []reconcile.Request {
	var list gwv1.GatewayList
	if err := d.c.List(ctx, &list); err != nil {
		d.log.Error("list gateways", zap.Error(err))
		return nil
	}
	var out []reconcile.Request
	for i := range list.Items {
		if string(list.Items[i].Spec.GatewayClassName) == o.GetName() {
			out = append(out, reconcile.Request{NamespacedName: client.ObjectKeyFromObject(&list.Items[i])})
		}
	}
	return out
}

// serviceAccountClaimants enqueues, when a waypoint claiming a service
// account changes or goes, the other waypoints of its namespace that claim
// the same one: which of them serves it may have changed.
func (d *Deployer) serviceAccountClaimants(ctx context.Context, o client.Object) []reconcile.Request {
	sa, ok := o.GetAnnotations()[label.ForServiceAccount]
	if !ok {
		return nil
	}
	var list gwv1.GatewayList
	if err := d.c.List(ctx, &list, client.InNamespace(o.GetNamespace())); err != nil {
		d.log.Error("list gateways", zap.String("namespace", o.GetNamespace()), zap.Error(err))
		return nil
	}
	var out []reconcile.Request
	for i := range list.Items {
		g := &list.Items[i]
		if g.Name != o.GetName() && g.Annotations[label.ForServiceAccount] == sa {
			out = append(out, reconcile.Request{NamespacedName: client.ObjectKeyFromObject(g)})
		}
	}
	return out
}
