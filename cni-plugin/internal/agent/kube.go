package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	listersv1 "k8s.io/client-go/listers/core/v1"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/util/workqueue"
)

// Watcher keeps the node's enrolment in line with Kubernetes: it watches
// the namespaces and this node's pods, enrols and unenrols pods and writes
// the redirection annotation.
type Watcher struct {
	log      *zap.Logger
	client   kubernetes.Interface
	node     *Node
	nodeName string
	exclude  []string
	resync   time.Duration

	factory   informers.SharedInformerFactory
	nsFactory informers.SharedInformerFactory
	pods      listersv1.PodLister
	podIdx    cache.Indexer
	nss       listersv1.NamespaceLister
	queue     workqueue.TypedRateLimitingInterface[string]
	synced    atomic.Bool
	// initialized is closed after the first reconciliation of every pod.
	initialized chan struct{}
}

// NewWatcher allocates a Watcher.
func NewWatcher(log *zap.Logger, client kubernetes.Interface, node *Node, nodeName string, exclude []string, resync time.Duration) *Watcher {
	w := &Watcher{log: log, client: client, node: node, nodeName: nodeName, exclude: exclude,
		resync: resync, initialized: make(chan struct{})}
	w.factory = informers.NewSharedInformerFactoryWithOptions(client, resync,
		informers.WithTweakListOptions(func(o *metav1.ListOptions) {
			o.FieldSelector = fields.OneTermEqualSelector("spec.nodeName", nodeName).String()
		}))
	w.nsFactory = informers.NewSharedInformerFactory(client, resync)
	podInf := w.factory.Core().V1().Pods()
	nsInf := w.nsFactory.Core().V1().Namespaces()
	w.pods, w.podIdx = podInf.Lister(), podInf.Informer().GetIndexer()
	w.nss = nsInf.Lister()
	w.queue = workqueue.NewTypedRateLimitingQueueWithConfig(
		workqueue.NewTypedItemExponentialFailureRateLimiter[string](200*time.Millisecond, 30*time.Second),
		workqueue.TypedRateLimitingQueueConfig[string]{Name: "pods"})

	_, _ = podInf.Informer().AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    w.enqueuePod,
		UpdateFunc: func(_, o any) { w.enqueuePod(o) },
		DeleteFunc: w.enqueuePod,
	})
	_, _ = nsInf.Informer().AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    w.namespaceChanged,
		UpdateFunc: func(_, o any) { w.namespaceChanged(o) },
		DeleteFunc: w.namespaceChanged,
	})
	return w
}

func (w *Watcher) enqueuePod(o any) {
	if key, err := cache.DeletionHandlingMetaNamespaceKeyFunc(o); err == nil {
		w.queue.Add(key)
	}
}

func (w *Watcher) namespaceChanged(o any) {
	if d, ok := o.(cache.DeletedFinalStateUnknown); ok {
		o = d.Obj
	}
	ns, ok := o.(*corev1.Namespace)
	if !ok {
		return
	}
	objs, _ := w.podIdx.ByIndex(cache.NamespaceIndex, ns.Name)
	for _, p := range objs {
		w.enqueuePod(p)
	}
}

// Initialized is closed once every pod of the node has been reconciled
// after the caches synced.
func (w *Watcher) Initialized() <-chan struct{} { return w.initialized }

// Synced reports whether the caches are in sync.
func (w *Watcher) Synced() bool { return w.synced.Load() }

// Run starts the informers and the worker; it returns after they stop.
func (w *Watcher) Run(ctx context.Context) error {
	defer w.queue.ShutDown()
	w.factory.Start(ctx.Done())
	w.nsFactory.Start(ctx.Done())
	defer w.factory.Shutdown()
	defer w.nsFactory.Shutdown()
	for typ, ok := range w.factory.WaitForCacheSync(ctx.Done()) {
		if !ok {
			return fmt.Errorf("agent: cache of %v did not sync: %w", typ, ctx.Err())
		}
	}
	for typ, ok := range w.nsFactory.WaitForCacheSync(ctx.Done()) {
		if !ok {
			return fmt.Errorf("agent: cache of %v did not sync: %w", typ, ctx.Err())
		}
	}
	w.synced.Store(true)
	w.log.Info("kubernetes caches synced", zap.String("node", w.nodeName))

	// Initial pass, before ztunnel is served: every pod of the node is
	// brought in line (rules installed or removed), so that ztunnel's first
	// snapshot already holds every enrolled pod. No ztunnel can be
	// connected yet: the enrolled pods are adopted, not handed off, and
	// the snapshot's answers confirm them (Node.SnapshotResult), so a
	// restart neither repeats adds nor flips enabled pods to pending.
	all, err := w.pods.List(labels.Everything())
	if err != nil {
		return err
	}
	for _, p := range all {
		key := p.Namespace + "/" + p.Name
		if retry, err := w.reconcile(ctx, key, true); err != nil || retry {
			w.queue.AddRateLimited(key)
		}
	}
	close(w.initialized)
	w.log.Info("initial reconciliation done", zap.Int("pods", len(all)))

	done := make(chan struct{})
	go func() {
		defer close(done)
		for w.work(ctx) {
		}
	}()
	<-ctx.Done()
	w.queue.ShutDown()
	<-done
	return nil
}

func (w *Watcher) work(ctx context.Context) bool {
	key, quit := w.queue.Get()
	if quit {
		return false
	}
	defer w.queue.Done(key)
	retry, err := w.reconcile(ctx, key, false)
	switch {
	case err != nil:
		w.log.Warn("reconcile failed; retrying", zap.String("key", key), zap.Error(err))
		w.queue.AddRateLimited(key)
	case retry:
		w.queue.AddRateLimited(key)
	default:
		w.queue.Forget(key)
	}
	return true
}

// podInfo builds the enrolment view of a pod; ips override the status IPs
// (the CNI ADD knows them before the status does).
func podInfo(p *corev1.Pod, ips []netip.Addr) PodInfo {
	if len(ips) == 0 {
		for _, s := range p.Status.PodIPs {
			if a, err := netip.ParseAddr(s.IP); err == nil {
				ips = append(ips, a.Unmap())
			}
		}
		if len(ips) == 0 && p.Status.PodIP != "" {
			if a, err := netip.ParseAddr(p.Status.PodIP); err == nil {
				ips = append(ips, a.Unmap())
			}
		}
	}
	sa := p.Spec.ServiceAccountName
	if sa == "" {
		sa = "default"
	}
	return PodInfo{UID: string(p.UID), Name: p.Name, Namespace: p.Namespace, ServiceAccount: sa, IPs: ips, ProbePorts: ProbePorts(p)}
}

// terminal reports whether a pod's containers are over for good (phase
// Succeeded or Failed). A deletion timestamp alone is not the end: the pod
// runs on through its grace period, serving and opening connections, and
// stays in the mesh until it is over, its sandbox's CNI DEL arrives or
// the pod object is gone.
func terminal(p *corev1.Pod) bool {
	return p.Status.Phase == corev1.PodSucceeded || p.Status.Phase == corev1.PodFailed
}

// reconcile brings one pod in line; retry asks for a later retry without
// an error (e.g. pending on ztunnel). initial marks the first pass after
// the agent started (enrolled pods are adopted: see Run).
func (w *Watcher) reconcile(ctx context.Context, key string, initial bool) (retry bool, err error) {
	ns, name, err := cache.SplitMetaNamespaceKey(key)
	if err != nil {
		return false, nil
	}
	p, err := w.pods.Pods(ns).Get(name)
	if apierrors.IsNotFound(err) {
		// The pod object is gone. Normally its sandbox's CNI DEL came
		// first; when it did not (a forced deletion, whose containers may
		// still run), the pod leaves the mesh the way an unlabelled one
		// does: its connections through ztunnel are drained, never let
		// out in clear text. A DEL arriving meanwhile removes the rules.
		var errs []error
		for uid, info := range w.node.Enrolled() {
			if info.Namespace == ns && info.Name == name {
				errs = append(errs, w.node.Gone(ctx, uid))
			}
		}
		return false, errors.Join(errs...)
	}
	if err != nil {
		return false, err
	}
	nsObj, _ := w.nss.Get(ns)
	uid := string(p.UID)
	want := ShouldEnroll(p, nsObj, w.exclude) && !terminal(p)
	if !want {
		if w.node.Status(uid) != StatusNone {
			if err := w.node.Unenroll(ctx, uid); err != nil {
				return false, err
			}
		} else if _, had := p.Annotations[AnnotationRedirection]; had && !terminal(p) {
			// Enrolled by an earlier run of the agent: its rules may still
			// be in the pod's netns.
			if err := w.node.Release(ctx, podInfo(p, nil)); err != nil {
				return false, err
			}
		}
		return false, w.annotate(ctx, p, StatusNone)
	}
	info := podInfo(p, nil)
	if len(info.IPs) == 0 {
		// No IP in the status yet: the CNI ADD enrols the pod (or a later
		// status update does); report what the ADD did.
		if st := w.node.Status(uid); st != StatusNone {
			return false, w.annotate(ctx, p, st)
		}
		return false, nil
	}
	if initial || w.node.AwaitingSnapshot(uid) {
		// First pass after a restart, or adopted then and no ztunnel
		// snapshot has taken it yet: the snapshot hands it over.
		st, err := w.node.Adopt(ctx, info)
		if err == nil && st == StatusPending && p.Annotations[AnnotationRedirection] == string(StatusEnabled) {
			// Enabled before the restart, and ztunnel still serves it:
			// the snapshot confirms it (or, refused, sends it back here).
			return false, nil
		}
		if err != nil {
			w.log.Info("pod not enrolled yet", zap.String("pod", key), zap.String("status", string(st)), zap.Error(err))
			return true, w.annotate(ctx, p, st)
		}
		return false, w.annotate(ctx, p, st)
	}
	st, eerr := w.node.Enroll(ctx, info)
	if err := w.annotate(ctx, p, st); err != nil {
		return false, errors.Join(eerr, err)
	}
	if eerr != nil {
		w.log.Info("pod not fully enrolled yet", zap.String("pod", key), zap.String("status", string(st)), zap.Error(eerr))
		return true, nil
	}
	return false, nil
}

// annotate sets (or, for StatusNone, removes) the redirection annotation.
func (w *Watcher) annotate(ctx context.Context, p *corev1.Pod, st Status) error {
	cur, has := p.Annotations[AnnotationRedirection]
	if (st == StatusNone && !has) || (st != StatusNone && has && cur == string(st)) {
		return nil
	}
	var val any
	if st != StatusNone {
		val = string(st)
	}
	patch, _ := json.Marshal(map[string]any{"metadata": map[string]any{
		"annotations": map[string]any{AnnotationRedirection: val},
		// the UID precondition keeps a recreated pod of the same name safe
		"uid": p.UID,
	}})
	_, err := w.client.CoreV1().Pods(p.Namespace).Patch(ctx, p.Name, types.MergePatchType, patch, metav1.PatchOptions{})
	if apierrors.IsNotFound(err) || apierrors.IsConflict(err) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("annotate %s/%s: %w", p.Namespace, p.Name, err)
	}
	return nil
}

// annotationMirror is set by the kubelet on the mirror of a static pod, to
// the static pod's UID (which the runtime passes as K8S_POD_UID).
const annotationMirror = "kubernetes.io/config.mirror"

// isPod reports whether p is the pod with the given UID (any pod when uid
// is unknown), or the mirror of that static pod.
func isPod(p *corev1.Pod, uid string) bool {
	return uid == "" || string(p.UID) == uid || p.Annotations[annotationMirror] == uid
}

// Enqueue asks for a pod to be reconciled (after a CNI ADD).
func (w *Watcher) Enqueue(namespace, name string) { w.queue.Add(namespace + "/" + name) }

// Retry asks for a pod to be reconciled again after the backoff of its
// earlier failures (a ztunnel refused it).
func (w *Watcher) Retry(namespace, name string) { w.queue.AddRateLimited(namespace + "/" + name) }

// lookup returns a pod and its namespace, from the caches or, when the
// cache does not have them yet, from the API server. uid, when known (the
// CNI request's K8S_POD_UID), must match: a cache that still holds an
// earlier pod of the same name (a StatefulSet pod recreated, the watch
// lagging behind) is bypassed, and a pod of another UID is no answer.
func (w *Watcher) lookup(ctx context.Context, namespace, name, uid string) (*corev1.Pod, *corev1.Namespace, error) {
	p, err := w.pods.Pods(namespace).Get(name)
	if err != nil || !isPod(p, uid) {
		p, err = w.client.CoreV1().Pods(namespace).Get(ctx, name, metav1.GetOptions{})
		switch {
		case apierrors.IsNotFound(err):
			p = nil
		case err != nil:
			return nil, nil, fmt.Errorf("get pod %s/%s: %w", namespace, name, err)
		case !isPod(p, uid):
			p = nil
		}
	}
	ns, err := w.nss.Get(namespace)
	if err != nil {
		ns, err = w.client.CoreV1().Namespaces().Get(ctx, namespace, metav1.GetOptions{})
		if apierrors.IsNotFound(err) {
			ns = nil
		} else if err != nil {
			return nil, nil, fmt.Errorf("get namespace %s: %w", namespace, err)
		}
	}
	return p, ns, nil
}
