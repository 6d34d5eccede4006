package waypointctl

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"strings"
	"time"

	"github.com/spf13/cobra"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/validation"
	metav1ac "k8s.io/client-go/applyconfigurations/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"
	gwac "sigs.k8s.io/gateway-api/applyconfiguration/apis/v1"

	"github.com/amesh-dev/amesh/controller/internal/gatewayclass"
	"github.com/amesh-dev/amesh/controller/internal/label"
)

// applyOptions are the flags of `apply`.
type applyOptions struct {
	name            string
	forTraffic      string
	serviceAccount  string
	enrollNamespace bool
	overwrite       bool
	wait            bool
	timeout         time.Duration
	output          string
	// allowNamespaces is --allow-namespaces: "" (keep the current
	// setting), "same", "all", or a label selector of namespaces.
	allowNamespaces string
}

// defaults fills in the flags the user did not give: the name ("waypoint",
// or "<sa>-waypoint" for a service account's waypoint) and what the
// waypoint serves (services, or workloads for a service account's
// waypoint: its point is to take that account's workload traffic).
func (o *applyOptions) defaults(nameGiven, forGiven bool) {
	if !nameGiven {
		o.name = DefaultName
		if o.serviceAccount != "" {
			o.name = o.serviceAccount + "-waypoint"
		}
	}
	if !forGiven {
		o.forTraffic = label.WaypointForService
		if o.serviceAccount != "" {
			o.forTraffic = label.WaypointForWorkload
		}
	}
}

func (o *applyOptions) validate() error {
	var errs []error
	if msgs := validation.IsDNS1035Label(o.name); len(msgs) > 0 {
		errs = append(errs, fmt.Errorf("--name %q: %s (it names the waypoint's Service)", o.name, strings.Join(msgs, "; ")))
	}
	switch o.forTraffic {
	case label.WaypointForService, label.WaypointForWorkload, label.WaypointForAll:
	default:
		errs = append(errs, fmt.Errorf("--for %q: must be service, workload or all", o.forTraffic))
	}
	if o.serviceAccount != "" {
		if msgs := validation.IsDNS1123Subdomain(o.serviceAccount); len(msgs) > 0 {
			errs = append(errs, fmt.Errorf("--service-account %q: %s", o.serviceAccount, strings.Join(msgs, "; ")))
		}
	}
	if o.timeout <= 0 {
		errs = append(errs, fmt.Errorf("--timeout must be positive, got %v", o.timeout))
	}
	if err := checkOutput(o.output); err != nil {
		errs = append(errs, err)
	}
	if _, err := o.routeNamespaces(); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// routeNamespaces is the listener's allowedRoutes.namespaces that
// --allow-namespaces asks for; nil when the flag is not given.
func (o *applyOptions) routeNamespaces() (*gwac.RouteNamespacesApplyConfiguration, error) {
	switch v := strings.TrimSpace(o.allowNamespaces); v {
	case "":
		return nil, nil
	case "same", "Same":
		return gwac.RouteNamespaces().WithFrom(gwv1.NamespacesFromSame), nil
	case "all", "All":
		return gwac.RouteNamespaces().WithFrom(gwv1.NamespacesFromAll), nil
	default:
		sel, err := metav1.ParseToLabelSelector(v)
		if err != nil {
			return nil, fmt.Errorf("--allow-namespaces %q: must be same, all or a label selector: %w", o.allowNamespaces, err)
		}
		return gwac.RouteNamespaces().WithFrom(gwv1.NamespacesFromSelector).WithSelector(labelSelectorAC(sel)), nil
	}
}

// keepRouteNamespaces is the apply configuration of the current
// allowedRoutes.namespaces of the Gateway's mesh listener, so that an
// apply without --allow-namespaces leaves it as it is.
func keepRouteNamespaces(gw *gwv1.Gateway) *gwac.RouteNamespacesApplyConfiguration {
	for _, l := range gw.Spec.Listeners {
		if l.Name != "mesh" || l.AllowedRoutes == nil || l.AllowedRoutes.Namespaces == nil || l.AllowedRoutes.Namespaces.From == nil {
			continue
		}
		rn := gwac.RouteNamespaces().WithFrom(*l.AllowedRoutes.Namespaces.From)
		if sel := l.AllowedRoutes.Namespaces.Selector; sel != nil {
			rn.WithSelector(labelSelectorAC(sel))
		}
		return rn
	}
	return nil
}

func labelSelectorAC(sel *metav1.LabelSelector) *metav1ac.LabelSelectorApplyConfiguration {
	ac := metav1ac.LabelSelector().WithMatchLabels(sel.MatchLabels)
	for _, e := range sel.MatchExpressions {
		ac.WithMatchExpressions(metav1ac.LabelSelectorRequirement().WithKey(e.Key).WithOperator(e.Operator).WithValues(e.Values...))
	}
	return ac
}

func (r *root) applyCommand() *cobra.Command {
	o := &applyOptions{timeout: 90 * time.Second}
	cmd := &cobra.Command{
		Use:   "apply [-n namespace] [--name waypoint] [--for service|workload|all] [--service-account sa] [--allow-namespaces same|all|selector] [--enroll-namespace [--overwrite]] [--wait [--timeout 90s]]",
		Short: "Create or update a waypoint",
		Long: `Create or update a waypoint in a namespace.

With --service-account the waypoint serves the workloads running as that
service account (no label needed); its name then defaults to <sa>-waypoint
and --for to workload (with --for service it would not take their traffic).
With --enroll-namespace the namespace is bound to the waypoint (label
amesh.dev/use-waypoint); a namespace already bound to another waypoint is
left alone unless --overwrite is given. A waypoint serves only its own
namespace's traffic unless --allow-namespaces admits others (all, or those
a label selector matches), which then bind to it with amesh.dev/use-waypoint
and amesh.dev/use-waypoint-namespace. With --wait the command returns once
the waypoint is programmed, showing its progress.`,
		Example: `  kubectl waypoint apply -n bookinfo --enroll-namespace --wait
  kubectl waypoint apply -n bookinfo --service-account reviews
  kubectl waypoint apply -n bookinfo --name l7 --for all -o yaml
  kubectl waypoint apply -n shared --name central --allow-namespaces team=shop`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			o.defaults(cmd.Flags().Changed("name"), cmd.Flags().Changed("for"))
			if err := o.validate(); err != nil {
				return err
			}
			return r.apply(cmd.Context(), o)
		},
	}
	f := cmd.Flags()
	f.StringVar(&o.name, "name", "", "name of the waypoint (default \"waypoint\", or \"<sa>-waypoint\" with --service-account)")
	f.StringVar(&o.forTraffic, "for", "", "traffic the waypoint serves: service, workload or all (default service, or workload with --service-account)")
	f.StringVar(&o.serviceAccount, "service-account", "", "make this a waypoint for the workloads running as this service account")
	f.BoolVar(&o.enrollNamespace, "enroll-namespace", false, "bind the namespace to the waypoint (label amesh.dev/use-waypoint)")
	f.BoolVar(&o.overwrite, "overwrite", false, "with --enroll-namespace: replace the namespace's binding to another waypoint")
	f.BoolVar(&o.wait, "wait", false, "wait until the waypoint is programmed")
	f.DurationVar(&o.timeout, "timeout", o.timeout, "how long --wait waits")
	f.StringVarP(&o.output, "output", "o", "", "print the waypoint: yaml or json")
	f.StringVar(&o.allowNamespaces, "allow-namespaces", "", "namespaces whose traffic may be bound to this waypoint besides its own: same, all or a label selector (default: keep the current setting; a new waypoint admits only its own)")
	return cmd
}

func (r *root) apply(ctx context.Context, o *applyOptions) error {
	s, err := r.connect()
	if err != nil {
		return err
	}
	ns := s.namespace
	if err := r.checkInstalled(ctx, s); err != nil {
		return err
	}

	// Every check before the first write: a refusal changes nothing.
	var existing gwv1.Gateway
	err = s.c.Get(ctx, client.ObjectKey{Namespace: ns, Name: o.name}, &existing)
	exists := err == nil
	switch {
	case apierrors.IsNotFound(err):
	case err != nil:
		return s.explain(err, "get gateways in namespace "+ns)
	case !r.isWaypoint(&existing):
		return fmt.Errorf("a Gateway %s/%s exists and is not a waypoint (class %s); choose another --name", ns, o.name, existing.Spec.GatewayClassName)
	}
	if o.serviceAccount != "" && !gatewayclass.ServesWorkloads(o.forTraffic) {
		r.warn("a waypoint for service account %s with --for %s does not serve workload-addressed traffic: "+
			"the workloads running as %s will not go through it (use --for workload or all for them to)", o.serviceAccount, o.forTraffic, o.serviceAccount)
	}
	if o.serviceAccount != "" && gatewayclass.ServesWorkloads(o.forTraffic) {
		if other, err := r.serviceAccountWaypoint(ctx, s, o.serviceAccount, o.name); err != nil {
			return err
		} else if other != "" {
			return fmt.Errorf("service account %s in namespace %s is already served by waypoint %s; "+
				"delete it (kubectl waypoint delete -n %s %s) or update it with --name %s", o.serviceAccount, ns, other, ns, other, other)
		}
	}
	var nsObj corev1.Namespace
	if o.enrollNamespace {
		if err := s.c.Get(ctx, client.ObjectKey{Name: ns}, &nsObj); err != nil {
			return s.explain(err, "get namespace "+ns)
		}
		if err := r.checkBinding(&nsObj, o); err != nil {
			return err
		}
	}

	listener := gwac.Listener().
		WithName("mesh").
		WithPort(label.HBONEPort).
		WithProtocol("HBONE")
	rn, _ := o.routeNamespaces() // validated
	if rn == nil && exists {
		rn = keepRouteNamespaces(&existing)
	}
	if rn != nil {
		listener.WithAllowedRoutes(gwac.AllowedRoutes().WithNamespaces(rn))
	}
	gw := gwac.Gateway(o.name, ns).
		WithLabels(map[string]string{label.WaypointFor: o.forTraffic}).
		WithSpec(gwac.GatewaySpec().
			WithGatewayClassName(gwv1.ObjectName(r.class)).
			WithListeners(listener))
	if o.serviceAccount != "" {
		gw.WithAnnotations(map[string]string{label.ForServiceAccount: o.serviceAccount})
	}
	if err := s.c.Apply(ctx, gw, client.FieldOwner(FieldManager), client.ForceOwnership); err != nil {
		return s.explain(err, "create or patch gateways in namespace "+ns)
	}
	verb := "created"
	if exists {
		verb = "configured"
		// Unchanged when neither the spec (its generation) nor the
		// metadata the command sets moved; the resourceVersion also
		// moves with the controller's status writes, which may land
		// between the read and the apply.
		if gw.Generation != nil && *gw.Generation == existing.Generation &&
			maps.Equal(gw.Labels, existing.Labels) && maps.Equal(gw.Annotations, existing.Annotations) {
			verb = "unchanged"
		}
	}
	r.info("waypoint %s/%s %s", ns, o.name, verb)

	if o.enrollNamespace {
		if err := r.bindNamespace(ctx, s, &nsObj, o.name); err != nil {
			return err
		}
	}
	if !o.wait {
		if o.output != "" {
			var out gwv1.Gateway
			if err := s.c.Get(ctx, client.ObjectKey{Namespace: ns, Name: o.name}, &out); err != nil {
				return s.explain(err, "get gateways in namespace "+ns)
			}
			return r.print(o.output, &out)
		}
		return nil
	}
	out, err := r.waitProgrammed(ctx, s, ns, o.name, o.timeout)
	if err != nil {
		return err
	}
	if o.output != "" {
		return r.print(o.output, out)
	}
	return nil
}

// serviceAccountWaypoint returns another waypoint of the namespace that
// claims sa (and serves workloads, so takes its traffic), if any.
func (r *root) serviceAccountWaypoint(ctx context.Context, s *session, sa, except string) (string, error) {
	var list gwv1.GatewayList
	if err := s.c.List(ctx, &list, client.InNamespace(s.namespace)); err != nil {
		return "", s.explain(err, "list gateways in namespace "+s.namespace)
	}
	for i := range list.Items {
		g := &list.Items[i]
		if g.Name != except && r.isWaypoint(g) && g.DeletionTimestamp == nil && g.Annotations[label.ForServiceAccount] == sa &&
			gatewayclass.ServesWorkloads(gatewayclass.Serves(g)) {
			return g.Name, nil
		}
	}
	return "", nil
}

// checkBinding refuses to rebind a namespace bound to another waypoint
// without --overwrite, and warns when the namespace is not in the mesh.
func (r *root) checkBinding(ns *corev1.Namespace, o *applyOptions) error {
	cur, bound := ns.Labels[label.UseWaypoint]
	curNS := ns.Labels[label.UseWaypointNamespace]
	if bound && !(cur == o.name && (curNS == "" || curNS == ns.Name)) {
		what := "waypoint " + cur
		switch {
		case cur == label.UseWaypointNone:
			what = "no waypoint (" + label.UseWaypoint + "=none)"
		case curNS != "" && curNS != ns.Name:
			what = "waypoint " + curNS + "/" + cur
		}
		if !o.overwrite {
			r.warn("namespace %s is bound to %s", ns.Name, what)
			return fmt.Errorf("namespace %s is already bound to %s; pass --overwrite to bind it to %s instead", ns.Name, what, o.name)
		}
		r.warn("namespace %s was bound to %s; binding it to %s", ns.Name, what, o.name)
	}
	if ns.Labels[label.DataplaneMode] != label.DataplaneModeAmbient {
		r.warn("namespace %s is not enrolled in ambient mode (label %s=%s): its traffic reaches the waypoint only once it is",
			ns.Name, label.DataplaneMode, label.DataplaneModeAmbient)
	}
	return nil
}

// bindNamespace labels ns amesh.dev/use-waypoint=name (dropping a
// use-waypoint-namespace label), failing if ns changed since it was read.
func (r *root) bindNamespace(ctx context.Context, s *session, ns *corev1.Namespace, name string) error {
	_, hasNS := ns.Labels[label.UseWaypointNamespace]
	if ns.Labels[label.UseWaypoint] == name && !hasNS {
		r.info("namespace %s already uses waypoint %s", ns.Name, name)
		return nil
	}
	base := ns.DeepCopy()
	if ns.Labels == nil {
		ns.Labels = map[string]string{}
	}
	ns.Labels[label.UseWaypoint] = name
	delete(ns.Labels, label.UseWaypointNamespace)
	err := s.c.Patch(ctx, ns, client.MergeFromWithOptions(base, client.MergeFromWithOptimisticLock{}), client.FieldOwner(FieldManager))
	switch {
	case apierrors.IsConflict(err):
		return fmt.Errorf("namespace %s changed while it was being labelled; run the command again", ns.Name)
	case err != nil:
		return s.explain(err, "patch namespace "+ns.Name)
	}
	r.info("namespace %s labelled %s=%s", ns.Name, label.UseWaypoint, name)
	return nil
}

// waitProgrammed polls the Gateway until it is programmed, printing each
// change of its conditions, and fails at once when it is not accepted.
func (r *root) waitProgrammed(ctx context.Context, s *session, ns, name string, timeout time.Duration) (*gwv1.Gateway, error) {
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	tick := time.NewTicker(r.poll)
	defer tick.Stop()
	last := ""
	for {
		var gw gwv1.Gateway
		if err := s.c.Get(ctx, client.ObjectKey{Namespace: ns, Name: name}, &gw); err != nil {
			return nil, s.explain(err, "get gateways in namespace "+ns)
		}
		acc := current(&gw, string(gwv1.GatewayConditionAccepted))
		prog := current(&gw, string(gwv1.GatewayConditionProgrammed))
		if prog != nil && prog.Status == metav1.ConditionTrue {
			r.info("waypoint %s/%s is programmed: %s", ns, name, prog.Message)
			return &gw, nil
		}
		if acc != nil && acc.Status == metav1.ConditionFalse {
			return nil, fmt.Errorf("waypoint %s/%s is not accepted (%s): %s", ns, name, acc.Reason, acc.Message)
		}
		if line := progress(acc, prog); line != last {
			r.info("waiting for waypoint %s/%s: %s", ns, name, line)
			last = line
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-deadline.C:
			return nil, fmt.Errorf("waypoint %s/%s not programmed within %v (last: %s); see kubectl waypoint status -n %s %s",
				ns, name, timeout, last, ns, name)
		case <-tick.C:
		}
	}
}

// current returns the condition of type typ if the controller has
// observed the Gateway's current generation.
func current(gw *gwv1.Gateway, typ string) *metav1.Condition {
	c := meta.FindStatusCondition(gw.Status.Conditions, typ)
	if c == nil || c.ObservedGeneration < gw.Generation {
		return nil
	}
	return c
}

func progress(acc, prog *metav1.Condition) string {
	switch {
	case acc == nil:
		return "not yet seen by the amesh controller"
	case prog == nil:
		return "accepted, not yet programmed"
	}
	return fmt.Sprintf("%s (%s)", prog.Message, prog.Reason)
}
