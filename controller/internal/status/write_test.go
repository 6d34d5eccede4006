package status_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"sigs.k8s.io/controller-runtime/pkg/cache"
	"sigs.k8s.io/controller-runtime/pkg/client"

	securityv1alpha1 "github.com/amesh-dev/amesh/controller/apis/security/v1alpha1"
	"github.com/amesh-dev/amesh/controller/internal/kubetest"
	"github.com/amesh-dev/amesh/controller/internal/status"
	"github.com/amesh-dev/amesh/controller/internal/translate"
)

// TestWriteFromCache runs the Writer as the controller does, with a client
// that reads from an informer cache, against a real API server: it writes
// the statuses that differ and only those, and when every status is
// current it costs a few allocations a policy, not a copy of each policy:
// the controller calls it after every translation, for every policy.
func TestWriteFromCache(t *testing.T) {
	k := kubetest.Start(t, kubetest.Options{})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	scheme := runtime.NewScheme()
	if err := clientgoscheme.AddToScheme(scheme); err != nil {
		t.Fatal(err)
	}
	if err := securityv1alpha1.AddToScheme(scheme); err != nil {
		t.Fatal(err)
	}
	direct, err := client.New(k.Config, client.Options{Scheme: scheme})
	if err != nil {
		t.Fatal(err)
	}
	informers, err := cache.New(k.Config, cache.Options{Scheme: scheme})
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- informers.Start(ctx) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("cache: %v", err)
		}
	}()
	cached, err := client.New(k.Config, client.Options{Scheme: scheme, Cache: &client.CacheOptions{Reader: informers}})
	if err != nil {
		t.Fatal(err)
	}

	const n = 50
	if err := direct.Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "shop"}}); err != nil {
		t.Fatal(err)
	}
	var desired []translate.Status
	for i := range n {
		// Policies of some size: a copy of one costs many allocations.
		var rules []securityv1alpha1.Rule
		for r := range 10 {
			rules = append(rules, securityv1alpha1.Rule{
				From: []securityv1alpha1.RuleFrom{{Source: securityv1alpha1.Source{
					Principals: []string{fmt.Sprintf("cluster.local/ns/shop/sa/client-%d", r)},
					Namespaces: []string{"shop", "monitoring"},
				}}},
				To: []securityv1alpha1.RuleTo{{Operation: securityv1alpha1.Operation{Ports: []securityv1alpha1.Port{"8080"}}}},
			})
		}
		ap := &securityv1alpha1.AuthorizationPolicy{
			ObjectMeta: metav1.ObjectMeta{Namespace: "shop", Name: fmt.Sprintf("p-%d", i)},
			Spec: securityv1alpha1.AuthorizationPolicySpec{
				Selector: &securityv1alpha1.WorkloadSelector{MatchLabels: map[string]string{"app": fmt.Sprintf("app-%d", i)}},
				Rules:    rules,
			},
		}
		if err := direct.Create(ctx, ap); err != nil {
			t.Fatal(err)
		}
		desired = append(desired, translate.Status{
			Kind: translate.KindAuthorizationPolicy, Namespace: "shop", Name: ap.Name, Generation: ap.Generation,
			Conditions: []metav1.Condition{{
				Type: securityv1alpha1.ConditionZtunnelAccepted, Status: metav1.ConditionTrue,
				Reason: "Enforced", Message: "enforced by ztunnel", ObservedGeneration: ap.Generation,
			}},
		})
	}
	w := status.NewWriter(cached)
	// current waits until the cache holds every desired status.
	current := func(want []translate.Status) {
		t.Helper()
		deadline := time.Now().Add(10 * time.Second)
		for {
			var list securityv1alpha1.AuthorizationPolicyList
			if err := cached.List(ctx, &list); err != nil {
				t.Fatal(err)
			}
			msgs := map[string]string{}
			for _, ap := range list.Items {
				if len(ap.Status.Conditions) == 1 && ap.Status.ObservedGeneration == ap.Generation {
					msgs[ap.Name] = ap.Status.Conditions[0].Message
				}
			}
			ok := len(msgs) == len(want)
			for _, d := range want {
				ok = ok && msgs[d.Name] == d.Conditions[0].Message
			}
			if ok {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("the cache does not hold the statuses written: %v", msgs)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		var list securityv1alpha1.AuthorizationPolicyList
		if err := cached.List(ctx, &list); err != nil {
			t.Fatal(err)
		}
		if len(list.Items) == n {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the cache holds %d policies, want %d", len(list.Items), n)
		}
		time.Sleep(10 * time.Millisecond)
	}

	if patched, err := w.Write(ctx, desired); err != nil || patched != n {
		t.Fatalf("first write: patched %d (want %d), %v", patched, n, err)
	}
	current(desired)

	// Nothing to do: nothing written, and no copy of the policies.
	if patched, err := w.Write(ctx, desired); err != nil || patched != 0 {
		t.Fatalf("write of current statuses: patched %d, %v", patched, err)
	}
	allocs := testing.AllocsPerRun(5, func() {
		if _, err := w.Write(ctx, desired); err != nil {
			t.Fatal(err)
		}
	})
	perPolicy := allocs / n
	if perPolicy > 15 {
		t.Errorf("checking a current status costs %.0f allocations a policy; the policy is copied", perPolicy)
	}
	t.Logf("%.1f allocations a current policy", perPolicy)

	// One status changes: that one is written.
	changed := append([]translate.Status(nil), desired...)
	changed[7].Conditions = []metav1.Condition{{
		Type: securityv1alpha1.ConditionZtunnelAccepted, Status: metav1.ConditionFalse,
		Reason: "Invalid", Message: "no longer enforced", ObservedGeneration: changed[7].Generation,
	}}
	if patched, err := w.Write(ctx, changed); err != nil || patched != 1 {
		t.Fatalf("write of one changed status: patched %d, %v", patched, err)
	}
	var got securityv1alpha1.AuthorizationPolicy
	if err := direct.Get(ctx, client.ObjectKey{Namespace: "shop", Name: changed[7].Name}, &got); err != nil {
		t.Fatal(err)
	}
	if c := got.Status.Conditions; len(c) != 1 || c[0].Status != metav1.ConditionFalse || c[0].Message != "no longer enforced" {
		t.Fatalf("written status %+v", got.Status)
	}
	current(changed)
}
