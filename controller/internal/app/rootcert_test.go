package app_test

import (
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/util/retry"
)

// TestRootCertRepaired: the leader repairs a root certificate ConfigMap
// that someone deletes or edits within seconds, with nothing else changing
// in the cluster (it watches them), and leaves it alone otherwise.
func TestRootCertRepaired(t *testing.T) {
	e := startEnv(t, nil)
	ctx := t.Context()
	e.create(&corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "shop", Labels: map[string]string{
		"amesh.dev/dataplane-mode": "ambient",
	}}})
	var sec corev1.Secret
	e.get("amesh-system", "amesh-ca", &sec)
	want := string(sec.Data["ca.crt"])
	get := func(ns string) (*corev1.ConfigMap, error) {
		var cm corev1.ConfigMap
		err := e.c.Get(ctx, types.NamespacedName{Namespace: ns, Name: "amesh-root-cert"}, &cm)
		return &cm, err
	}
	current := func(ns string, what string, within time.Duration) {
		t.Helper()
		start := time.Now()
		ok := false
		for time.Since(start) < within {
			if cm, err := get(ns); err == nil && cm.Data["root-cert.pem"] == want {
				ok = true
				break
			}
			time.Sleep(50 * time.Millisecond)
		}
		if !ok {
			cm, err := get(ns)
			t.Fatalf("%s: the root ConfigMap of %s is not current after %v: %v %v", what, ns, within, cm.Data, err)
		}
		t.Logf("%s: root ConfigMap of %s current after %v", what, ns, time.Since(start).Round(time.Millisecond))
	}
	for _, ns := range []string{"shop", "amesh-system"} {
		current(ns, "published", 20*time.Second)
	}

	// Deleted: re-created.
	cm, err := get("shop")
	if err != nil {
		t.Fatal(err)
	}
	if err := e.c.Delete(ctx, cm); err != nil {
		t.Fatal(err)
	}
	current("shop", "deleted", 5*time.Second)

	// Tampered with (another root, a key removed): restored.
	for _, tamper := range []func(*corev1.ConfigMap){
		func(cm *corev1.ConfigMap) {
			cm.Data["root-cert.pem"] = "-----BEGIN CERTIFICATE-----\nMIIBevil\n-----END CERTIFICATE-----\n"
		},
		func(cm *corev1.ConfigMap) { delete(cm.Data, "root-cert.pem") },
	} {
		err := retry.RetryOnConflict(retry.DefaultRetry, func() error {
			cm, err := get("amesh-system")
			if err != nil {
				return err
			}
			tamper(cm)
			return e.c.Update(ctx, cm)
		})
		if err != nil {
			t.Fatal(err)
		}
		current("amesh-system", "tampered", 5*time.Second)
	}

	// A ConfigMap of that name in a namespace that needs none is not the
	// controller's: left alone.
	e.create(&corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "byhand"}})
	e.create(&corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Namespace: "byhand", Name: "amesh-root-cert"},
		Data: map[string]string{"root-cert.pem": "the operator's"}})
	current("shop", "after an unrelated ConfigMap", time.Second)
	if cm, err := get("byhand"); err != nil || cm.Data["root-cert.pem"] != "the operator's" {
		t.Errorf("the operator's ConfigMap: %v %v", cm.Data, err)
	}
	if _, err := get("default"); !apierrors.IsNotFound(err) {
		t.Errorf("a root ConfigMap in namespace default: %v", err)
	}
}
