package deployer_test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	"k8s.io/apimachinery/pkg/types"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/rest"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/cache"
	"sigs.k8s.io/controller-runtime/pkg/client"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"
	"sigs.k8s.io/yaml"

	"github.com/amesh-dev/amesh/controller/internal/deployer"
	"github.com/amesh-dev/amesh/controller/internal/kubetest"
)

// env is a real apiserver with the deployer running under leader
// election in a controller-runtime manager.
type env struct {
	t *testing.T
	c client.Client
}

const testImage = "registry.example/amesh/waypoint:test"

func scheme(t *testing.T) *runtime.Scheme {
	t.Helper()
	s := runtime.NewScheme()
	if err := clientgoscheme.AddToScheme(s); err != nil {
		t.Fatal(err)
	}
	if err := gwv1.Install(s); err != nil {
		t.Fatal(err)
	}
	return s
}

func startEnv(t *testing.T) *env {
	t.Helper()
	// Owner references that block the owner's deletion need the right to
	// update the owner's finalizers when this plugin runs (OpenShift).
	k := kubetest.Start(t, kubetest.Options{GarbageCollector: true, AdmissionPlugins: []string{"OwnerReferencesPermissionEnforcement"}})
	s := scheme(t)
	c, err := client.New(k.Config, client.Options{Scheme: s})
	if err != nil {
		t.Fatal(err)
	}
	e := &env{t: t, c: c}
	// The deployer runs as the controller's service account with the
	// permissions the manifests grant it.
	e.namespace("amesh-system")
	e.applyFile(filepath.Join("..", "..", "..", "manifests", "base", "rbac.yaml"), s)
	asController := rest.CopyConfig(k.Config)
	asController.Impersonate = rest.ImpersonationConfig{
		UserName: "system:serviceaccount:amesh-system:amesh-controller",
		Groups:   []string{"system:serviceaccounts", "system:serviceaccounts:amesh-system", "system:authenticated"},
	}
	mgr, err := ctrl.NewManager(asController, ctrl.Options{
		Scheme:                        s,
		Metrics:                       metricsserver.Options{BindAddress: "0"},
		HealthProbeBindAddress:        "0",
		LeaderElection:                true,
		LeaderElectionID:              "amesh-controller",
		LeaderElectionNamespace:       "amesh-system",
		LeaderElectionReleaseOnCancel: true,
		Cache: cache.Options{
			DefaultTransform: cache.TransformStripManagedFields(),
			ByObject:         deployer.CacheByObject(),
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	opts := deployer.DefaultOptions()
	opts.Image = testImage
	opts.BlockedRetry = time.Second
	if err := deployer.Setup(mgr, opts, zaptest.NewLogger(t, zaptest.Level(zap.WarnLevel))); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- mgr.Start(ctx) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("manager: %v", err)
			}
		case <-time.After(20 * time.Second):
			t.Error("manager did not stop within 20s")
		}
	})
	// The GatewayClass exactly as the manifests install it.
	raw, err := os.ReadFile(filepath.Join("..", "..", "..", "manifests", "base", "gatewayclass.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	var gc gwv1.GatewayClass
	if err := yaml.UnmarshalStrict(raw, &gc); err != nil {
		t.Fatalf("manifests/base/gatewayclass.yaml: %v", err)
	}
	e.create(&gc)
	return e
}

// applyFile creates every object of a multi-document YAML file.
func (e *env) applyFile(path string, s *runtime.Scheme) {
	e.t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		e.t.Fatal(err)
	}
	dec := serializer.NewCodecFactory(s).UniversalDeserializer()
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

func (e *env) get(ns, name string, o client.Object) error {
	return e.c.Get(context.Background(), types.NamespacedName{Namespace: ns, Name: name}, o)
}

// eventually re-checks cond until it returns nil or 15 s pass.
func (e *env) eventually(what string, cond func() error) {
	e.t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	var err error
	for time.Now().Before(deadline) {
		if err = cond(); err == nil {
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	e.t.Fatalf("%s: not within 15s: %v", what, err)
}

// conditionIs checks one condition's status and reason.
func conditionIs(conds []metav1.Condition, typ string, status metav1.ConditionStatus, reason string) error {
	c := meta.FindStatusCondition(conds, typ)
	switch {
	case c == nil:
		return fmt.Errorf("no %s condition in %v", typ, conds)
	case c.Status != status || c.Reason != reason:
		return fmt.Errorf("%s is %s/%s (%s), want %s/%s", typ, c.Status, c.Reason, c.Message, status, reason)
	}
	return nil
}

func (e *env) namespace(name string) {
	e.t.Helper()
	e.create(&corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name}})
}

// waypoint is a Gateway of the waypoint class with the mesh listener and
// extra listeners.
func waypoint(ns, name string, extra ...gwv1.Listener) *gwv1.Gateway {
	return &gwv1.Gateway{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name},
		Spec: gwv1.GatewaySpec{
			GatewayClassName: "amesh-waypoint",
			Listeners: append([]gwv1.Listener{{
				Name: "mesh", Port: 15008, Protocol: "HBONE",
			}}, extra...),
		},
	}
}

func (e *env) gateway(ns, name string) *gwv1.Gateway {
	e.t.Helper()
	var gw gwv1.Gateway
	if err := e.get(ns, name, &gw); err != nil {
		e.t.Fatal(err)
	}
	return &gw
}

// update re-reads o, applies mutate and writes it, retrying on conflicts.
func (e *env) update(o client.Object, mutate func()) {
	e.t.Helper()
	for range 10 {
		if err := e.get(o.GetNamespace(), o.GetName(), o); err != nil {
			e.t.Fatal(err)
		}
		mutate()
		err := e.c.Update(context.Background(), o)
		if err == nil {
			return
		}
		if !apierrors.IsConflict(err) {
			e.t.Fatalf("update %T %s: %v", o, o.GetName(), err)
		}
	}
	e.t.Fatalf("update %T %s: conflicts", o, o.GetName())
}
