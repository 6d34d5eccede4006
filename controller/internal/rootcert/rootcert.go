// Package rootcert publishes the mesh root certificates as the ConfigMap
// amesh-root-cert (key root-cert.pem) in every namespace that needs it, so
// that workloads and tools can verify mesh certificates.
package rootcert

import (
	"context"
	"errors"
	"fmt"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/amesh-dev/amesh/controller/internal/label"
)

// Key is the ConfigMap data key holding the PEM roots.
const Key = "root-cert.pem"

// Publisher creates and updates the root ConfigMaps.
type Publisher struct {
	c    client.Client
	name string
}

// NewPublisher returns a Publisher writing ConfigMaps named name (default
// amesh-root-cert) through c.
func NewPublisher(c client.Client, name string) *Publisher {
	if name == "" {
		name = label.RootCertConfigMap
	}
	return &Publisher{c: c, name: name}
}

// managedBy marks the ConfigMaps the Publisher creates: only those are
// ever removed.
const managedBy = "amesh-controller"

// Sync makes the ConfigMap in each namespace hold exactly roots, and
// removes the ConfigMaps it created in any other namespace (one that is no
// longer enrolled and holds no waypoint); a ConfigMap of that name that it
// did not create is left alone. It returns how many ConfigMaps it wrote
// and removed, and the errors met (a namespace being deleted refuses new
// objects; the others are still written).
func (p *Publisher) Sync(ctx context.Context, namespaces []string, roots string) (written, removed int, err error) {
	var errs []error
	want := make(map[string]bool, len(namespaces))
	for _, ns := range namespaces {
		want[ns] = true
		var cm corev1.ConfigMap
		key := types.NamespacedName{Namespace: ns, Name: p.name}
		err := p.c.Get(ctx, key, &cm)
		switch {
		case apierrors.IsNotFound(err):
			cm = corev1.ConfigMap{
				ObjectMeta: metav1.ObjectMeta{
					Namespace: ns,
					Name:      p.name,
					Labels:    map[string]string{labelManagedBy: managedBy},
				},
				Data: map[string]string{Key: roots},
			}
			if err := p.c.Create(ctx, &cm); err != nil && !apierrors.IsAlreadyExists(err) {
				errs = append(errs, fmt.Errorf("rootcert: create %s: %w", key, err))
				continue
			}
			written++
		case err != nil:
			errs = append(errs, fmt.Errorf("rootcert: get %s: %w", key, err))
		case cm.Data[Key] != roots:
			base := cm.DeepCopy()
			if cm.Data == nil {
				cm.Data = map[string]string{}
			}
			cm.Data[Key] = roots
			if err := p.c.Patch(ctx, &cm, client.MergeFromWithOptions(base, client.MergeFromWithOptimisticLock{})); err != nil {
				errs = append(errs, fmt.Errorf("rootcert: update %s: %w", key, err))
				continue
			}
			written++
		}
	}
	var list corev1.ConfigMapList
	if err := p.c.List(ctx, &list, client.MatchingLabels{labelManagedBy: managedBy}); err != nil {
		errs = append(errs, fmt.Errorf("rootcert: list ConfigMaps: %w", err))
		return written, removed, errors.Join(errs...)
	}
	for i := range list.Items {
		cm := &list.Items[i]
		if cm.Name != p.name || want[cm.Namespace] || cm.DeletionTimestamp != nil {
			continue
		}
		// Only the very object listed: not one re-created meanwhile.
		uid, rv := cm.UID, cm.ResourceVersion
		err := p.c.Delete(ctx, cm, client.Preconditions{UID: &uid, ResourceVersion: &rv})
		switch {
		case apierrors.IsNotFound(err):
		case err != nil:
			errs = append(errs, fmt.Errorf("rootcert: remove %s/%s: %w", cm.Namespace, cm.Name, err))
		default:
			removed++
		}
	}
	return written, removed, errors.Join(errs...)
}

// labelManagedBy is the label naming who manages an object.
const labelManagedBy = "app.kubernetes.io/managed-by"
