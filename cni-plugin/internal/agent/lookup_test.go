package agent

import (
	"context"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"
	listersv1 "k8s.io/client-go/listers/core/v1"
	"k8s.io/client-go/tools/cache"
)

// TestLookupBypassesStaleCache: the informer cache still holds an earlier
// pod of the same name (a StatefulSet pod deleted and recreated while the
// watch lags) when the new pod's CNI ADD arrives. Deciding from that
// object would enrol the new sandbox under the old pod's UID, service
// account and labels (a second ztunnel entry on the same namespace, a
// certificate for the wrong identity). The lookup must answer with the
// pod whose UID the runtime passed, from the API server.
func TestLookupBypassesStaleCache(t *testing.T) {
	if skipReason != "" {
		t.Skip(skipReason)
	}
	ctx := context.Background()
	k8s := kubernetes.NewForConfigOrDie(restCfg)
	nsObj, err := k8s.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{GenerateName: "lookup-"}}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = k8s.CoreV1().Namespaces().Delete(context.Background(), nsObj.Name, metav1.DeleteOptions{}) })
	live, err := k8s.CoreV1().Pods(nsObj.Name).Create(ctx, &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "web-0", Namespace: nsObj.Name, Annotations: map[string]string{annotationMirror: "static-uid"}},
		Spec:       corev1.PodSpec{NodeName: nodeName, ServiceAccountName: "new-sa", Containers: []corev1.Container{{Name: "app", Image: "app"}}},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	stale := live.DeepCopy()
	stale.UID = types.UID("0ld0ld00-0000-0000-0000-000000000000")
	stale.Spec.ServiceAccountName = "old-sa"
	stale.Annotations = nil

	pods := cache.NewIndexer(cache.MetaNamespaceKeyFunc, cache.Indexers{cache.NamespaceIndex: cache.MetaNamespaceIndexFunc})
	if err := pods.Add(stale); err != nil {
		t.Fatal(err)
	}
	nss := cache.NewIndexer(cache.MetaNamespaceKeyFunc, cache.Indexers{})
	if err := nss.Add(nsObj); err != nil {
		t.Fatal(err)
	}
	w := &Watcher{client: k8s, pods: listersv1.NewPodLister(pods), nss: listersv1.NewNamespaceLister(nss)}

	for _, tc := range []struct {
		name, uid string
		want      types.UID // "" = no pod
	}{
		{"uid of the live pod", string(live.UID), live.UID},
		{"uid of no existing pod", "dead0000-0000-0000-0000-000000000000", ""},
		{"static pod uid, answered by its mirror", "static-uid", live.UID},
		{"uid unknown: the cache answers", "", stale.UID},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p, n, err := w.lookup(ctx, nsObj.Name, "web-0", tc.uid)
			if err != nil {
				t.Fatal(err)
			}
			if n == nil || n.Name != nsObj.Name {
				t.Errorf("namespace = %v", n)
			}
			var got types.UID
			if p != nil {
				got = p.UID
			}
			if got != tc.want {
				t.Errorf("pod UID = %q, want %q", got, tc.want)
			}
		})
	}
}
