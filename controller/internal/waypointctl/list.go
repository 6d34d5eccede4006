package waypointctl

import (
	"context"
	"errors"
	"fmt"
	"io"
	"slices"
	"strings"
	"time"

	"github.com/spf13/cobra"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/util/duration"
	"k8s.io/cli-runtime/pkg/printers"
	"sigs.k8s.io/controller-runtime/pkg/client"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"

	"github.com/amesh-dev/amesh/controller/internal/gatewayclass"
	"github.com/amesh-dev/amesh/controller/internal/label"
)

func checkOutput(o string) error {
	switch o {
	case "", "yaml", "json":
		return nil
	}
	return fmt.Errorf("--output %q: must be yaml or json", o)
}

// print writes obj as YAML or JSON with its kind set and without managed
// fields, as kubectl does.
func (r *root) print(format string, obj runtime.Object) error {
	s, err := scheme()
	if err != nil {
		return err
	}
	var p printers.ResourcePrinter = &printers.YAMLPrinter{}
	if format == "json" {
		p = &printers.JSONPrinter{}
	}
	p = printers.NewTypeSetter(s).ToPrinter(&printers.OmitManagedFieldsPrinter{Delegate: p})
	return p.PrintObj(obj, r.streams.Out)
}

func (r *root) listCommand() *cobra.Command {
	var all bool
	var output string
	cmd := &cobra.Command{
		Use:     "list [-n namespace | -A] [-o yaml|json]",
		Aliases: []string{"ls"},
		Short:   "List waypoints",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := checkOutput(output); err != nil {
				return err
			}
			return r.list(cmd.Context(), all, output)
		},
	}
	cmd.Flags().BoolVarP(&all, "all-namespaces", "A", false, "list the waypoints of every namespace")
	cmd.Flags().StringVarP(&output, "output", "o", "", "output format: yaml or json (default: a table)")
	return cmd
}

// waypoints lists the waypoints of ns ("" for all namespaces), sorted.
func (r *root) waypoints(ctx context.Context, s *session, ns string) ([]gwv1.Gateway, error) {
	var list gwv1.GatewayList
	var opts []client.ListOption
	where := "in all namespaces"
	if ns != "" {
		opts = append(opts, client.InNamespace(ns))
		where = "in namespace " + ns
	}
	if err := s.c.List(ctx, &list, opts...); err != nil {
		return nil, s.explain(err, "list gateways "+where)
	}
	var out []gwv1.Gateway
	for _, g := range list.Items {
		if r.isWaypoint(&g) {
			out = append(out, g)
		}
	}
	slices.SortFunc(out, func(a, b gwv1.Gateway) int {
		return strings.Compare(a.Namespace+"/"+a.Name, b.Namespace+"/"+b.Name)
	})
	return out, nil
}

func (r *root) list(ctx context.Context, all bool, output string) error {
	s, err := r.connect()
	if err != nil {
		return err
	}
	ns := s.namespace
	if all {
		ns = ""
	}
	wps, err := r.waypoints(ctx, s, ns)
	if err != nil {
		return err
	}
	if output != "" {
		return r.print(output, &gwv1.GatewayList{Items: wps})
	}
	if len(wps) == 0 {
		if all {
			fmt.Fprintln(r.streams.ErrOut, "No waypoints found.")
		} else {
			fmt.Fprintf(r.streams.ErrOut, "No waypoints found in namespace %s.\n", ns)
		}
		return nil
	}
	w := printers.GetNewTabWriter(r.streams.Out)
	if all {
		fmt.Fprint(w, "NAMESPACE\t")
	}
	fmt.Fprintln(w, "NAME\tFOR\tSERVICE ACCOUNT\tADDRESS\tPROGRAMMED\tAGE")
	now := time.Now()
	for i := range wps {
		g := &wps[i]
		if all {
			fmt.Fprintf(w, "%s\t", g.Namespace)
		}
		fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\t%s\n", g.Name, serves(g), orDash(g.Annotations[label.ForServiceAccount]),
			orDash(address(g)), conditionStatus(g, string(gwv1.GatewayConditionProgrammed)),
			duration.HumanDuration(now.Sub(g.CreationTimestamp.Time)))
	}
	return w.Flush()
}

// serves is the traffic a waypoint serves.
func serves(g *gwv1.Gateway) string { return gatewayclass.Serves(g) }

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

// address is the Gateway's first reported address.
func address(g *gwv1.Gateway) string {
	if len(g.Status.Addresses) == 0 {
		return ""
	}
	return g.Status.Addresses[0].Value
}

func conditionStatus(g *gwv1.Gateway, typ string) string {
	if c := meta.FindStatusCondition(g.Status.Conditions, typ); c != nil {
		return string(c.Status)
	}
	return string(metav1.ConditionUnknown)
}

func (r *root) statusCommand() *cobra.Command {
	var output string
	cmd := &cobra.Command{
		Use:   "status [name...] [-n namespace] [-o yaml|json]",
		Short: "Show the status of waypoints (default: every waypoint of the namespace)",
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := checkOutput(output); err != nil {
				return err
			}
			return r.status(cmd.Context(), args, output)
		},
	}
	cmd.Flags().StringVarP(&output, "output", "o", "", "output format: yaml or json (default: a description)")
	return cmd
}

func (r *root) status(ctx context.Context, names []string, output string) error {
	s, err := r.connect()
	if err != nil {
		return err
	}
	ns := s.namespace
	var wps []gwv1.Gateway
	var errs []error
	if len(names) == 0 {
		if wps, err = r.waypoints(ctx, s, ns); err != nil {
			return err
		}
		if len(wps) == 0 {
			return fmt.Errorf("no waypoints in namespace %s (create one with kubectl waypoint apply -n %s)", ns, ns)
		}
	}
	for _, n := range names {
		var g gwv1.Gateway
		err := s.c.Get(ctx, client.ObjectKey{Namespace: ns, Name: n}, &g)
		switch {
		case apierrors.IsNotFound(err):
			errs = append(errs, fmt.Errorf("waypoint %s/%s not found", ns, n))
		case err != nil:
			return s.explain(err, "get gateways in namespace "+ns)
		case !r.isWaypoint(&g):
			errs = append(errs, fmt.Errorf("%s/%s is a Gateway of class %s, not a waypoint", ns, n, g.Spec.GatewayClassName))
		default:
			wps = append(wps, g)
		}
	}
	if output != "" {
		if len(wps) == 1 && len(names) == 1 {
			return errors.Join(r.print(output, &wps[0]), errors.Join(errs...))
		}
		return errors.Join(r.print(output, &gwv1.GatewayList{Items: wps}), errors.Join(errs...))
	}
	for i := range wps {
		if i > 0 {
			fmt.Fprintln(r.streams.Out)
		}
		if err := r.describe(ctx, s, &wps[i], r.streams.Out); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// describe writes a human description of a waypoint.
func (r *root) describe(ctx context.Context, s *session, g *gwv1.Gateway, out io.Writer) error {
	w := printers.GetNewTabWriter(out)
	fmt.Fprintf(w, "Waypoint:\t%s/%s\n", g.Namespace, g.Name)
	fmt.Fprintf(w, "Serves:\t%s traffic\n", serves(g))
	if sa, ok := g.Annotations[label.ForServiceAccount]; ok {
		fmt.Fprintf(w, "For service account:\t%s\n", sa)
	}
	var addrs []string
	for _, a := range g.Status.Addresses {
		addrs = append(addrs, a.Value)
	}
	fmt.Fprintf(w, "Addresses:\t%s\n", orDash(strings.Join(addrs, ", ")))

	var dep appsv1.Deployment
	err := s.c.Get(ctx, client.ObjectKey{Namespace: g.Namespace, Name: g.Name}, &dep)
	switch {
	case err == nil:
		want := int32(1)
		if dep.Spec.Replicas != nil {
			want = *dep.Spec.Replicas
		}
		fmt.Fprintf(w, "Deployment:\t%s, %d/%d ready\n", dep.Name, dep.Status.ReadyReplicas, want)
	case apierrors.IsNotFound(err):
		fmt.Fprintf(w, "Deployment:\tnot created\n")
	case apierrors.IsForbidden(err):
		fmt.Fprintf(w, "Deployment:\tunknown (not allowed to read deployments)\n")
	default:
		return s.explain(err, "get deployments in namespace "+g.Namespace)
	}
	bound, err := r.bindings(ctx, s, g)
	if err != nil {
		return err
	}
	fmt.Fprintf(w, "Bound:\t%s\n", orDash(strings.Join(bound, ", ")))
	if err := w.Flush(); err != nil {
		return err
	}

	fmt.Fprintln(out, "Conditions:")
	w = printers.GetNewTabWriter(out)
	fmt.Fprintln(w, "  TYPE\tSTATUS\tREASON\tAGE\tMESSAGE")
	now := time.Now()
	for _, c := range g.Status.Conditions {
		stale := ""
		if c.ObservedGeneration < g.Generation {
			stale = " (stale: generation " + fmt.Sprint(c.ObservedGeneration) + ")"
		}
		fmt.Fprintf(w, "  %s\t%s\t%s\t%s\t%s%s\n", c.Type, c.Status, c.Reason,
			duration.HumanDuration(now.Sub(c.LastTransitionTime.Time)), c.Message, stale)
	}
	if err := w.Flush(); err != nil {
		return err
	}
	fmt.Fprintln(out, "Listeners:")
	w = printers.GetNewTabWriter(out)
	fmt.Fprintln(w, "  NAME\tPORT\tPROTOCOL\tACCEPTED\tPROGRAMMED\tMESSAGE")
	for _, l := range g.Spec.Listeners {
		acc, prog, msg := "Unknown", "Unknown", ""
		for _, ls := range g.Status.Listeners {
			if ls.Name != l.Name {
				continue
			}
			if c := meta.FindStatusCondition(ls.Conditions, string(gwv1.ListenerConditionAccepted)); c != nil {
				acc = string(c.Status)
				if c.Status != metav1.ConditionTrue {
					msg = c.Reason + ": " + c.Message
				}
			}
			if c := meta.FindStatusCondition(ls.Conditions, string(gwv1.ListenerConditionProgrammed)); c != nil {
				prog = string(c.Status)
			}
		}
		fmt.Fprintf(w, "  %s\t%d\t%s\t%s\t%s\t%s\n", l.Name, l.Port, l.Protocol, acc, prog, msg)
	}
	return w.Flush()
}

// bindings lists what is bound to the waypoint through labels: its own
// namespace, namespaces elsewhere (when readable) and Services of its
// namespace.
func (r *root) bindings(ctx context.Context, s *session, g *gwv1.Gateway) ([]string, error) {
	var out []string
	var nsList corev1.NamespaceList
	err := s.c.List(ctx, &nsList, client.MatchingLabels{label.UseWaypoint: g.Name})
	switch {
	case apierrors.IsForbidden(err):
		// Only the own namespace can be checked.
		var n corev1.Namespace
		if err := s.c.Get(ctx, client.ObjectKey{Name: g.Namespace}, &n); err == nil {
			nsList.Items = []corev1.Namespace{n}
		}
	case err != nil:
		return nil, s.explain(err, "list namespaces")
	}
	for _, n := range nsList.Items {
		switch {
		case !boundHere(n.Labels, n.Name, g):
		case !gatewayclass.AdmitsNamespace(g, n.Name, n.Labels):
			out = append(out, "namespace "+n.Name+" (refused: the listeners' allowedRoutes.namespaces do not admit it)")
		default:
			out = append(out, "namespace "+n.Name)
		}
	}
	var svcs corev1.ServiceList
	err = s.c.List(ctx, &svcs, client.InNamespace(g.Namespace), client.MatchingLabels{label.UseWaypoint: g.Name})
	switch {
	case apierrors.IsForbidden(err):
	case err != nil:
		return nil, s.explain(err, "list services in namespace "+g.Namespace)
	}
	for _, svc := range svcs.Items {
		if boundHere(svc.Labels, svc.Namespace, g) {
			out = append(out, "service "+svc.Name)
		}
	}
	return out, nil
}

// boundHere reports whether an object of namespace ns with labels is bound
// to g.
func boundHere(labels map[string]string, ns string, g *gwv1.Gateway) bool {
	if labels[label.UseWaypoint] != g.Name {
		return false
	}
	if wns := labels[label.UseWaypointNamespace]; wns != "" {
		ns = wns
	}
	return ns == g.Namespace
}
