package agent

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"sigs.k8s.io/controller-runtime/pkg/envtest"
)

const testFinalizer = "amesh.dev/test-hold"

// daemonSet creates a DaemonSet like the agent's in namespace ns.
func daemonSet(t *testing.T, k8s kubernetes.Interface, ns, name string) *appsv1.DaemonSet {
	t.Helper()
	labels := map[string]string{"app": name}
	ds, err := k8s.AppsV1().DaemonSets(ns).Create(context.Background(), &appsv1.DaemonSet{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns},
		Spec: appsv1.DaemonSetSpec{
			Selector: &metav1.LabelSelector{MatchLabels: labels},
			Template: corev1.PodTemplateSpec{
				ObjectMeta: metav1.ObjectMeta{Labels: labels},
				Spec:       corev1.PodSpec{Containers: []corev1.Container{{Name: "agent", Image: "agent"}}},
			},
		},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return ds
}

// deleteHeld deletes a DaemonSet that carries a finalizer: it stays, with
// a deletion timestamp (as with foreground deletion).
func deleteHeld(t *testing.T, k8s kubernetes.Interface, ns, name string) {
	t.Helper()
	ctx := context.Background()
	patch, _ := json.Marshal(map[string]any{"metadata": map[string]any{"finalizers": []string{testFinalizer}}})
	if _, err := k8s.AppsV1().DaemonSets(ns).Patch(ctx, name, "application/merge-patch+json", patch, metav1.PatchOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := k8s.AppsV1().DaemonSets(ns).Delete(ctx, name, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
}

func release(t *testing.T, k8s kubernetes.Interface, ns, name string) {
	t.Helper()
	patch := []byte(`{"metadata":{"finalizers":null}}`)
	_, err := k8s.AppsV1().DaemonSets(ns).Patch(context.Background(), name, "application/merge-patch+json", patch, metav1.PatchOptions{})
	if err != nil && !apierrors.IsNotFound(err) {
		t.Fatal(err)
	}
}

// runSelf starts a selfWatch and stops it at the end of the test.
func runSelf(t *testing.T, k8s kubernetes.Interface, ns, name string) *selfWatch {
	t.Helper()
	s := newSelfWatch(zaptest.NewLogger(t), k8s, ns, name, 0)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Error(err)
		}
	})
	return s
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// deadAPI is a client of an API server that does not answer (the agent's
// credentials are gone, or the API server is away).
func deadAPI(t *testing.T) kubernetes.Interface {
	t.Helper()
	return kubernetes.NewForConfigOrDie(&rest.Config{Host: "https://" + freeAddr(t), Timeout: time.Second})
}

// TestUninstallDecision: on SIGTERM the agent unchains itself only when
// its DaemonSet (or the DaemonSet's namespace) is gone or being deleted;
// a restart or a rolling update leaves everything in place. When the API
// server no longer answers the agent (an uninstall deletes its
// ServiceAccount and RBAC too), what the watch saw decides.
func TestUninstallDecision(t *testing.T) {
	if skipReason != "" {
		t.Skip(skipReason)
	}
	ctx := context.Background()
	k8s := kubernetes.NewForConfigOrDie(restCfg)
	dead := deadAPI(t)
	newNS := func(prefix string) string {
		n, err := k8s.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{GenerateName: prefix + "-"}}, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		return n.Name
	}
	want := func(s *selfWatch, live kubernetes.Interface, uninstall bool) {
		t.Helper()
		got, reason := s.decide(ctx, live)
		if got != uninstall {
			t.Fatalf("decide = %v (%s), want %v", got, reason, uninstall)
		}
		t.Logf("decide = %v: %s", got, reason)
	}

	nsName := newNS("self")
	daemonSet(t, k8s, nsName, "agent")
	s := runSelf(t, k8s, nsName, "agent")
	waitFor(t, "the watch to see the DaemonSet", s.seen.Load)

	// A restart, a rolling update: the DaemonSet is in place.
	want(s, k8s, false)
	// The API server does not answer and nothing was seen: keep (the
	// node then refuses pods until an agent is back — fail closed).
	want(s, dead, false)

	// Being deleted (foreground deletion, finalizers).
	deleteHeld(t, k8s, nsName, "agent")
	want(s, k8s, true)
	waitFor(t, "the watch to see the deletion", s.deleted.Load)
	want(s, dead, true)

	// Gone.
	release(t, k8s, nsName, "agent")
	waitFor(t, "the DaemonSet to go", func() bool {
		_, err := k8s.AppsV1().DaemonSets(nsName).Get(ctx, "agent", metav1.GetOptions{})
		return apierrors.IsNotFound(err)
	})
	want(s, k8s, true)
	want(s, dead, true)

	// Created again (kubectl replace): in place again.
	daemonSet(t, k8s, nsName, "agent")
	waitFor(t, "the watch to see the new DaemonSet", func() bool { return !s.deleted.Load() })
	want(s, k8s, false)
	want(s, dead, false)

	// A misnamed DaemonSet was never seen: not found is no uninstall.
	misnamed := runSelf(t, k8s, nsName, "not-the-agent")
	want(misnamed, k8s, false)

	// The DaemonSet's namespace is being deleted (the namespace
	// controller deletes its pods before, or without, the DaemonSet).
	// envtest runs no namespace controller: the namespace stays
	// terminating.
	ns2 := newNS("self-ns")
	daemonSet(t, k8s, ns2, "agent")
	s2 := runSelf(t, k8s, ns2, "agent")
	waitFor(t, "the watch to see the DaemonSet", s2.seen.Load)
	want(s2, k8s, false)
	if err := k8s.CoreV1().Namespaces().Delete(ctx, ns2, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	want(s2, k8s, true)
	waitFor(t, "the watch to see the namespace terminating", s2.nsGone.Load)
	want(s2, dead, true)
}

// manifestRBAC returns the node agent's RBAC objects from the base
// manifests.
func manifestRBAC(t *testing.T) (roles []rbacv1.Role, bindings []rbacv1.RoleBinding, croles []rbacv1.ClusterRole, cbindings []rbacv1.ClusterRoleBinding) {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("..", "..", "..", "manifests", "base", "rbac.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	dec := utilyaml.NewYAMLOrJSONDecoder(bytes.NewReader(b), 4096)
	for {
		var raw json.RawMessage
		if err := dec.Decode(&raw); errors.Is(err, io.EOF) {
			break
		} else if err != nil {
			t.Fatal(err)
		}
		var meta struct {
			Kind     string            `json:"kind"`
			Metadata metav1.ObjectMeta `json:"metadata"`
		}
		if err := json.Unmarshal(raw, &meta); err != nil || meta.Metadata.Name != "amesh-cni-agent" {
			continue
		}
		var into any
		switch meta.Kind {
		case "Role":
			roles = append(roles, rbacv1.Role{})
			into = &roles[len(roles)-1]
		case "RoleBinding":
			bindings = append(bindings, rbacv1.RoleBinding{})
			into = &bindings[len(bindings)-1]
		case "ClusterRole":
			croles = append(croles, rbacv1.ClusterRole{})
			into = &croles[len(croles)-1]
		case "ClusterRoleBinding":
			cbindings = append(cbindings, rbacv1.ClusterRoleBinding{})
			into = &cbindings[len(cbindings)-1]
		default:
			continue
		}
		if err := json.Unmarshal(raw, into); err != nil {
			t.Fatal(err)
		}
	}
	return roles, bindings, croles, cbindings
}

// TestUninstallRBAC: the manifests' RBAC lets the node agent's service
// account get, list and watch its own DaemonSet (list/watch by name,
// which RBAC grants through resourceNames) and nothing else of the kind.
func TestUninstallRBAC(t *testing.T) {
	if skipReason != "" {
		t.Skip(skipReason)
	}
	ctx := context.Background()
	k8s := kubernetes.NewForConfigOrDie(restCfg)
	const sys = "amesh-system"
	if _, err := k8s.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: sys}}, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		t.Fatal(err)
	}
	roles, bindings, croles, cbindings := manifestRBAC(t)
	if len(roles) != 1 || len(bindings) != 1 {
		t.Fatalf("manifests: %d Roles and %d RoleBindings named amesh-cni-agent, want one each", len(roles), len(bindings))
	}
	bg := context.Background()
	for i := range roles {
		if _, err := k8s.RbacV1().Roles(sys).Create(ctx, &roles[i], metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = k8s.RbacV1().Roles(sys).Delete(bg, roles[i].Name, metav1.DeleteOptions{}) })
		if _, err := k8s.RbacV1().RoleBindings(sys).Create(ctx, &bindings[i], metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = k8s.RbacV1().RoleBindings(sys).Delete(bg, bindings[i].Name, metav1.DeleteOptions{}) })
	}
	for i := range croles {
		if _, err := k8s.RbacV1().ClusterRoles().Create(ctx, &croles[i], metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = k8s.RbacV1().ClusterRoles().Delete(bg, croles[i].Name, metav1.DeleteOptions{}) })
		if _, err := k8s.RbacV1().ClusterRoleBindings().Create(ctx, &cbindings[i], metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = k8s.RbacV1().ClusterRoleBindings().Delete(bg, cbindings[i].Name, metav1.DeleteOptions{}) })
	}
	user, err := testEnv.AddUser(envtest.User{Name: "system:serviceaccount:" + sys + ":amesh-cni-agent",
		Groups: []string{"system:serviceaccounts", "system:serviceaccounts:" + sys, "system:authenticated"}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	agent := kubernetes.NewForConfigOrDie(user.Config())

	daemonSet(t, k8s, sys, "amesh-cni-agent")
	other := daemonSet(t, k8s, sys, "something-else")
	t.Cleanup(func() {
		release(t, k8s, sys, "amesh-cni-agent")
		for _, n := range []string{"amesh-cni-agent", other.Name} {
			_ = k8s.AppsV1().DaemonSets(sys).Delete(bg, n, metav1.DeleteOptions{})
		}
	})
	s := runSelf(t, agent, sys, "amesh-cni-agent")
	waitFor(t, "the agent's watch (list/watch by name) to see its DaemonSet", s.seen.Load)
	if got, reason := s.decide(ctx, agent); got {
		t.Fatalf("decide = true (%s), want false", reason)
	}
	if _, err := agent.AppsV1().DaemonSets(sys).Get(ctx, other.Name, metav1.GetOptions{}); !apierrors.IsForbidden(err) {
		t.Errorf("the agent may get another DaemonSet: %v", err)
	}
	if _, err := agent.AppsV1().DaemonSets(sys).List(ctx, metav1.ListOptions{}); !apierrors.IsForbidden(err) {
		t.Errorf("the agent may list every DaemonSet: %v", err)
	}
	if _, err := agent.AppsV1().DaemonSets("default").Get(ctx, "amesh-cni-agent", metav1.GetOptions{}); !apierrors.IsForbidden(err) {
		t.Errorf("the agent may get DaemonSets outside %s: %v", sys, err)
	}
	deleteHeld(t, k8s, sys, "amesh-cni-agent")
	if got, reason := s.decide(ctx, agent); !got {
		t.Fatalf("decide after deletion = false (%s), want true", reason)
	}
	waitFor(t, "the watch to see the deletion", s.deleted.Load)
}

// conflistHasAmesh reports whether the harness's conflist chains amesh-cni.
func (h *harness) conflistHasAmesh() bool {
	h.t.Helper()
	b, err := os.ReadFile(filepath.Join(h.confDir, "10-podnet.conflist"))
	if err != nil {
		h.t.Fatal(err)
	}
	var l struct {
		Plugins []struct {
			Type string `json:"type"`
		} `json:"plugins"`
	}
	if err := json.Unmarshal(b, &l); err != nil {
		h.t.Fatal(err)
	}
	return slices.ContainsFunc(l.Plugins, func(p struct {
		Type string `json:"type"`
	}) bool {
		return p.Type == "amesh-cni"
	})
}

// TestUninstallOnStop: the agent stops (SIGTERM). With its DaemonSet in
// place (a restart) the plugin stays chained, installed, with its state
// file; with its DaemonSet being deleted (an uninstall) all three go, so
// that the node's pods no longer call a plugin without an agent.
func TestUninstallOnStop(t *testing.T) {
	h := newHarness(t)
	k8s := h.k8s
	nsName := h.namespace("agent-ds", false)
	daemonSet(t, k8s, nsName, "amesh-cni-agent")
	h.cfg.DaemonSetName, h.cfg.DaemonSetNamespace = "amesh-cni-agent", nsName
	plugin, state := filepath.Join(h.binDir, "amesh-cni"), h.cfg.StateFile
	exists := func(p string) bool { _, err := os.Stat(p); return err == nil }

	h.startAgent()
	h.stopAgent()
	if !h.conflistHasAmesh() || !exists(plugin) || !exists(state) {
		t.Fatalf("after a restart: chained %v, plugin %v, state file %v; want all kept", h.conflistHasAmesh(), exists(plugin), exists(state))
	}

	h.startAgent()
	deleteHeld(t, k8s, nsName, "amesh-cni-agent")
	t.Cleanup(func() { release(t, k8s, nsName, "amesh-cni-agent") })
	h.stopAgent()
	if h.conflistHasAmesh() || exists(plugin) || exists(state) {
		t.Fatalf("after an uninstall: chained %v, plugin %v, state file %v; want all gone", h.conflistHasAmesh(), exists(plugin), exists(state))
	}
	// Pods of the node start without amesh-cni.
	p := h.pod(nsName, fmt.Sprintf("after-%d", time.Now().UnixNano()%1e6), nil)
	if err := h.add(p); err != nil {
		t.Fatalf("ADD after the uninstall: %v", err)
	}
}
