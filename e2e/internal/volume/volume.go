// Package volume prepares a pod's volumes on its node as directories that
// the container runtime bind-mounts: emptyDir, hostPath, configMap, secret,
// downwardAPI and projected volumes (service-account tokens requested with
// TokenRequest, with audience, expiry and rotation). Content volumes are
// published atomically and refreshed on every Setup, like the kubelet's.
package volume

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"time"

	authv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"

	"github.com/amesh-dev/amesh/e2e/internal/downward"
)

// Mounted is a prepared volume: a directory on the node.
type Mounted struct {
	Path string
	// ReadOnly is forced for content volumes (configMap, secret, …).
	ReadOnly bool
}

// Manager prepares volumes under Dir (one subdirectory per pod UID).
type Manager struct {
	client kubernetes.Interface
	dir    string
	node   downward.Allocatable
	now    func() time.Time

	mu     sync.Mutex
	tokens map[string]token // pod UID/volume/path → token
}

type token struct {
	value     string
	refreshAt time.Time
}

// NewManager returns a manager writing below dir.
func NewManager(client kubernetes.Interface, dir string, node downward.Allocatable) *Manager {
	return &Manager{client: client, dir: dir, node: node, now: time.Now, tokens: map[string]token{}}
}

// PodDir is where the pod's volumes live.
func (m *Manager) PodDir(uid types.UID) string {
	return filepath.Join(m.dir, string(uid), "volumes")
}

// ErrUnsupported is returned for volume sources the local cluster lacks.
var ErrUnsupported = errors.New("unsupported volume source")

// Setup creates or refreshes every volume of pod.
func (m *Manager) Setup(ctx context.Context, pod *corev1.Pod) (map[string]Mounted, error) {
	out := make(map[string]Mounted, len(pod.Spec.Volumes))
	gid := -1
	if sc := pod.Spec.SecurityContext; sc != nil && sc.FSGroup != nil {
		gid = int(*sc.FSGroup)
	}
	for i := range pod.Spec.Volumes {
		v := &pod.Spec.Volumes[i]
		mv, err := m.setupOne(ctx, pod, v, gid)
		if err != nil {
			return nil, fmt.Errorf("volume %q: %w", v.Name, err)
		}
		out[v.Name] = mv
	}
	return out, nil
}

func (m *Manager) setupOne(ctx context.Context, pod *corev1.Pod, v *corev1.Volume, gid int) (Mounted, error) {
	dir := func(kind string) string { return filepath.Join(m.PodDir(pod.UID), kind, v.Name) }
	switch {
	case v.EmptyDir != nil:
		d := dir("empty-dir")
		if err := os.MkdirAll(d, 0o777); err != nil {
			return Mounted{}, err
		}
		if err := os.Chmod(d, 0o777); err != nil {
			return Mounted{}, err
		}
		if gid >= 0 {
			_ = os.Chown(d, -1, gid)
		}
		return Mounted{Path: d}, nil
	case v.HostPath != nil:
		p, err := hostPath(v.HostPath)
		return Mounted{Path: p}, err
	case v.ConfigMap != nil:
		pl, err := m.configMapPayload(ctx, pod.Namespace, &v.ConfigMap.LocalObjectReference, v.ConfigMap.Items, v.ConfigMap.Optional, mode(v.ConfigMap.DefaultMode))
		if err != nil {
			return Mounted{}, err
		}
		return m.publish(dir("configmap"), pl, gid)
	case v.Secret != nil:
		pl, err := m.secretPayload(ctx, pod.Namespace, v.Secret.SecretName, v.Secret.Items, v.Secret.Optional, mode(v.Secret.DefaultMode))
		if err != nil {
			return Mounted{}, err
		}
		return m.publish(dir("secret"), pl, gid)
	case v.DownwardAPI != nil:
		pl, err := m.downwardPayload(pod, v.DownwardAPI.Items, mode(v.DownwardAPI.DefaultMode))
		if err != nil {
			return Mounted{}, err
		}
		return m.publish(dir("downward-api"), pl, gid)
	case v.Projected != nil:
		pl, err := m.projectedPayload(ctx, pod, v, mode(v.Projected.DefaultMode))
		if err != nil {
			return Mounted{}, err
		}
		return m.publish(dir("projected"), pl, gid)
	}
	return Mounted{}, fmt.Errorf("%w (only emptyDir, hostPath, configMap, secret, downwardAPI and projected are supported)", ErrUnsupported)
}

func (m *Manager) publish(d string, pl Payload, gid int) (Mounted, error) {
	if _, err := writeAtomic(d, pl, gid); err != nil {
		return Mounted{}, err
	}
	return Mounted{Path: d, ReadOnly: true}, nil
}

func mode(p *int32) os.FileMode {
	if p == nil {
		return 0o644
	}
	return os.FileMode(*p) & 0o777
}

func itemMode(p *int32, def os.FileMode) os.FileMode {
	if p == nil {
		return def
	}
	return os.FileMode(*p) & 0o777
}

func hostPath(h *corev1.HostPathVolumeSource) (string, error) {
	p := filepath.Clean(h.Path)
	if !filepath.IsAbs(p) {
		return "", fmt.Errorf("hostPath %q is not absolute", h.Path)
	}
	t := corev1.HostPathUnset
	if h.Type != nil {
		t = *h.Type
	}
	st, err := os.Stat(p)
	exists := err == nil
	switch t {
	case corev1.HostPathUnset:
		return p, nil
	case corev1.HostPathDirectoryOrCreate:
		if !exists {
			return p, os.MkdirAll(p, 0o755)
		}
		if !st.IsDir() {
			return "", fmt.Errorf("hostPath %s exists and is not a directory", p)
		}
	case corev1.HostPathFileOrCreate:
		if !exists {
			if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
				return "", err
			}
			f, err := os.OpenFile(p, os.O_CREATE|os.O_RDONLY, 0o644)
			if err != nil {
				return "", err
			}
			return p, f.Close()
		}
		if st.IsDir() {
			return "", fmt.Errorf("hostPath %s exists and is a directory", p)
		}
	case corev1.HostPathDirectory:
		if !exists || !st.IsDir() {
			return "", fmt.Errorf("hostPath %s is not an existing directory", p)
		}
	case corev1.HostPathFile:
		if !exists || !st.Mode().IsRegular() {
			return "", fmt.Errorf("hostPath %s is not an existing file", p)
		}
	case corev1.HostPathSocket:
		if !exists || st.Mode()&os.ModeSocket == 0 {
			return "", fmt.Errorf("hostPath %s is not an existing socket", p)
		}
	case corev1.HostPathCharDev:
		if !exists || st.Mode()&os.ModeCharDevice == 0 {
			return "", fmt.Errorf("hostPath %s is not an existing character device", p)
		}
	case corev1.HostPathBlockDev:
		if !exists || st.Mode()&os.ModeDevice == 0 || st.Mode()&os.ModeCharDevice != 0 {
			return "", fmt.Errorf("hostPath %s is not an existing block device", p)
		}
	default:
		return "", fmt.Errorf("hostPath %s: unknown type %q", p, t)
	}
	return p, nil
}

func keysToPayload(data map[string][]byte, items []corev1.KeyToPath, optional bool, def os.FileMode, what string) (Payload, error) {
	pl := Payload{}
	if len(items) == 0 {
		for k, v := range data {
			pl[k] = FileContent{Data: v, Mode: def}
		}
		return pl, nil
	}
	for _, it := range items {
		v, ok := data[it.Key]
		if !ok {
			if optional {
				continue
			}
			return nil, fmt.Errorf("%s has no key %q", what, it.Key)
		}
		pl[it.Path] = FileContent{Data: v, Mode: itemMode(it.Mode, def)}
	}
	return pl, nil
}

func (m *Manager) configMapPayload(ctx context.Context, ns string, ref *corev1.LocalObjectReference, items []corev1.KeyToPath, optional *bool, def os.FileMode) (Payload, error) {
	opt := optional != nil && *optional
	cm, err := m.client.CoreV1().ConfigMaps(ns).Get(ctx, ref.Name, metav1.GetOptions{})
	if apierrors.IsNotFound(err) && opt {
		return Payload{}, nil
	}
	if err != nil {
		return nil, fmt.Errorf("get configmap %s/%s: %w", ns, ref.Name, err)
	}
	data := make(map[string][]byte, len(cm.Data)+len(cm.BinaryData))
	for k, v := range cm.Data {
		data[k] = []byte(v)
	}
	for k, v := range cm.BinaryData {
		data[k] = v
	}
	return keysToPayload(data, items, opt, def, "configmap "+ns+"/"+ref.Name)
}

func (m *Manager) secretPayload(ctx context.Context, ns, name string, items []corev1.KeyToPath, optional *bool, def os.FileMode) (Payload, error) {
	opt := optional != nil && *optional
	s, err := m.client.CoreV1().Secrets(ns).Get(ctx, name, metav1.GetOptions{})
	if apierrors.IsNotFound(err) && opt {
		return Payload{}, nil
	}
	if err != nil {
		return nil, fmt.Errorf("get secret %s/%s: %w", ns, name, err)
	}
	return keysToPayload(s.Data, items, opt, def, "secret "+ns+"/"+name)
}

func (m *Manager) downwardPayload(pod *corev1.Pod, items []corev1.DownwardAPIVolumeFile, def os.FileMode) (Payload, error) {
	pl := Payload{}
	for _, it := range items {
		var val string
		var err error
		switch {
		case it.FieldRef != nil:
			val, err = downward.FieldValue(pod, it.FieldRef.FieldPath)
		case it.ResourceFieldRef != nil:
			c := findContainer(pod, it.ResourceFieldRef.ContainerName)
			if c == nil {
				return nil, fmt.Errorf("downwardAPI %s: no container %q", it.Path, it.ResourceFieldRef.ContainerName)
			}
			val, err = downward.ResourceValue(c, it.ResourceFieldRef, m.node)
		default:
			err = errors.New("neither fieldRef nor resourceFieldRef")
		}
		if err != nil {
			return nil, fmt.Errorf("downwardAPI %s: %w", it.Path, err)
		}
		pl[it.Path] = FileContent{Data: []byte(val), Mode: itemMode(it.Mode, def)}
	}
	return pl, nil
}

func findContainer(pod *corev1.Pod, name string) *corev1.Container {
	for i := range pod.Spec.Containers {
		if name == "" || pod.Spec.Containers[i].Name == name {
			return &pod.Spec.Containers[i]
		}
	}
	for i := range pod.Spec.InitContainers {
		if pod.Spec.InitContainers[i].Name == name {
			return &pod.Spec.InitContainers[i]
		}
	}
	return nil
}

func (m *Manager) projectedPayload(ctx context.Context, pod *corev1.Pod, v *corev1.Volume, def os.FileMode) (Payload, error) {
	pl := Payload{}
	for i, src := range v.Projected.Sources {
		var part Payload
		var err error
		switch {
		case src.ServiceAccountToken != nil:
			part, err = m.tokenPayload(ctx, pod, v.Name, src.ServiceAccountToken, def)
		case src.ConfigMap != nil:
			part, err = m.configMapPayload(ctx, pod.Namespace, &src.ConfigMap.LocalObjectReference, src.ConfigMap.Items, src.ConfigMap.Optional, def)
		case src.Secret != nil:
			part, err = m.secretPayload(ctx, pod.Namespace, src.Secret.Name, src.Secret.Items, src.Secret.Optional, def)
		case src.DownwardAPI != nil:
			part, err = m.downwardPayload(pod, src.DownwardAPI.Items, def)
		default:
			err = fmt.Errorf("%w: projected source %d", ErrUnsupported, i)
		}
		if err != nil {
			return nil, err
		}
		for k, f := range part {
			pl[k] = f
		}
	}
	return pl, nil
}

// tokenPayload returns a bound service-account token for the pod, requested
// with TokenRequest and renewed once 80% of its lifetime has passed.
func (m *Manager) tokenPayload(ctx context.Context, pod *corev1.Pod, vol string, src *corev1.ServiceAccountTokenProjection, def os.FileMode) (Payload, error) {
	key := string(pod.UID) + "/" + vol + "/" + src.Path
	m.mu.Lock()
	t, ok := m.tokens[key]
	m.mu.Unlock()
	now := m.now()
	if !ok || !now.Before(t.refreshAt) {
		exp := int64(3600)
		if src.ExpirationSeconds != nil {
			exp = *src.ExpirationSeconds
		}
		req := &authv1.TokenRequest{Spec: authv1.TokenRequestSpec{
			ExpirationSeconds: &exp,
			BoundObjectRef:    &authv1.BoundObjectReference{Kind: "Pod", APIVersion: "v1", Name: pod.Name, UID: pod.UID},
		}}
		if src.Audience != "" {
			req.Spec.Audiences = []string{src.Audience}
		}
		sa := pod.Spec.ServiceAccountName
		if sa == "" {
			sa = "default"
		}
		resp, err := m.client.CoreV1().ServiceAccounts(pod.Namespace).CreateToken(ctx, sa, req, metav1.CreateOptions{})
		if err != nil {
			return nil, fmt.Errorf("request token for service account %s/%s: %w", pod.Namespace, sa, err)
		}
		t = token{value: resp.Status.Token, refreshAt: now.Add(time.Duration(exp) * time.Second * 8 / 10)}
		m.mu.Lock()
		m.tokens[key] = t
		m.mu.Unlock()
	}
	return Payload{src.Path: {Data: []byte(t.value), Mode: def}}, nil
}

// Cleanup removes the pod's volume directories (never hostPath contents)
// and forgets its tokens.
func (m *Manager) Cleanup(uid types.UID) error {
	m.mu.Lock()
	prefix := string(uid) + "/"
	for k := range m.tokens {
		if len(k) > len(prefix) && k[:len(prefix)] == prefix {
			delete(m.tokens, k)
		}
	}
	m.mu.Unlock()
	if err := os.RemoveAll(filepath.Join(m.dir, string(uid))); err != nil {
		return fmt.Errorf("remove volumes of pod %s: %w", uid, err)
	}
	return nil
}
