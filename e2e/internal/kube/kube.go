// Package kube is the end-to-end suite's and the demo's way to a cluster:
// one client built from a KUBECONFIG, server-side apply of YAML, waits for
// rollouts and pods, exec, port-forwarding, logs and the apiserver's pod
// proxy. It works against any conformant cluster (the local cluster, kind);
// nothing in it reaches around the Kubernetes API.
package kube

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/client-go/tools/portforward"
	"k8s.io/client-go/tools/remotecommand"
	"k8s.io/client-go/transport/spdy"
	"k8s.io/streaming/pkg/httpstream"

	"github.com/amesh-dev/amesh/e2e/manifest"
)

// FieldManager is the server-side apply field manager of the suite and the demo.
const FieldManager = "amesh-e2e"

// Client talks to one cluster.
type Client struct {
	Config  *rest.Config
	Core    kubernetes.Interface
	Dynamic dynamic.Interface
	Applier *manifest.Applier
}

// Connect builds a Client from a kubeconfig file ("" means $KUBECONFIG,
// then ~/.kube/config).
func Connect(kubeconfig string) (*Client, error) {
	rules := clientcmd.NewDefaultClientConfigLoadingRules()
	if kubeconfig != "" {
		rules.ExplicitPath = kubeconfig
	}
	cfg, err := clientcmd.NewNonInteractiveDeferredLoadingClientConfig(rules, nil).ClientConfig()
	if err != nil {
		return nil, fmt.Errorf("kubeconfig: %w", err)
	}
	cfg.QPS, cfg.Burst = 50, 100
	cfg.UserAgent = "amesh-e2e"
	core, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return nil, fmt.Errorf("kubernetes client: %w", err)
	}
	dyn, err := dynamic.NewForConfig(cfg)
	if err != nil {
		return nil, fmt.Errorf("dynamic client: %w", err)
	}
	ap, err := manifest.NewApplier(cfg, FieldManager)
	if err != nil {
		return nil, err
	}
	return &Client{Config: cfg, Core: core, Dynamic: dyn, Applier: ap}, nil
}

// ParseYAML decodes a multi-document YAML (or JSON) stream into objects.
func ParseYAML(doc string) ([]*unstructured.Unstructured, error) {
	dec := utilyaml.NewYAMLOrJSONDecoder(strings.NewReader(doc), 4096)
	var out []*unstructured.Unstructured
	for {
		var m map[string]any
		if err := dec.Decode(&m); err != nil {
			if errors.Is(err, io.EOF) {
				return out, nil
			}
			return nil, fmt.Errorf("parse YAML: %w", err)
		}
		if len(m) == 0 {
			continue
		}
		out = append(out, &unstructured.Unstructured{Object: m})
	}
}

// Apply applies objects with server-side apply (CRDs and namespaces first).
func (c *Client) Apply(ctx context.Context, objs ...*unstructured.Unstructured) error {
	return c.Applier.Apply(ctx, objs, manifest.ApplyOptions{})
}

// ApplyYAML parses doc (fmt.Sprintf-formatted with args when given) and
// applies it.
func (c *Client) ApplyYAML(ctx context.Context, doc string, args ...any) error {
	if len(args) > 0 {
		doc = fmt.Sprintf(doc, args...)
	}
	objs, err := ParseYAML(doc)
	if err != nil {
		return err
	}
	return c.Apply(ctx, objs...)
}

// DeleteYAML deletes the objects doc describes; missing ones are fine.
func (c *Client) DeleteYAML(ctx context.Context, doc string, args ...any) error {
	if len(args) > 0 {
		doc = fmt.Sprintf(doc, args...)
	}
	objs, err := ParseYAML(doc)
	if err != nil {
		return err
	}
	return c.Applier.Delete(ctx, objs, manifest.DeleteOptions{})
}

// Poll calls cond every interval until it returns true or an error, or
// until timeout passes; the timeout error carries cond's last complaint
// (what it returned through last).
func Poll(ctx context.Context, interval, timeout time.Duration, cond func(ctx context.Context) (bool, error)) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	var last error
	for {
		ok, err := cond(ctx)
		if ok {
			return nil
		}
		if err != nil && (ctx.Err() == nil || last == nil) {
			last = err
		}
		if ctx.Err() != nil {
			if last != nil {
				return fmt.Errorf("after %s: %w", timeout, last)
			}
			return fmt.Errorf("not done after %s: %w", timeout, ctx.Err())
		}
		select {
		case <-ctx.Done():
		case <-time.After(interval):
		}
	}
}

// WaitDeployment waits until every replica of a Deployment is updated and
// available.
func (c *Client) WaitDeployment(ctx context.Context, ns, name string, timeout time.Duration) error {
	err := Poll(ctx, time.Second, timeout, func(ctx context.Context) (bool, error) {
		d, err := c.Core.AppsV1().Deployments(ns).Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			return false, err
		}
		return deploymentDone(d)
	})
	if err != nil {
		return fmt.Errorf("deployment %s/%s not available: %w", ns, name, err)
	}
	return nil
}

func deploymentDone(d *appsv1.Deployment) (bool, error) {
	want := int32(1)
	if d.Spec.Replicas != nil {
		want = *d.Spec.Replicas
	}
	s := d.Status
	if s.ObservedGeneration >= d.Generation && s.UpdatedReplicas == want && s.AvailableReplicas == want && s.Replicas == want {
		return true, nil
	}
	return false, fmt.Errorf("%d/%d updated, %d available, %d total", s.UpdatedReplicas, want, s.AvailableReplicas, s.Replicas)
}

// WaitDaemonSet waits until a DaemonSet runs an updated, ready pod on
// every node it should.
func (c *Client) WaitDaemonSet(ctx context.Context, ns, name string, timeout time.Duration) error {
	err := Poll(ctx, time.Second, timeout, func(ctx context.Context) (bool, error) {
		d, err := c.Core.AppsV1().DaemonSets(ns).Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			return false, err
		}
		s := d.Status
		if s.ObservedGeneration >= d.Generation && s.DesiredNumberScheduled > 0 &&
			s.UpdatedNumberScheduled == s.DesiredNumberScheduled && s.NumberReady == s.DesiredNumberScheduled {
			return true, nil
		}
		return false, fmt.Errorf("%d/%d updated, %d ready", s.UpdatedNumberScheduled, s.DesiredNumberScheduled, s.NumberReady)
	})
	if err != nil {
		return fmt.Errorf("daemonset %s/%s not ready: %w", ns, name, err)
	}
	return nil
}

// Ready reports whether a pod runs and is Ready.
func Ready(p *corev1.Pod) bool {
	if p.Status.Phase != corev1.PodRunning || p.DeletionTimestamp != nil {
		return false
	}
	for _, c := range p.Status.Conditions {
		if c.Type == corev1.PodReady {
			return c.Status == corev1.ConditionTrue
		}
	}
	return false
}

// Pods lists the pods matching selector, not being deleted.
func (c *Client) Pods(ctx context.Context, ns, selector string) ([]corev1.Pod, error) {
	l, err := c.Core.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{LabelSelector: selector})
	if err != nil {
		return nil, fmt.Errorf("list pods %s %q: %w", ns, selector, err)
	}
	var out []corev1.Pod
	for _, p := range l.Items {
		if p.DeletionTimestamp == nil {
			out = append(out, p)
		}
	}
	return out, nil
}

// WaitPods waits until exactly n pods match selector and all are Ready,
// and returns them.
func (c *Client) WaitPods(ctx context.Context, ns, selector string, n int, timeout time.Duration) ([]corev1.Pod, error) {
	var pods []corev1.Pod
	err := Poll(ctx, 500*time.Millisecond, timeout, func(ctx context.Context) (bool, error) {
		var err error
		pods, err = c.Pods(ctx, ns, selector)
		if err != nil {
			return false, err
		}
		ready := 0
		for i := range pods {
			if Ready(&pods[i]) {
				ready++
			}
		}
		if len(pods) == n && ready == n {
			return true, nil
		}
		return false, fmt.Errorf("%d pods, %d ready, want %d", len(pods), ready, n)
	})
	if err != nil {
		return nil, fmt.Errorf("pods %s %q: %w", ns, selector, err)
	}
	return pods, nil
}

// Pod returns one Ready pod matching selector.
func (c *Client) Pod(ctx context.Context, ns, selector string) (*corev1.Pod, error) {
	pods, err := c.Pods(ctx, ns, selector)
	if err != nil {
		return nil, err
	}
	for i := range pods {
		if Ready(&pods[i]) {
			return &pods[i], nil
		}
	}
	return nil, fmt.Errorf("no ready pod %s %q (of %d)", ns, selector, len(pods))
}

// CreateNamespace creates (or keeps) a namespace with labels.
func (c *Client) CreateNamespace(ctx context.Context, name string, labels map[string]string) error {
	_, err := c.Core.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{
		ObjectMeta: metav1.ObjectMeta{Name: name, Labels: labels},
	}, metav1.CreateOptions{})
	if err != nil && !apierrors.IsAlreadyExists(err) {
		return fmt.Errorf("create namespace %s: %w", name, err)
	}
	return nil
}

// DeleteNamespace deletes a namespace and, when wait is set, waits until
// it is gone.
func (c *Client) DeleteNamespace(ctx context.Context, name string, wait time.Duration) error {
	err := c.Core.CoreV1().Namespaces().Delete(ctx, name, metav1.DeleteOptions{})
	if apierrors.IsNotFound(err) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("delete namespace %s: %w", name, err)
	}
	if wait <= 0 {
		return nil
	}
	return Poll(ctx, time.Second, wait, func(ctx context.Context) (bool, error) {
		_, err := c.Core.CoreV1().Namespaces().Get(ctx, name, metav1.GetOptions{})
		if apierrors.IsNotFound(err) {
			return true, nil
		}
		return false, fmt.Errorf("namespace %s still there (%v)", name, err)
	})
}

// Label sets (value non-empty) or removes (value "") a label on an object
// of the core API: "namespaces", "pods" or "services"; ns is empty for
// namespaces.
func (c *Client) Label(ctx context.Context, resource, ns, name, key, value string) error {
	var v any = value
	if value == "" {
		v = nil
	}
	patch := map[string]any{"metadata": map[string]any{"labels": map[string]any{key: v}}}
	body, err := json.Marshal(patch)
	if err != nil {
		return err
	}
	req := c.Core.CoreV1().RESTClient().Patch("application/merge-patch+json").Resource(resource).Name(name).Body(body)
	if ns != "" {
		req = req.Namespace(ns)
	}
	if err := req.Do(ctx).Error(); err != nil {
		return fmt.Errorf("label %s %s/%s %s=%q: %w", resource, ns, name, key, value, err)
	}
	return nil
}

// Exec runs cmd in a container (container "" = the first) and returns its
// stdout; a non-zero exit is an error carrying stderr.
func (c *Client) Exec(ctx context.Context, ns, pod, container string, cmd []string, stdin io.Reader) (string, error) {
	opts := &corev1.PodExecOptions{Container: container, Command: cmd, Stdout: true, Stderr: true, Stdin: stdin != nil}
	req := c.Core.CoreV1().RESTClient().Post().Resource("pods").Namespace(ns).Name(pod).SubResource("exec").
		VersionedParams(opts, scheme.ParameterCodec)
	ex, err := remotecommand.NewWebSocketExecutor(c.Config, "GET", req.URL().String())
	if err != nil {
		return "", fmt.Errorf("exec %v in %s/%s: %w", cmd, ns, pod, err)
	}
	var out, errb bytes.Buffer
	err = ex.StreamWithContext(ctx, remotecommand.StreamOptions{Stdin: stdin, Stdout: &out, Stderr: &errb})
	if err != nil {
		return out.String(), fmt.Errorf("exec %v in %s/%s: %w (stderr %q)", cmd, ns, pod, err, tail(errb.String(), 2000))
	}
	return out.String(), nil
}

// ExecStream runs cmd in a container, copying its stdout to w as it comes,
// until it exits or ctx ends.
func (c *Client) ExecStream(ctx context.Context, ns, pod, container string, cmd []string, stdout, stderr io.Writer) error {
	opts := &corev1.PodExecOptions{Container: container, Command: cmd, Stdout: true, Stderr: true}
	req := c.Core.CoreV1().RESTClient().Post().Resource("pods").Namespace(ns).Name(pod).SubResource("exec").
		VersionedParams(opts, scheme.ParameterCodec)
	ex, err := remotecommand.NewWebSocketExecutor(c.Config, "GET", req.URL().String())
	if err != nil {
		return fmt.Errorf("exec %v in %s/%s: %w", cmd, ns, pod, err)
	}
	if err := ex.StreamWithContext(ctx, remotecommand.StreamOptions{Stdout: stdout, Stderr: stderr}); err != nil {
		return fmt.Errorf("exec %v in %s/%s: %w", cmd, ns, pod, err)
	}
	return nil
}

func tail(s string, n int) string {
	if len(s) > n {
		return "…" + s[len(s)-n:]
	}
	return s
}

// Forward forwards a local loopback port to a pod's port and returns the
// local address ("127.0.0.1:NNNNN"). The forward ends with ctx or stop.
func (c *Client) Forward(ctx context.Context, ns, pod string, port int) (addr string, stop func(), err error) {
	req := c.Core.CoreV1().RESTClient().Post().Resource("pods").Namespace(ns).Name(pod).SubResource("portforward")
	rt, upgrader, err := spdy.RoundTripperFor(c.Config)
	if err != nil {
		return "", nil, fmt.Errorf("port-forward: %w", err)
	}
	spdyDialer := spdy.NewDialer(upgrader, &http.Client{Transport: rt}, http.MethodPost, req.URL())
	wsDialer, err := portforward.NewSPDYOverWebsocketDialer(req.URL(), c.Config)
	if err != nil {
		return "", nil, fmt.Errorf("port-forward: %w", err)
	}
	dialer := portforward.NewFallbackDialer(wsDialer, spdyDialer, func(err error) bool {
		return httpstream.IsUpgradeFailure(err) || httpstream.IsHTTPSProxyError(err)
	})
	fctx, cancel := context.WithCancel(ctx)
	ready := make(chan struct{})
	pf, err := portforward.NewOnAddressesWithContext(fctx, dialer, []string{"127.0.0.1"}, []string{fmt.Sprintf("0:%d", port)}, ready, io.Discard, io.Discard)
	if err != nil {
		cancel()
		return "", nil, fmt.Errorf("port-forward %s/%s:%d: %w", ns, pod, port, err)
	}
	done := make(chan error, 1)
	go func() { done <- pf.ForwardPorts() }()
	select {
	case <-ready:
	case err := <-done:
		cancel()
		return "", nil, fmt.Errorf("port-forward %s/%s:%d: %w", ns, pod, port, err)
	case <-time.After(30 * time.Second):
		cancel()
		<-done
		return "", nil, fmt.Errorf("port-forward %s/%s:%d: not ready after 30s", ns, pod, port)
	}
	ports, err := pf.GetPorts()
	if err != nil || len(ports) != 1 {
		cancel()
		<-done
		return "", nil, fmt.Errorf("port-forward %s/%s:%d: local port: %v", ns, pod, port, err)
	}
	stop = func() {
		cancel()
		<-done
	}
	return fmt.Sprintf("127.0.0.1:%d", ports[0].Local), stop, nil
}

// ProxyGet GETs path from a pod's port through the apiserver's pod proxy.
func (c *Client) ProxyGet(ctx context.Context, ns, pod string, port int, path string) ([]byte, error) {
	b, err := c.Core.CoreV1().Pods(ns).ProxyGet("http", pod, fmt.Sprint(port), path, nil).DoRaw(ctx)
	if err != nil {
		return nil, fmt.Errorf("GET %s/%s:%d%s: %w", ns, pod, port, path, err)
	}
	return b, nil
}

// Logs returns a container's log (container "" = the only one); since > 0
// limits it to the last span of time.
func (c *Client) Logs(ctx context.Context, ns, pod, container string, since time.Duration) (string, error) {
	opts := &corev1.PodLogOptions{Container: container}
	if since > 0 {
		s := int64(since.Seconds() + 1)
		opts.SinceSeconds = &s
	}
	b, err := c.Core.CoreV1().Pods(ns).GetLogs(pod, opts).DoRaw(ctx)
	if err != nil {
		return "", fmt.Errorf("logs of %s/%s: %w", ns, pod, err)
	}
	return string(b), nil
}
