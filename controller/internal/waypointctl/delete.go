package waypointctl

import (
	"context"
	"errors"
	"fmt"

	"github.com/spf13/cobra"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"sigs.k8s.io/controller-runtime/pkg/client"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"

	"github.com/amesh-dev/amesh/controller/internal/label"
)

func (r *root) deleteCommand() *cobra.Command {
	var all bool
	cmd := &cobra.Command{
		Use:   "delete [name...|--all] [-n namespace]",
		Short: "Delete waypoints (default: the one named \"waypoint\")",
		Long: `Delete waypoints of a namespace: the ones named, every one with --all, or the
one named "waypoint". What amesh deployed for them goes with them. Labels that
bind namespaces or services to a deleted waypoint are reported, not removed:
the traffic they bind is refused until the waypoint is back or they go.`,
		RunE: func(cmd *cobra.Command, args []string) error {
			if all && len(args) > 0 {
				return errors.New("name waypoints or pass --all, not both")
			}
			if !all && len(args) == 0 {
				args = []string{DefaultName}
			}
			return r.delete(cmd.Context(), args, all)
		},
	}
	cmd.Flags().BoolVar(&all, "all", false, "delete every waypoint of the namespace")
	return cmd
}

func (r *root) delete(ctx context.Context, names []string, all bool) error {
	s, err := r.connect()
	if err != nil {
		return err
	}
	ns := s.namespace
	var targets []gwv1.Gateway
	var errs []error
	if all {
		if targets, err = r.waypoints(ctx, s, ns); err != nil {
			return err
		}
		if len(targets) == 0 {
			fmt.Fprintf(r.streams.ErrOut, "No waypoints found in namespace %s.\n", ns)
			return nil
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
			errs = append(errs, fmt.Errorf("%s/%s is a Gateway of class %s, not a waypoint: not deleted", ns, n, g.Spec.GatewayClassName))
		default:
			targets = append(targets, g)
		}
	}
	for i := range targets {
		g := &targets[i]
		uid := g.UID
		err := s.c.Delete(ctx, g, client.Preconditions{UID: &uid})
		switch {
		case apierrors.IsNotFound(err):
			errs = append(errs, fmt.Errorf("waypoint %s/%s not found", ns, g.Name))
			continue
		case err != nil:
			errs = append(errs, s.explain(err, "delete gateways in namespace "+ns))
			continue
		}
		r.info("waypoint %s/%s deleted", ns, g.Name)
		r.warnDangling(ctx, s, g)
	}
	return errors.Join(errs...)
}

// warnDangling reports labels still binding the namespace or its services
// to a deleted waypoint.
func (r *root) warnDangling(ctx context.Context, s *session, g *gwv1.Gateway) {
	var n corev1.Namespace
	if err := s.c.Get(ctx, client.ObjectKey{Name: g.Namespace}, &n); err == nil && boundHere(n.Labels, n.Name, g) {
		r.warn("namespace %s is still bound to the deleted waypoint %s: its traffic is refused until the waypoint is back; "+
			"to send it directly instead: kubectl label namespace %s %s-", n.Name, g.Name, n.Name, label.UseWaypoint)
	}
	var svcs corev1.ServiceList
	if err := s.c.List(ctx, &svcs, client.InNamespace(g.Namespace), client.MatchingLabels{label.UseWaypoint: g.Name}); err == nil {
		for _, svc := range svcs.Items {
			if boundHere(svc.Labels, svc.Namespace, g) {
				r.warn("service %s/%s is still bound to the deleted waypoint %s: its traffic is refused until the waypoint is back; "+
					"to send it directly instead: kubectl label service -n %s %s %s-", svc.Namespace, svc.Name, g.Name, svc.Namespace, svc.Name, label.UseWaypoint)
			}
		}
	}
}
