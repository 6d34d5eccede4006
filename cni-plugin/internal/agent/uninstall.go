package agent

import (
	"context"
	"fmt"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"
)

// selfWatch follows the agent's own DaemonSet and its namespace while the
// agent runs, so that on SIGTERM the agent can tell an uninstall (the
// DaemonSet, or its namespace, is gone or being deleted: nobody will
// start another agent on this node) from a restart or a rolling update
// (the DaemonSet stays: the next agent takes over). Only an uninstall
// unchains the plugin: with the plugin chained and no agent, every new
// pod of the node would be refused; unchained during an upgrade, new pods
// would start unprotected.
//
// At shutdown the API server is asked first. It may no longer answer the
// agent: an uninstall deletes the agent's ServiceAccount and RBAC along
// with its DaemonSet, and the deletions race with the pod's SIGTERM. What
// the watch saw while its credentials were still good decides then: the
// DaemonSet's deletion (or its namespace's) reaches the watch before the
// garbage collector deletes the DaemonSet's pods.
type selfWatch struct {
	log             *zap.Logger
	client          kubernetes.Interface
	namespace, name string
	dsFactory       informers.SharedInformerFactory
	nsFactory       informers.SharedInformerFactory
	dsIdx, nsIdx    cache.Indexer

	seen     atomic.Bool // the DaemonSet was observed during this run
	deleted  atomic.Bool // ... and then its deletion
	nsGone   atomic.Bool // the namespace's deletion was observed
	dsSynced func() bool
}

func newSelfWatch(log *zap.Logger, client kubernetes.Interface, namespace, name string, resync time.Duration) *selfWatch {
	s := &selfWatch{log: log, client: client, namespace: namespace, name: name}
	s.dsFactory = informers.NewSharedInformerFactoryWithOptions(client, resync, informers.WithNamespace(namespace),
		informers.WithTweakListOptions(func(o *metav1.ListOptions) {
			// One object: RBAC grants list/watch for it by resourceName.
			o.FieldSelector = fields.OneTermEqualSelector("metadata.name", name).String()
		}))
	s.nsFactory = informers.NewSharedInformerFactoryWithOptions(client, resync,
		informers.WithTweakListOptions(func(o *metav1.ListOptions) {
			o.FieldSelector = fields.OneTermEqualSelector("metadata.name", namespace).String()
		}))
	dsInf := s.dsFactory.Apps().V1().DaemonSets().Informer()
	nsInf := s.nsFactory.Core().V1().Namespaces().Informer()
	s.dsIdx, s.nsIdx, s.dsSynced = dsInf.GetIndexer(), nsInf.GetIndexer(), dsInf.HasSynced
	_, _ = dsInf.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    s.dsEvent,
		UpdateFunc: func(_, o any) { s.dsEvent(o) },
		DeleteFunc: func(any) {
			s.deleted.Store(true)
			s.log.Info("this agent's DaemonSet was deleted", zap.String("daemonset", s.namespace+"/"+s.name))
		},
	})
	_, _ = nsInf.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    s.nsEvent,
		UpdateFunc: func(_, o any) { s.nsEvent(o) },
		DeleteFunc: func(any) { s.nsGone.Store(true) },
	})
	return s
}

func (s *selfWatch) dsEvent(o any) {
	ds, ok := o.(*appsv1.DaemonSet)
	if !ok {
		return
	}
	s.seen.Store(true)
	// A DaemonSet deleted and created again is in place.
	s.deleted.Store(ds.DeletionTimestamp != nil)
}

func (s *selfWatch) nsEvent(o any) {
	if ns, ok := o.(*corev1.Namespace); ok && ns.DeletionTimestamp != nil {
		s.nsGone.Store(true)
	}
}

// Run watches until ctx is done and returns after the informers stopped.
func (s *selfWatch) Run(ctx context.Context) error {
	s.dsFactory.Start(ctx.Done())
	s.nsFactory.Start(ctx.Done())
	if !cache.WaitForCacheSync(ctx.Done(), s.dsSynced) && ctx.Err() == nil {
		s.log.Warn("cannot watch this agent's DaemonSet")
	}
	<-ctx.Done()
	s.dsFactory.Shutdown()
	s.nsFactory.Shutdown()
	return nil
}

// decide tells whether the agent is being uninstalled, asking live (the
// API server) first and falling back on what the watch saw; reason says
// why, for the log.
func (s *selfWatch) decide(ctx context.Context, live kubernetes.Interface) (uninstall bool, reason string) {
	key := s.namespace + "/" + s.name
	ds, err := live.AppsV1().DaemonSets(s.namespace).Get(ctx, s.name, metav1.GetOptions{})
	switch {
	case apierrors.IsNotFound(err) && s.seen.Load():
		return true, "DaemonSet " + key + " is gone"
	case apierrors.IsNotFound(err):
		// Never seen during this run: a misnamed DaemonSet must not make
		// every restart an uninstall.
		return false, "DaemonSet " + key + " not found, and never seen by this agent: check -daemonset-name/-daemonset-namespace"
	case err == nil && ds.DeletionTimestamp != nil:
		return true, "DaemonSet " + key + " is being deleted"
	case err == nil:
		ns, nerr := live.CoreV1().Namespaces().Get(ctx, s.namespace, metav1.GetOptions{})
		if nerr == nil && ns.DeletionTimestamp != nil {
			return true, "namespace " + s.namespace + " is being deleted"
		}
		return false, "DaemonSet " + key + " is in place (restart or rolling update)"
	}
	// No answer: the watch decides.
	switch {
	case s.deleted.Load():
		return true, fmt.Sprintf("the watch saw DaemonSet %s deleted (API server: %v)", key, err)
	case s.nsGone.Load():
		return true, fmt.Sprintf("the watch saw namespace %s deleted (API server: %v)", s.namespace, err)
	}
	return false, fmt.Sprintf("cannot tell whether DaemonSet %s is being deleted (API server: %v); if it is, run amesh-cni-agent -uninstall on this node", key, err)
}
