package node

import (
	"context"
	"fmt"
	"net/netip"
	"sort"
	"strconv"
	"strings"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/amesh-dev/amesh/e2e/internal/downward"
)

// expand replaces $(VAR) references with values from lookup, as Kubernetes
// does for env values, command and args: "$$" escapes a dollar, and
// references to undefined variables stay as written.
func expand(s string, lookup func(string) (string, bool)) string {
	if !strings.Contains(s, "$") {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] != '$' || i+1 >= len(s) {
			b.WriteByte(s[i])
			continue
		}
		switch s[i+1] {
		case '$':
			b.WriteByte('$')
			i++
		case '(':
			end := strings.IndexByte(s[i+2:], ')')
			if end < 0 {
				b.WriteString(s[i:])
				return b.String()
			}
			name := s[i+2 : i+2+end]
			if v, ok := lookup(name); ok {
				b.WriteString(v)
			} else {
				b.WriteString(s[i : i+3+end])
			}
			i += 2 + end
		default:
			b.WriteByte('$')
		}
	}
	return b.String()
}

// serviceEnv returns the Docker-links style variables of services, sorted.
func serviceEnv(services []*corev1.Service) []string {
	var out []string
	for _, s := range services {
		ip := s.Spec.ClusterIP
		if ip == "" || ip == corev1.ClusterIPNone || len(s.Spec.Ports) == 0 {
			continue
		}
		name := strings.ToUpper(strings.ReplaceAll(s.Name, "-", "_"))
		first := s.Spec.Ports[0]
		out = append(out,
			name+"_SERVICE_HOST="+ip,
			name+"_SERVICE_PORT="+strconv.Itoa(int(first.Port)))
		for _, p := range s.Spec.Ports {
			if p.Name != "" {
				out = append(out, name+"_SERVICE_PORT_"+strings.ToUpper(strings.ReplaceAll(p.Name, "-", "_"))+"="+strconv.Itoa(int(p.Port)))
			}
		}
		hp := func(p corev1.ServicePort) string {
			a, _ := netip.ParseAddr(ip)
			return strings.ToLower(string(p.Protocol)) + "://" + netip.AddrPortFrom(a, uint16(p.Port)).String()
		}
		out = append(out, name+"_PORT="+hp(first))
		for _, p := range s.Spec.Ports {
			proto := string(p.Protocol)
			if proto == "" {
				proto = "TCP"
				p.Protocol = corev1.ProtocolTCP
			}
			pre := name + "_PORT_" + strconv.Itoa(int(p.Port)) + "_" + strings.ToUpper(proto)
			out = append(out,
				pre+"="+hp(p),
				pre+"_PROTO="+strings.ToLower(proto),
				pre+"_PORT="+strconv.Itoa(int(p.Port)),
				pre+"_ADDR="+ip)
		}
	}
	return out
}

// envVar is one resolved environment variable.
type envVar struct{ name, value string }

// containerEnv resolves a container's environment: image env, service
// links, envFrom and env (in that order of precedence, later wins), with
// $(VAR) expansion of env values.
func (a *Agent) containerEnv(ctx context.Context, pod *corev1.Pod, c *corev1.Container, imageEnv []string) ([]string, error) {
	vars := []envVar{}
	idx := map[string]int{}
	set := func(k, v string) {
		if i, ok := idx[k]; ok {
			vars[i].value = v
			return
		}
		idx[k] = len(vars)
		vars = append(vars, envVar{k, v})
	}
	lookup := func(k string) (string, bool) {
		if i, ok := idx[k]; ok {
			return vars[i].value, true
		}
		return "", false
	}
	set("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
	for _, e := range imageEnv {
		k, v, _ := strings.Cut(e, "=")
		set(k, v)
	}
	set("HOSTNAME", podHostname(pod, a.cfg.NodeName))
	for _, e := range serviceEnv(a.servicesFor(pod)) {
		k, v, _ := strings.Cut(e, "=")
		set(k, v)
	}
	for _, from := range c.EnvFrom {
		data, err := a.envFromData(ctx, pod.Namespace, from)
		if err != nil {
			return nil, err
		}
		keys := make([]string, 0, len(data))
		for k := range data {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		for _, k := range keys {
			set(from.Prefix+k, data[k])
		}
	}
	for _, e := range c.Env {
		if e.ValueFrom == nil {
			set(e.Name, expand(e.Value, lookup))
			continue
		}
		v, ok, err := a.envValueFrom(ctx, pod, c, e.ValueFrom)
		if err != nil {
			return nil, fmt.Errorf("env %s: %w", e.Name, err)
		}
		if ok {
			set(e.Name, v)
		}
	}
	out := make([]string, len(vars))
	for i, v := range vars {
		out[i] = v.name + "=" + v.value
	}
	return out, nil
}

// servicesFor lists the services whose variables a pod gets.
func (a *Agent) servicesFor(pod *corev1.Pod) []*corev1.Service {
	var out []*corev1.Service
	links := pod.Spec.EnableServiceLinks == nil || *pod.Spec.EnableServiceLinks
	for _, s := range a.services.List() {
		switch {
		case s.Namespace == metav1.NamespaceDefault && s.Name == "kubernetes":
			out = append(out, s)
		case links && s.Namespace == pod.Namespace:
			out = append(out, s)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

func (a *Agent) envFromData(ctx context.Context, ns string, from corev1.EnvFromSource) (map[string]string, error) {
	switch {
	case from.ConfigMapRef != nil:
		cm, err := a.client.CoreV1().ConfigMaps(ns).Get(ctx, from.ConfigMapRef.Name, metav1.GetOptions{})
		if apierrors.IsNotFound(err) && from.ConfigMapRef.Optional != nil && *from.ConfigMapRef.Optional {
			return nil, nil
		}
		if err != nil {
			return nil, fmt.Errorf("envFrom configmap %s: %w", from.ConfigMapRef.Name, err)
		}
		return cm.Data, nil
	case from.SecretRef != nil:
		s, err := a.client.CoreV1().Secrets(ns).Get(ctx, from.SecretRef.Name, metav1.GetOptions{})
		if apierrors.IsNotFound(err) && from.SecretRef.Optional != nil && *from.SecretRef.Optional {
			return nil, nil
		}
		if err != nil {
			return nil, fmt.Errorf("envFrom secret %s: %w", from.SecretRef.Name, err)
		}
		out := make(map[string]string, len(s.Data))
		for k, v := range s.Data {
			out[k] = string(v)
		}
		return out, nil
	}
	return nil, nil
}

func (a *Agent) envValueFrom(ctx context.Context, pod *corev1.Pod, c *corev1.Container, from *corev1.EnvVarSource) (string, bool, error) {
	switch {
	case from.FieldRef != nil:
		v, err := downward.FieldValue(pod, from.FieldRef.FieldPath)
		return v, err == nil, err
	case from.ResourceFieldRef != nil:
		target := c
		if n := from.ResourceFieldRef.ContainerName; n != "" && n != c.Name {
			target = nil
			for i := range pod.Spec.Containers {
				if pod.Spec.Containers[i].Name == n {
					target = &pod.Spec.Containers[i]
				}
			}
			if target == nil {
				return "", false, fmt.Errorf("no container %q", n)
			}
		}
		v, err := downward.ResourceValue(target, from.ResourceFieldRef, a.allocatable())
		return v, err == nil, err
	case from.ConfigMapKeyRef != nil:
		r := from.ConfigMapKeyRef
		opt := r.Optional != nil && *r.Optional
		cm, err := a.client.CoreV1().ConfigMaps(pod.Namespace).Get(ctx, r.Name, metav1.GetOptions{})
		if apierrors.IsNotFound(err) && opt {
			return "", false, nil
		}
		if err != nil {
			return "", false, fmt.Errorf("configmap %s: %w", r.Name, err)
		}
		v, ok := cm.Data[r.Key]
		if !ok && !opt {
			return "", false, fmt.Errorf("configmap %s has no key %q", r.Name, r.Key)
		}
		return v, ok, nil
	case from.SecretKeyRef != nil:
		r := from.SecretKeyRef
		opt := r.Optional != nil && *r.Optional
		s, err := a.client.CoreV1().Secrets(pod.Namespace).Get(ctx, r.Name, metav1.GetOptions{})
		if apierrors.IsNotFound(err) && opt {
			return "", false, nil
		}
		if err != nil {
			return "", false, fmt.Errorf("secret %s: %w", r.Name, err)
		}
		v, ok := s.Data[r.Key]
		if !ok && !opt {
			return "", false, fmt.Errorf("secret %s has no key %q", r.Name, r.Key)
		}
		return string(v), ok, nil
	}
	return "", false, fmt.Errorf("unsupported valueFrom")
}

// podHostname is the pod's hostname (spec.hostname or its name; the node's
// name for host-network pods).
func podHostname(pod *corev1.Pod, nodeName string) string {
	if pod.Spec.HostNetwork {
		return nodeName
	}
	if pod.Spec.Hostname != "" {
		return pod.Spec.Hostname
	}
	if len(pod.Name) > 63 {
		return strings.TrimRight(pod.Name[:63], "-.")
	}
	return pod.Name
}

// resolvConf renders the pod's /etc/resolv.conf per its dnsPolicy.
func (a *Agent) resolvConf(pod *corev1.Pod, hostResolv []byte) []byte {
	policy := pod.Spec.DNSPolicy
	if policy == "" {
		policy = corev1.DNSClusterFirst
	}
	if policy == corev1.DNSClusterFirst && pod.Spec.HostNetwork {
		policy = corev1.DNSDefault
	}
	var servers, searches, options []string
	switch policy {
	case corev1.DNSClusterFirst, corev1.DNSClusterFirstWithHostNet:
		d := a.cfg.ClusterDomain
		servers = []string{a.cfg.ClusterDNS.String()}
		searches = []string{pod.Namespace + ".svc." + d, "svc." + d, d}
		options = []string{"ndots:5"}
	case corev1.DNSDefault:
		for _, l := range strings.Split(string(hostResolv), "\n") {
			f := strings.Fields(l)
			if len(f) < 2 {
				continue
			}
			switch f[0] {
			case "nameserver":
				servers = append(servers, f[1])
			case "search":
				searches = append(searches, f[1:]...)
			case "options":
				options = append(options, f[1:]...)
			}
		}
	}
	if dc := pod.Spec.DNSConfig; dc != nil {
		servers = append(servers, dc.Nameservers...)
		searches = append(searches, dc.Searches...)
		for _, o := range dc.Options {
			if o.Value != nil {
				options = append(options, o.Name+":"+*o.Value)
			} else {
				options = append(options, o.Name)
			}
		}
	}
	var b strings.Builder
	if len(searches) > 0 {
		b.WriteString("search " + strings.Join(searches, " ") + "\n")
	}
	for _, s := range servers {
		b.WriteString("nameserver " + s + "\n")
	}
	if len(options) > 0 {
		b.WriteString("options " + strings.Join(options, " ") + "\n")
	}
	return []byte(b.String())
}

// hostsFile renders the pod's /etc/hosts.
func (a *Agent) hostsFile(pod *corev1.Pod, ips []netip.Addr, hostHosts []byte) []byte {
	if pod.Spec.HostNetwork {
		return hostHosts
	}
	var b strings.Builder
	b.WriteString("# Kubernetes-managed hosts file.\n127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\nfe00::0\tip6-localnet\nfe00::0\tip6-mcastprefix\nfe00::1\tip6-allnodes\nfe00::2\tip6-allrouters\n")
	host := podHostname(pod, a.cfg.NodeName)
	names := host
	if pod.Spec.Subdomain != "" {
		names = host + "." + pod.Spec.Subdomain + "." + pod.Namespace + ".svc." + a.cfg.ClusterDomain + "\t" + host
	}
	for _, ip := range ips {
		b.WriteString(ip.String() + "\t" + names + "\n")
	}
	for _, ha := range pod.Spec.HostAliases {
		b.WriteString("\n# Entries added by HostAliases.\n" + ha.IP + "\t" + strings.Join(ha.Hostnames, "\t") + "\n")
	}
	return []byte(b.String())
}
