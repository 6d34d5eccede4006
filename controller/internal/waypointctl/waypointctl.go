// Package waypointctl implements `kubectl waypoint`, the kubectl plugin that
// creates, lists, inspects and deletes amesh waypoints (Gateways of the
// amesh-waypoint class) and binds namespaces to them, with kubectl's
// kubeconfig, context and namespace flags and errors that say what to do.
package waypointctl

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/cli-runtime/pkg/genericclioptions"
	"k8s.io/cli-runtime/pkg/genericiooptions"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/tools/clientcmd"
	"sigs.k8s.io/controller-runtime/pkg/client"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"

	"github.com/amesh-dev/amesh/controller/internal/label"
)

// FieldManager is the server-side apply field manager of the plugin.
const FieldManager = "kubectl-waypoint"

// DefaultName is the waypoint name when none is given.
const DefaultName = "waypoint"

// root holds what every subcommand shares.
type root struct {
	flags   *genericclioptions.ConfigFlags
	streams genericiooptions.IOStreams
	class   string
	// poll is how often --wait re-reads the Gateway.
	poll time.Duration
}

// NewCommand returns the `kubectl waypoint` command writing to streams.
func NewCommand(streams genericiooptions.IOStreams) *cobra.Command {
	r := &root{
		flags:   genericclioptions.NewConfigFlags(true),
		streams: streams,
		class:   label.WaypointClass,
		poll:    500 * time.Millisecond,
	}
	cmd := &cobra.Command{
		Use:   "kubectl-waypoint",
		Short: "Manage amesh waypoints",
		Annotations: map[string]string{
			cobra.CommandDisplayNameAnnotation: "kubectl waypoint",
		},
		Long: `Manage amesh waypoints: the L7 proxies that serve a namespace, some of its
services or the workloads of one service account. A waypoint is a Gateway of
the class ` + label.WaypointClass + `; amesh deploys it and reports its status.`,
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	cmd.CompletionOptions.HiddenDefaultCmd = true
	cmd.SetIn(streams.In)
	cmd.SetOut(streams.Out)
	cmd.SetErr(streams.ErrOut)
	r.flags.AddFlags(cmd.PersistentFlags())
	cmd.PersistentFlags().StringVar(&r.class, "class", r.class, "GatewayClass of waypoints")
	_ = cmd.PersistentFlags().MarkHidden("class")
	cmd.PersistentFlags().DurationVar(&r.poll, "poll-interval", r.poll, "how often --wait checks the waypoint")
	_ = cmd.PersistentFlags().MarkHidden("poll-interval")
	cmd.AddCommand(r.applyCommand(), r.listCommand(), r.statusCommand(), r.deleteCommand())
	return cmd
}

// session is a connection to the cluster.
type session struct {
	c         client.Client
	namespace string
	// explicitNS is true when -n was given.
	explicitNS bool
	host       string
}

func scheme() (*runtime.Scheme, error) {
	s := runtime.NewScheme()
	if err := clientgoscheme.AddToScheme(s); err != nil {
		return nil, err
	}
	if err := gwv1.Install(s); err != nil {
		return nil, err
	}
	return s, nil
}

// connect builds a client from the kubeconfig flags.
func (r *root) connect() (*session, error) {
	loader := r.flags.ToRawKubeConfigLoader()
	if raw, err := loader.RawConfig(); err == nil && len(raw.Contexts) == 0 && len(raw.Clusters) == 0 &&
		(r.flags.APIServer == nil || *r.flags.APIServer == "") && os.Getenv("KUBERNETES_SERVICE_HOST") == "" {
		// clientcmd would fall back to http://localhost:8080.
		return nil, errors.New("no Kubernetes configuration found: set KUBECONFIG, pass --kubeconfig, or create ~/.kube/config")
	}
	cfg, err := loader.ClientConfig()
	if err != nil {
		if clientcmd.IsEmptyConfig(err) {
			return nil, errors.New("no Kubernetes configuration found: set KUBECONFIG, pass --kubeconfig, or create ~/.kube/config")
		}
		return nil, fmt.Errorf("kubeconfig: %w", err)
	}
	ns, explicit, err := loader.Namespace()
	if err != nil {
		return nil, fmt.Errorf("kubeconfig: namespace: %w", err)
	}
	cfg.UserAgent = "kubectl-waypoint"
	s, err := scheme()
	if err != nil {
		return nil, err
	}
	c, err := client.New(cfg, client.Options{Scheme: s})
	if err != nil {
		return nil, explain(err, cfg.Host, "connect")
	}
	return &session{c: c, namespace: ns, explicitNS: explicit, host: cfg.Host}, nil
}

// explain turns common failures into errors that say what to do; the
// original error stays wrapped. what is the action that failed ("create
// gateways in shop").
func (s *session) explain(err error, what string) error {
	return explain(err, s.host, what)
}

func explain(err error, host, what string) error {
	if err == nil {
		return nil
	}
	var urlErr *url.Error
	var opErr *net.OpError
	switch {
	case meta.IsNoMatchError(err) || isMissingGatewayAPI(err):
		return fmt.Errorf("%s: the Gateway API CRDs (gateway.networking.k8s.io/v1) are not installed in this cluster; "+
			"install amesh (its manifests include them) or the Gateway API v1.6 experimental channel: %w", what, err)
	case apierrors.IsForbidden(err):
		return fmt.Errorf("%s: permission denied; you need the right to %s (check with kubectl auth can-i): %w", what, what, err)
	case apierrors.IsUnauthorized(err):
		return fmt.Errorf("%s: the API server at %s rejected your credentials (expired token? check --context and your kubeconfig): %w", what, host, err)
	case errors.Is(err, syscall.ECONNREFUSED), errors.As(err, &opErr), errors.As(err, &urlErr) && !apierrors.IsTimeout(err),
		errors.Is(err, context.DeadlineExceeded) && host != "":
		return fmt.Errorf("%s: cannot reach the Kubernetes API server at %s (is the cluster running? check --kubeconfig and --context): %w", what, host, err)
	}
	return fmt.Errorf("%s: %w", what, err)
}

// isMissingGatewayAPI recognises the API server's 404 for a group it does
// not serve.
func isMissingGatewayAPI(err error) bool {
	var st apierrors.APIStatus
	if !errors.As(err, &st) || !apierrors.IsNotFound(err) {
		return false
	}
	d := st.Status().Details
	return d == nil || d.Name == "" && strings.Contains(err.Error(), "the server could not find the requested resource")
}

// warn writes a warning line.
func (r *root) warn(format string, a ...any) {
	fmt.Fprintf(r.streams.ErrOut, "Warning: "+format+"\n", a...)
}

// info writes a progress line.
func (r *root) info(format string, a ...any) {
	fmt.Fprintf(r.streams.Out, format+"\n", a...)
}

// isWaypoint reports whether gw is of the waypoint class.
func (r *root) isWaypoint(gw *gwv1.Gateway) bool {
	return string(gw.Spec.GatewayClassName) == r.class
}

// checkInstalled fails when the waypoint GatewayClass does not exist.
func (r *root) checkInstalled(ctx context.Context, s *session) error {
	var gc gwv1.GatewayClass
	err := s.c.Get(ctx, client.ObjectKey{Name: r.class}, &gc)
	switch {
	case apierrors.IsNotFound(err) && !isMissingGatewayAPI(err):
		return fmt.Errorf("the GatewayClass %s does not exist: amesh is not installed in this cluster (install its manifests first)", r.class)
	case apierrors.IsForbidden(err):
		// Reading cluster-scoped classes may not be allowed; the
		// controller reports a missing class in the Gateway's status.
		return nil
	case err != nil:
		return s.explain(err, "get gatewayclasses")
	}
	if string(gc.Spec.ControllerName) != label.WaypointController {
		r.warn("GatewayClass %s is served by %s, not amesh (%s)", r.class, gc.Spec.ControllerName, label.WaypointController)
	}
	return nil
}

// Main runs the plugin with the process's arguments and streams and
// returns the exit code.
func Main(ctx context.Context, args []string) int {
	streams := genericiooptions.IOStreams{In: os.Stdin, Out: os.Stdout, ErrOut: os.Stderr}
	cmd := NewCommand(streams)
	cmd.SetArgs(args)
	if err := cmd.ExecuteContext(ctx); err != nil {
		fmt.Fprintln(streams.ErrOut, "error:", err)
		return 1
	}
	return 0
}
