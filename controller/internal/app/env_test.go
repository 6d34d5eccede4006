package app_test

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/structpb"
	appsv1 "k8s.io/api/apps/v1"
	authnv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"sigs.k8s.io/controller-runtime/pkg/client"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"

	"github.com/amesh-dev/amesh/api/bearer"
	"github.com/amesh-dev/amesh/api/ca"
	pb "github.com/amesh-dev/amesh/api/discovery/v1"
	"github.com/amesh-dev/amesh/api/xds"
	"github.com/amesh-dev/amesh/api/xds/xdsclient"
	"github.com/amesh-dev/amesh/controller/internal/app"
	"github.com/amesh-dev/amesh/controller/internal/kubetest"
)

// env is a real kube-apiserver + etcd (envtest) with the amesh and
// Gateway API CRDs, and a running controller.
type env struct {
	t    *testing.T
	rest *rest.Config
	c    client.Client
	kc   *kubernetes.Clientset
	app  *app.App
	// stops stop the controllers started, in order.
	stops []func()
	// roots verify the controller's serving certificate.
	roots *x509.CertPool
}

// startEnv starts the apiserver, installs the CRDs and the namespace of the
// controller, and runs the controller with cfg (addresses on loopback,
// ephemeral ports).
func startEnv(t *testing.T, mutate func(*app.Config)) *env {
	t.Helper()
	// The apiserver, etcd and CRDs as the manifests install them (the
	// Gateway API's experimental channel); stopped when the test ends, even
	// when it fails or the binary is interrupted.
	k := kubetest.Start(t, kubetest.Options{})
	cfg := k.Config
	scheme, err := app.Scheme()
	if err != nil {
		t.Fatal(err)
	}
	c, err := client.New(cfg, client.Options{Scheme: scheme})
	if err != nil {
		t.Fatal(err)
	}
	kc, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	e := &env{t: t, rest: cfg, c: c, kc: kc}
	e.create(&corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "amesh-system"}})
	// The controller runs with the permissions the manifests grant it,
	// and the waypoint GatewayClass is installed as the manifests do.
	e.applyFile(filepath.Join("..", "..", "..", "manifests", "base", "rbac.yaml"))
	e.applyFile(filepath.Join("..", "..", "..", "manifests", "base", "gatewayclass.yaml"))
	e.app = e.startApp(mutate)
	var sec corev1.Secret
	e.get("amesh-system", "amesh-ca", &sec)
	e.roots = x509.NewCertPool()
	if !e.roots.AppendCertsFromPEM(sec.Data["ca.crt"]) {
		t.Fatal("CA secret has no ca.crt")
	}
	return e
}

// controllerConfig is the apiserver configuration of the controller: its
// own service account (as deployed), not the test's admin.
func (e *env) controllerConfig() *rest.Config {
	c := rest.CopyConfig(e.rest)
	c.Impersonate = rest.ImpersonationConfig{
		UserName: "system:serviceaccount:amesh-system:amesh-controller",
		Groups:   []string{"system:serviceaccounts", "system:serviceaccounts:amesh-system", "system:authenticated"},
	}
	return c
}

// startApp runs a controller (addresses on loopback, ephemeral ports) until
// the test ends, and waits until it is ready.
func (e *env) startApp(mutate func(*app.Config)) *app.App {
	t := e.t
	t.Helper()
	acfg := app.Default()
	acfg.GRPCAddr = "127.0.0.1:0"
	acfg.MetricsAddr = "127.0.0.1:0"
	acfg.Debounce = 5 * time.Millisecond
	acfg.MaxDebounce = 50 * time.Millisecond
	acfg.ShutdownTimeout = 2 * time.Second
	if mutate != nil {
		mutate(&acfg)
	}
	log := zaptest.NewLogger(t, zaptest.Level(zap.WarnLevel))
	a, err := app.New(acfg, e.controllerConfig(), log)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- a.Run(ctx) }()
	var once sync.Once
	stop := func() {
		once.Do(func() {
			cancel()
			select {
			case err := <-done:
				if err != nil {
					t.Errorf("controller: %v", err)
				}
			case <-time.After(20 * time.Second):
				t.Error("controller did not stop within 20s")
			}
		})
	}
	t.Cleanup(stop)
	e.stops = append(e.stops, stop)
	select {
	case <-a.Ready():
	case err := <-done:
		t.Fatalf("controller exited: %v", err)
	case <-time.After(30 * time.Second):
		t.Fatal("controller not ready within 30s")
	}
	return a
}

// applyFile creates every object of a multi-document YAML file.
func (e *env) applyFile(path string) {
	e.t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		e.t.Fatal(err)
	}
	scheme, err := app.Scheme()
	if err != nil {
		e.t.Fatal(err)
	}
	dec := serializer.NewCodecFactory(scheme).UniversalDeserializer()
	for doc := range strings.SplitSeq(string(b), "\n---\n") {
		if strings.TrimSpace(doc) == "" {
			continue
		}
		obj, _, err := dec.Decode([]byte(doc), nil, nil)
		if err != nil {
			e.t.Fatalf("%s: %v", path, err)
		}
		e.create(obj.(client.Object))
	}
}

func (e *env) create(o client.Object) {
	e.t.Helper()
	if err := e.c.Create(context.Background(), o); err != nil {
		e.t.Fatalf("create %T %s: %v", o, o.GetName(), err)
	}
}

func (e *env) get(ns, name string, o client.Object) {
	e.t.Helper()
	if err := e.c.Get(context.Background(), types.NamespacedName{Namespace: ns, Name: name}, o); err != nil {
		e.t.Fatalf("get %T %s/%s: %v", o, ns, name, err)
	}
}

// pod creates a running, ready pod with an IP on node, as the kubelet
// would report it.
func (e *env) pod(ns, name, sa, node, ip string, labels, annotations map[string]string) *corev1.Pod {
	e.t.Helper()
	return e.createPod(&corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, Labels: labels, Annotations: annotations},
		Spec: corev1.PodSpec{
			NodeName:           node,
			ServiceAccountName: sa,
			Containers: []corev1.Container{{Name: "app", Image: "app", Ports: []corev1.ContainerPort{
				{Name: "http", ContainerPort: 8080},
			}}},
		},
	}, ip)
}

// createPod creates p and reports it running and ready with ip.
func (e *env) createPod(p *corev1.Pod, ip string) *corev1.Pod {
	e.t.Helper()
	e.create(p)
	p.Status = corev1.PodStatus{
		Phase:      corev1.PodRunning,
		PodIP:      ip,
		PodIPs:     []corev1.PodIP{{IP: ip}},
		Conditions: []corev1.PodCondition{{Type: corev1.PodReady, Status: corev1.ConditionTrue}},
	}
	if err := e.c.Status().Update(context.Background(), p); err != nil {
		e.t.Fatalf("pod status %s/%s: %v", p.Namespace, p.Name, err)
	}
	return p
}

// waypointPod runs a pod of waypoint Gateway ns/gw as its Deployment
// would (envtest has no controller-manager): it waits for the deployer's
// Deployment, creates a ReplicaSet that Deployment controls and a pod that
// ReplicaSet controls, with the pod template's labels and service account.
func (e *env) waypointPod(ns, gw, name, node, ip string) *corev1.Pod {
	e.t.Helper()
	var dep appsv1.Deployment
	within(e.t, 20*time.Second, nil, func() bool {
		return e.c.Get(context.Background(), types.NamespacedName{Namespace: ns, Name: gw}, &dep) == nil
	}, func() string { return "no waypoint Deployment " + ns + "/" + gw })
	controller := true
	rs := &appsv1.ReplicaSet{
		ObjectMeta: metav1.ObjectMeta{
			Namespace: ns, Name: name + "-rs", Labels: dep.Spec.Template.Labels,
			OwnerReferences: []metav1.OwnerReference{{
				APIVersion: "apps/v1", Kind: "Deployment", Name: dep.Name, UID: dep.UID, Controller: &controller,
			}},
		},
		Spec: appsv1.ReplicaSetSpec{Selector: dep.Spec.Selector, Template: dep.Spec.Template},
	}
	e.create(rs)
	return e.createPod(&corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{
			Namespace: ns, Name: name, Labels: dep.Spec.Template.Labels,
			OwnerReferences: []metav1.OwnerReference{{
				APIVersion: "apps/v1", Kind: "ReplicaSet", Name: rs.Name, UID: rs.UID, Controller: &controller,
			}},
		},
		Spec: corev1.PodSpec{
			NodeName:           node,
			ServiceAccountName: dep.Spec.Template.Spec.ServiceAccountName,
			Containers:         []corev1.Container{{Name: "waypoint", Image: "waypoint"}},
		},
	}, ip)
}

// waypointGateway creates a waypoint Gateway.
func (e *env) waypointGateway(ns, name string, labels, annotations map[string]string) *gwv1.Gateway {
	e.t.Helper()
	gw := &gwv1.Gateway{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, Labels: labels, Annotations: annotations},
		Spec: gwv1.GatewaySpec{
			GatewayClassName: "amesh-waypoint",
			Listeners:        []gwv1.Listener{{Name: "mesh", Port: 15008, Protocol: "HBONE"}},
		},
	}
	e.create(gw)
	return gw
}

func (e *env) serviceAccount(ns, name string) {
	e.t.Helper()
	e.create(&corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name}})
}

func (e *env) node(name string) {
	e.t.Helper()
	e.create(&corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name}})
}

// token issues a projected token for a service account, bound to a pod
// when pod is set.
func (e *env) token(ns, sa string, pod *corev1.Pod, audiences ...string) string {
	e.t.Helper()
	tr := &authnv1.TokenRequest{Spec: authnv1.TokenRequestSpec{Audiences: audiences}}
	if pod != nil {
		tr.Spec.BoundObjectRef = &authnv1.BoundObjectReference{Kind: "Pod", APIVersion: "v1", Name: pod.Name, UID: pod.UID}
	}
	res, err := e.kc.CoreV1().ServiceAccounts(ns).CreateToken(context.Background(), sa, tr, metav1.CreateOptions{})
	if err != nil {
		e.t.Fatalf("token for %s/%s: %v", ns, sa, err)
	}
	return res.Status.Token
}

// dial opens a TLS connection to the controller's gRPC port that verifies
// the serving certificate and sends token (if any) with every call.
func (e *env) dial(token string) *grpc.ClientConn {
	e.t.Helper()
	return e.dialTo(e.app, token, e.roots)
}

// dialTo dials controller a, verifying its certificate with roots.
func (e *env) dialTo(a *app.App, token string, roots *x509.CertPool) *grpc.ClientConn {
	e.t.Helper()
	opts := []grpc.DialOption{grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{
		RootCAs:    roots,
		ServerName: "amesh-controller.amesh-system.svc",
		MinVersion: tls.VersionTLS13,
	}))}
	if token != "" {
		opts = append(opts, grpc.WithPerRPCCredentials(bearer.PerRPC(func(context.Context) (string, error) { return token, nil })))
	}
	conn, err := grpc.NewClient(a.GRPCAddr(), opts...)
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() { _ = conn.Close() })
	return conn
}

// caClient is a certificate client with token.
func (e *env) caClient(token string) *ca.Client {
	return ca.NewClient(e.dial(token), nil)
}

// mirror is an xDS client's view: every resource it holds, by type and
// name, and every change, for waiting.
type mirror struct {
	mu      sync.Mutex
	state   map[string]map[string]proto.Message
	changed chan struct{}
	client  *xdsclient.Client
	errc    chan error
}

func (m *mirror) Apply(typeURL string, upserts []*xds.Resource, removes []string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	s := m.state[typeURL]
	if s == nil {
		s = map[string]proto.Message{}
		m.state[typeURL] = s
	}
	for _, r := range upserts {
		s[r.Name] = r.Body
	}
	for _, n := range removes {
		delete(s, n)
	}
	select {
	case m.changed <- struct{}{}:
	default:
	}
	return nil
}

func (m *mirror) get(typeURL, name string) proto.Message {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.state[typeURL][name]
}

func (m *mirror) names(typeURL string) []string {
	m.mu.Lock()
	defer m.mu.Unlock()
	var out []string
	for n := range m.state[typeURL] {
		out = append(out, n)
	}
	return out
}

var allTypes = []string{pb.WorkloadType, pb.ServiceType, pb.AuthorizationType, pb.TrustBundleType, pb.WaypointServiceType, pb.WaypointGatewayType}

// subscribe runs a real xDS client (api/xds) with token and the node
// metadata a data-plane component sends.
func (e *env) subscribe(token string, meta map[string]string) *mirror {
	e.t.Helper()
	return e.subscribeTo(e.app, token, meta)
}

// subscribeTo subscribes to controller a.
func (e *env) subscribeTo(a *app.App, token string, meta map[string]string) *mirror {
	e.t.Helper()
	md := map[string]any{}
	for k, v := range meta {
		md[k] = v
	}
	st, err := structpb.NewStruct(md)
	if err != nil {
		e.t.Fatal(err)
	}
	m := &mirror{state: map[string]map[string]proto.Message{}, changed: make(chan struct{}, 1), errc: make(chan error, 1)}
	m.client = xdsclient.New(xdsclient.Options{
		Conn:           e.dialTo(a, token, e.roots),
		Node:           &xdsclient.Node{ID: meta["pod"], Metadata: st},
		TypeURLs:       allTypes,
		Handler:        m,
		InitialBackoff: 50 * time.Millisecond,
		MaxBackoff:     200 * time.Millisecond,
	})
	ctx, cancel := context.WithCancel(context.Background())
	go func() { m.errc <- m.client.Run(ctx) }()
	e.t.Cleanup(func() {
		cancel()
		if err := <-m.errc; err != nil {
			e.t.Errorf("xds client: %v", err)
		}
	})
	return m
}

// within waits up to d for cond, re-checking at every change the mirror
// sees (and every 10ms); it fails the test with what() otherwise.
func within(t *testing.T, d time.Duration, m *mirror, cond func() bool, what func() string) time.Duration {
	t.Helper()
	start := time.Now()
	deadline := time.NewTimer(d)
	defer deadline.Stop()
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	var changed chan struct{}
	if m != nil {
		changed = m.changed
	}
	for !cond() {
		select {
		case <-changed:
		case <-tick.C:
		case <-deadline.C:
			t.Fatalf("not within %v: %s", d, what())
		}
	}
	return time.Since(start)
}

func describe(m proto.Message) string {
	if m == nil {
		return "<absent>"
	}
	return fmt.Sprintf("%v", m)
}
