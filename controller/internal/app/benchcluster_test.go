package app_test

import (
	"context"
	"fmt"
	"maps"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	k8sdisc "k8s.io/api/discovery/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/controller-runtime/pkg/client"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"

	pb "github.com/amesh-dev/amesh/api/discovery/v1"
	"github.com/amesh-dev/amesh/controller/apis/security/v1alpha1"
	"github.com/amesh-dev/amesh/controller/internal/label"
	"github.com/amesh-dev/amesh/controller/internal/translate"
)

// benchSize is the shape of the cluster BenchmarkController builds.
type benchSize struct {
	pods, services int
	// namespaces are enrolled; the first waypoints of them hold a
	// waypoint Gateway "waypoint" that their Services are bound to (by
	// the namespace's use-waypoint label).
	namespaces, waypoints int
	// nodes each run a ztunnel, which subscribes.
	nodes int
}

func (s benchSize) name() string {
	return fmt.Sprintf("pods=%d/services=%d/subscribers=%d", s.pods, s.services, s.nodes+s.waypoints)
}

// benchCluster is what BenchmarkController created, and what every
// subscriber must end up holding.
type benchCluster struct {
	size benchSize
	// pods are the application pods, by index (see benchPodName).
	pods []*corev1.Pod
	// ztunnels are the ztunnel pods, one a node.
	ztunnels []*corev1.Pod
	// expect maps a discovery type to the names every subscriber of the
	// type must hold after the full push; waypointExpect adds, per
	// waypoint Gateway "<ns>/<name>", what only that waypoint sees.
	expect         map[string][]string
	waypointExpect map[string]map[string][]string
}

func benchNamespace(i int) string { return fmt.Sprintf("team-%02d", i) }

// serviceNamespace is the namespace of Service s.
func (s benchSize) serviceNamespace(svc int) string { return benchNamespace(svc % s.namespaces) }

func benchNode(i int) string { return fmt.Sprintf("node-%03d", i) }

// podIP is the IP of application pod p (10.1.0.0/16 onwards).
func podIP(p int) string { return fmt.Sprintf("10.%d.%d.%d", 1+p/65536, (p/256)%256, p%256) }

// nodeIP is the IP of node n, which host-network pods share.
func nodeIP(n int) string { return fmt.Sprintf("172.18.%d.%d", n/250, n%250+1) }

// parallel runs fn(0..n-1) on workers goroutines and returns the first
// error (the others stop taking work).
func parallel(n, workers int, fn func(i int) error) error {
	var (
		next  atomic.Int64
		once  sync.Once
		first error
		stop  atomic.Bool
		wg    sync.WaitGroup
	)
	for range min(workers, n) {
		wg.Go(func() {
			for !stop.Load() {
				i := int(next.Add(1) - 1)
				if i >= n {
					return
				}
				if err := fn(i); err != nil {
					once.Do(func() { first = err })
					stop.Store(true)
					return
				}
			}
		})
	}
	wg.Wait()
	return first
}

// benchWorkers is how many requests the benchmark has in flight while it
// fills the cluster.
const benchWorkers = 32

// buildCluster creates the nodes, the ztunnel pods and the mesh: enrolled
// namespaces, Services with their EndpointSlices (the endpointslice
// controller does not run in envtest), selector-less Services with manual
// slices, running pods spread over the nodes, HTTPRoutes on the Services
// of waypoint namespaces, an L4 AuthorizationPolicy per Service, a DENY
// policy per namespace, an L7 policy per waypoint and a mesh-wide STRICT
// PeerAuthentication. The waypoint Gateways are created too; their pods
// need the deployer's Deployments (runWaypointPods).
func buildCluster(ctx context.Context, c client.Client, size benchSize) (*benchCluster, error) {
	bc := &benchCluster{size: size, pods: make([]*corev1.Pod, size.pods), ztunnels: make([]*corev1.Pod, size.nodes)}
	create := func(o client.Object) error {
		if err := c.Create(ctx, o); err != nil {
			return fmt.Errorf("create %T %s/%s: %w", o, o.GetNamespace(), o.GetName(), err)
		}
		return nil
	}
	// Nodes and their ztunnels (host network: the node's IP).
	if err := parallel(size.nodes, benchWorkers, func(n int) error {
		if err := create(&corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: benchNode(n), Labels: map[string]string{
			"kubernetes.io/hostname": benchNode(n), "kubernetes.io/os": "linux",
		}}}); err != nil {
			return err
		}
		p := ztunnelPod(n)
		if err := createRunning(ctx, c, p, nodeIP(n), nodeIP(n)); err != nil {
			return err
		}
		bc.ztunnels[n] = p
		return nil
	}); err != nil {
		return nil, err
	}
	if err := create(&v1alpha1.PeerAuthentication{
		ObjectMeta: metav1.ObjectMeta{Namespace: label.SystemNamespace, Name: "default"},
		Spec:       v1alpha1.PeerAuthenticationSpec{Mtls: &v1alpha1.PeerAuthenticationMutualTLS{Mode: v1alpha1.MTLSStrict}},
	}); err != nil {
		return nil, err
	}

	var authz []string // "<ns>/<name>" of the policies ztunnel enforces
	if err := parallel(size.namespaces, benchWorkers, func(n int) error {
		ns := benchNamespace(n)
		labels := map[string]string{label.DataplaneMode: label.DataplaneModeAmbient}
		if n < size.waypoints {
			labels[label.UseWaypoint] = "waypoint"
		}
		if err := create(&corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns, Labels: labels}}); err != nil {
			return err
		}
		if n < size.waypoints {
			if err := create(&gwv1.Gateway{
				ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "waypoint"},
				Spec: gwv1.GatewaySpec{
					GatewayClassName: label.WaypointClass,
					Listeners:        []gwv1.Listener{{Name: "mesh", Port: 15008, Protocol: "HBONE"}},
				},
			}); err != nil {
				return err
			}
			// L7 policy on the waypoint (ztunnel does not see it).
			if err := create(&v1alpha1.AuthorizationPolicy{
				ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "waypoint-l7"},
				Spec: v1alpha1.AuthorizationPolicySpec{
					TargetRefs: []v1alpha1.PolicyTargetReference{{Group: gwv1.GroupName, Kind: "Gateway", Name: "waypoint"}},
					Rules: []v1alpha1.Rule{{
						From: []v1alpha1.RuleFrom{{Source: v1alpha1.Source{Namespaces: []string{ns}}}},
						To:   []v1alpha1.RuleTo{{Operation: v1alpha1.Operation{Methods: []string{"GET", "POST"}, Paths: []string{"/api/*"}}}},
					}},
				},
			}); err != nil {
				return err
			}
		}
		// A namespace-wide DENY, and a database outside the cluster
		// behind a selector-less Service.
		if err := create(&v1alpha1.AuthorizationPolicy{
			ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "deny-blocked"},
			Spec: v1alpha1.AuthorizationPolicySpec{
				Action: v1alpha1.ActionDeny,
				Rules:  []v1alpha1.Rule{{From: []v1alpha1.RuleFrom{{Source: v1alpha1.Source{IPBlocks: []string{"203.0.113.0/24"}}}}}},
			},
		}); err != nil {
			return err
		}
		if err := create(&corev1.Service{
			ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "external-db"},
			Spec:       corev1.ServiceSpec{Ports: []corev1.ServicePort{{Name: "tcp", Port: 5432, TargetPort: intstr.FromInt32(5432)}}},
		}); err != nil {
			return err
		}
		var eps []k8sdisc.Endpoint
		for i := range 2 {
			eps = append(eps, k8sdisc.Endpoint{
				Addresses:  []string{fmt.Sprintf("192.168.%d.%d", n, 10+i)},
				Conditions: k8sdisc.EndpointConditions{Ready: ptr.To(true)},
			})
		}
		return create(&k8sdisc.EndpointSlice{
			ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "external-db-1", Labels: map[string]string{
				k8sdisc.LabelServiceName: "external-db", k8sdisc.LabelManagedBy: "staff",
			}},
			AddressType: k8sdisc.AddressTypeIPv4,
			Endpoints:   eps,
			Ports:       []k8sdisc.EndpointPort{{Name: ptr.To("tcp"), Port: ptr.To[int32](5432), Protocol: ptr.To(corev1.ProtocolTCP)}},
		})
	}); err != nil {
		return nil, err
	}
	for n := range size.namespaces {
		authz = append(authz, benchNamespace(n)+"/deny-blocked")
	}

	// Services with their L4 policies.
	if err := parallel(size.services, benchWorkers, func(s int) error {
		ns, app := size.serviceNamespace(s), fmt.Sprintf("app-%d", s)
		if err := create(&corev1.Service{
			ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: app, Labels: map[string]string{"app": app}},
			Spec: corev1.ServiceSpec{
				Selector: map[string]string{"app": app},
				Ports: []corev1.ServicePort{
					{Name: "http", Port: 80, TargetPort: intstr.FromString("http"), AppProtocol: ptr.To("http")},
					{Name: "grpc", Port: 9090, TargetPort: intstr.FromString("grpc"), AppProtocol: ptr.To("kubernetes.io/h2c")},
				},
			},
		}); err != nil {
			return err
		}
		return create(&v1alpha1.AuthorizationPolicy{
			ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: app},
			Spec: v1alpha1.AuthorizationPolicySpec{
				Selector: &v1alpha1.WorkloadSelector{MatchLabels: map[string]string{"app": app}},
				Rules: []v1alpha1.Rule{{
					From: []v1alpha1.RuleFrom{{Source: v1alpha1.Source{
						Principals: []string{"cluster.local/ns/" + ns + "/sa/frontend", "cluster.local/ns/" + ns + "/sa/waypoint"},
					}}, {Source: v1alpha1.Source{Namespaces: []string{"monitoring"}}}},
					To: []v1alpha1.RuleTo{{Operation: v1alpha1.Operation{Ports: []v1alpha1.Port{"8080", "9090"}}}},
				}},
			},
		})
	}); err != nil {
		return nil, err
	}
	for s := range size.services {
		authz = append(authz, size.serviceNamespace(s)+fmt.Sprintf("/app-%d", s))
	}

	// Running pods: created, then reported running as the kubelet would.
	if err := parallel(size.pods, benchWorkers, func(p int) error {
		pod := appPod(size, p)
		if err := createRunning(ctx, c, pod, podIP(p), nodeIP(p%size.nodes)); err != nil {
			return err
		}
		bc.pods[p] = pod
		return nil
	}); err != nil {
		return nil, err
	}

	// One EndpointSlice per Service, as the endpointslice controller
	// writes them, and canary HTTPRoutes on every fifth Service of the
	// waypoint namespaces.
	byService := make([][]*corev1.Pod, size.services)
	for p, pod := range bc.pods {
		byService[p%size.services] = append(byService[p%size.services], pod)
	}
	if err := parallel(size.services, benchWorkers, func(s int) error {
		if err := create(endpointSlice(size, s, byService[s])); err != nil {
			return err
		}
		if n := s % size.namespaces; n >= size.waypoints || (s/size.namespaces)%5 != 0 || s+size.namespaces >= size.services {
			return nil
		}
		return create(canaryRoute(size, s))
	}); err != nil {
		return nil, err
	}

	// What every subscriber must hold.
	var workloads, services []string
	for _, p := range bc.pods {
		workloads = append(workloads, string(p.UID))
	}
	for n := range size.namespaces {
		ns := benchNamespace(n)
		services = append(services, ns+"/external-db."+ns+".svc.cluster.local")
		for i := range 2 {
			workloads = append(workloads, fmt.Sprintf("Kubernetes/%s/endpoint/192.168.%d.%d", ns, n, 10+i))
		}
	}
	for s := range size.services {
		ns := size.serviceNamespace(s)
		services = append(services, fmt.Sprintf("%s/app-%d.%s.svc.cluster.local", ns, s, ns))
	}
	bc.expect = map[string][]string{
		pb.WorkloadType:      workloads,
		pb.ServiceType:       services,
		pb.AuthorizationType: authz,
		pb.TrustBundleType:   {"cluster.local"},
	}
	bc.waypointExpect = map[string]map[string][]string{}
	for n := range size.waypoints {
		ns := benchNamespace(n)
		var ws []string
		for _, s := range services {
			if s[:len(ns)+1] == ns+"/" {
				ws = append(ws, s)
			}
		}
		bc.waypointExpect[ns+"/waypoint"] = map[string][]string{
			pb.WaypointServiceType: ws,
			pb.WaypointGatewayType: {ns + "/waypoint"},
		}
	}
	return bc, nil
}

// createRunning creates p and reports it running and ready with ip on a
// node of hostIP, as the kubelet would.
func createRunning(ctx context.Context, c client.Client, p *corev1.Pod, ip, hostIP string) error {
	if err := c.Create(ctx, p); err != nil {
		return fmt.Errorf("create pod %s/%s: %w", p.Namespace, p.Name, err)
	}
	started := metav1.NewTime(time.Now().Add(-time.Hour).Truncate(time.Second))
	cond := func(t corev1.PodConditionType) corev1.PodCondition {
		return corev1.PodCondition{Type: t, Status: corev1.ConditionTrue, LastTransitionTime: started}
	}
	// The API server sets the QoS class at creation.
	qos := p.Status.QOSClass
	p.Status = corev1.PodStatus{
		Phase: corev1.PodRunning,
		Conditions: []corev1.PodCondition{
			cond("PodReadyToStartContainers"), cond(corev1.PodInitialized), cond(corev1.PodReady),
			cond(corev1.ContainersReady), cond(corev1.PodScheduled),
		},
		HostIP:    hostIP,
		HostIPs:   []corev1.HostIP{{IP: hostIP}},
		PodIP:     ip,
		PodIPs:    []corev1.PodIP{{IP: ip}},
		StartTime: &started,
		QOSClass:  qos,
	}
	for _, ct := range p.Spec.Containers {
		p.Status.ContainerStatuses = append(p.Status.ContainerStatuses, corev1.ContainerStatus{
			Name:         ct.Name,
			Ready:        true,
			Started:      ptr.To(true),
			Image:        ct.Image,
			ImageID:      ct.Image + "@sha256:6c3c624b58dbbcd3c0dd82b4c53f04194d1247c6eebdaab7c610cf7d66709b3b",
			ContainerID:  "containerd://" + fmt.Sprintf("%064x", len(p.Name)*7919+len(ip)),
			State:        corev1.ContainerState{Running: &corev1.ContainerStateRunning{StartedAt: started}},
			RestartCount: 0,
		})
	}
	if err := c.Status().Update(ctx, p); err != nil {
		return fmt.Errorf("pod status %s/%s: %w", p.Namespace, p.Name, err)
	}
	return nil
}

// appPod is application pod p: a Deployment's pod, with what the API
// server and admission add to a real one (the service account token
// volume, default tolerations), so that the caches hold objects of a
// realistic size.
func appPod(size benchSize, p int) *corev1.Pod {
	s := p % size.services
	app := fmt.Sprintf("app-%d", s)
	rs := app + "-7d9f8c6b5"
	isController := true
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{
			Namespace: size.serviceNamespace(s),
			Name:      fmt.Sprintf("%s-%05d", rs, p),
			Labels:    map[string]string{"app": app, "version": "v1", "pod-template-hash": "7d9f8c6b5"},
			Annotations: map[string]string{
				label.Redirection:                   label.RedirectionEnabled,
				"prometheus.io/scrape":              "true",
				"prometheus.io/port":                "9102",
				"kubectl.kubernetes.io/restartedAt": "2025-01-01T00:00:00Z",
			},
			OwnerReferences: []metav1.OwnerReference{{
				APIVersion: "apps/v1", Kind: "ReplicaSet", Name: rs,
				UID: "3f6e1c1e-8b1a-4a53-9b8e-5d8e0c6f2a10", Controller: &isController, BlockOwnerDeletion: &isController,
			}},
		},
		Spec: corev1.PodSpec{
			NodeName:           benchNode(p % size.nodes),
			ServiceAccountName: app,
			Containers: []corev1.Container{{
				Name:  "app",
				Image: "registry.example/team/" + app + ":1.4.2",
				Args:  []string{"--listen=:8080", "--grpc-listen=:9090", "--log-format=json"},
				Ports: []corev1.ContainerPort{
					{Name: "http", ContainerPort: 8080, Protocol: corev1.ProtocolTCP},
					{Name: "grpc", ContainerPort: 9090, Protocol: corev1.ProtocolTCP},
					{Name: "metrics", ContainerPort: 9102, Protocol: corev1.ProtocolTCP},
				},
				Env: []corev1.EnvVar{
					{Name: "POD_NAME", ValueFrom: &corev1.EnvVarSource{FieldRef: &corev1.ObjectFieldSelector{FieldPath: "metadata.name"}}},
					{Name: "POD_NAMESPACE", ValueFrom: &corev1.EnvVarSource{FieldRef: &corev1.ObjectFieldSelector{FieldPath: "metadata.namespace"}}},
					{Name: "LOG_LEVEL", Value: "info"},
					{Name: "UPSTREAM", Value: "http://app-" + fmt.Sprint((s+1)%size.services) + ":80"},
				},
				Resources: corev1.ResourceRequirements{
					Requests: corev1.ResourceList{corev1.ResourceCPU: resource.MustParse("100m"), corev1.ResourceMemory: resource.MustParse("128Mi")},
					Limits:   corev1.ResourceList{corev1.ResourceMemory: resource.MustParse("256Mi")},
				},
				ReadinessProbe: &corev1.Probe{
					ProbeHandler:  corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{Path: "/healthz", Port: intstr.FromString("http")}},
					PeriodSeconds: 5,
				},
				LivenessProbe: &corev1.Probe{
					ProbeHandler:        corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{Path: "/livez", Port: intstr.FromString("http")}},
					InitialDelaySeconds: 10,
				},
				VolumeMounts: []corev1.VolumeMount{{Name: "kube-api-access", MountPath: "/var/run/secrets/kubernetes.io/serviceaccount", ReadOnly: true}},
				SecurityContext: &corev1.SecurityContext{
					AllowPrivilegeEscalation: ptr.To(false), RunAsNonRoot: ptr.To(true),
					Capabilities: &corev1.Capabilities{Drop: []corev1.Capability{"ALL"}},
				},
			}},
			Volumes: []corev1.Volume{{Name: "kube-api-access", VolumeSource: corev1.VolumeSource{Projected: &corev1.ProjectedVolumeSource{
				Sources: []corev1.VolumeProjection{
					{ServiceAccountToken: &corev1.ServiceAccountTokenProjection{Path: "token", ExpirationSeconds: ptr.To[int64](3607)}},
					{ConfigMap: &corev1.ConfigMapProjection{LocalObjectReference: corev1.LocalObjectReference{Name: "kube-root-ca.crt"},
						Items: []corev1.KeyToPath{{Key: "ca.crt", Path: "ca.crt"}}}},
					{DownwardAPI: &corev1.DownwardAPIProjection{Items: []corev1.DownwardAPIVolumeFile{
						{Path: "namespace", FieldRef: &corev1.ObjectFieldSelector{FieldPath: "metadata.namespace"}},
					}}},
				},
			}}}},
			Tolerations: []corev1.Toleration{
				{Key: "node.kubernetes.io/not-ready", Operator: corev1.TolerationOpExists, Effect: corev1.TaintEffectNoExecute, TolerationSeconds: ptr.To[int64](300)},
				{Key: "node.kubernetes.io/unreachable", Operator: corev1.TolerationOpExists, Effect: corev1.TaintEffectNoExecute, TolerationSeconds: ptr.To[int64](300)},
			},
		},
	}
}

// ztunnelPod is the ztunnel of node n, as its DaemonSet runs it.
func ztunnelPod(n int) *corev1.Pod {
	isController := true
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{
			Namespace: label.SystemNamespace,
			Name:      fmt.Sprintf("ztunnel-%05d", n),
			Labels:    map[string]string{"app.kubernetes.io/name": "ztunnel", "app.kubernetes.io/part-of": "amesh"},
			OwnerReferences: []metav1.OwnerReference{{
				APIVersion: "apps/v1", Kind: "DaemonSet", Name: "ztunnel",
				UID: "0c0a7c1e-1b1a-4a53-9b8e-5d8e0c6f2a11", Controller: &isController,
			}},
		},
		Spec: corev1.PodSpec{
			NodeName:           benchNode(n),
			ServiceAccountName: "ztunnel",
			HostNetwork:        true,
			Containers:         []corev1.Container{{Name: "ztunnel", Image: "amesh/ztunnel:dev"}},
		},
	}
}

// endpointSlice is Service s's slice with its ready pods.
func endpointSlice(size benchSize, s int, pods []*corev1.Pod) *k8sdisc.EndpointSlice {
	ns, app := size.serviceNamespace(s), fmt.Sprintf("app-%d", s)
	es := &k8sdisc.EndpointSlice{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: app + "-x7k2p", Labels: map[string]string{
			k8sdisc.LabelServiceName: app, k8sdisc.LabelManagedBy: "endpointslice-controller.k8s.io",
		}},
		AddressType: k8sdisc.AddressTypeIPv4,
		Ports: []k8sdisc.EndpointPort{
			{Name: ptr.To("http"), Port: ptr.To[int32](8080), Protocol: ptr.To(corev1.ProtocolTCP), AppProtocol: ptr.To("http")},
			{Name: ptr.To("grpc"), Port: ptr.To[int32](9090), Protocol: ptr.To(corev1.ProtocolTCP), AppProtocol: ptr.To("kubernetes.io/h2c")},
		},
	}
	for _, p := range pods {
		es.Endpoints = append(es.Endpoints, k8sdisc.Endpoint{
			Addresses:  []string{p.Status.PodIP},
			Conditions: k8sdisc.EndpointConditions{Ready: ptr.To(true), Serving: ptr.To(true), Terminating: ptr.To(false)},
			NodeName:   ptr.To(p.Spec.NodeName),
			TargetRef:  &corev1.ObjectReference{Kind: "Pod", Namespace: p.Namespace, Name: p.Name, UID: p.UID},
		})
	}
	return es
}

// canaryRoute sends a fifth of Service s's /api traffic to the next
// Service of its namespace, with a timeout and retries.
func canaryRoute(size benchSize, s int) *gwv1.HTTPRoute {
	ns, app, canary := size.serviceNamespace(s), fmt.Sprintf("app-%d", s), fmt.Sprintf("app-%d", s+size.namespaces)
	backend := func(name string, weight int32) gwv1.HTTPBackendRef {
		return gwv1.HTTPBackendRef{BackendRef: gwv1.BackendRef{
			BackendObjectReference: gwv1.BackendObjectReference{Name: gwv1.ObjectName(name), Port: ptr.To[gwv1.PortNumber](80)},
			Weight:                 ptr.To(weight),
		}}
	}
	return &gwv1.HTTPRoute{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: app},
		Spec: gwv1.HTTPRouteSpec{
			CommonRouteSpec: gwv1.CommonRouteSpec{ParentRefs: []gwv1.ParentReference{{
				Group: ptr.To(gwv1.Group("")), Kind: ptr.To(gwv1.Kind("Service")), Name: gwv1.ObjectName(app), Port: ptr.To[gwv1.PortNumber](80),
			}}},
			Rules: []gwv1.HTTPRouteRule{
				{
					Matches:     []gwv1.HTTPRouteMatch{{Path: &gwv1.HTTPPathMatch{Type: ptr.To(gwv1.PathMatchPathPrefix), Value: ptr.To("/api")}}},
					BackendRefs: []gwv1.HTTPBackendRef{backend(app, 80), backend(canary, 20)},
					Timeouts:    &gwv1.HTTPRouteTimeouts{Request: ptr.To[gwv1.Duration]("10s")},
					Retry:       &gwv1.HTTPRouteRetry{Attempts: ptr.To(2), Codes: []gwv1.HTTPRouteRetryStatusCode{503}},
				},
				{BackendRefs: []gwv1.HTTPBackendRef{backend(app, 1)}},
			},
		},
	}
}

// runWaypointPods runs one pod for each waypoint Gateway as its
// Deployment would (envtest has no controller-manager): a ReplicaSet the
// deployer's Deployment controls, and a pod of its template that the
// ReplicaSet controls. It waits for the Deployments.
func runWaypointPods(ctx context.Context, c client.Client, size benchSize) ([]*corev1.Pod, error) {
	pods := make([]*corev1.Pod, size.waypoints)
	err := parallel(size.waypoints, benchWorkers, func(n int) error {
		ns := benchNamespace(n)
		var dep appsv1.Deployment
		deadline := time.Now().Add(60 * time.Second)
		for c.Get(ctx, client.ObjectKey{Namespace: ns, Name: "waypoint"}, &dep) != nil {
			if time.Now().After(deadline) {
				return fmt.Errorf("no waypoint Deployment %s/waypoint within 60s", ns)
			}
			time.Sleep(50 * time.Millisecond)
		}
		controller := true
		rs := &appsv1.ReplicaSet{
			ObjectMeta: metav1.ObjectMeta{
				Namespace: ns, Name: "waypoint-5c8f7d9b6", Labels: maps.Clone(dep.Spec.Template.Labels),
				OwnerReferences: []metav1.OwnerReference{{
					APIVersion: "apps/v1", Kind: "Deployment", Name: dep.Name, UID: dep.UID, Controller: &controller,
				}},
			},
			Spec: appsv1.ReplicaSetSpec{Selector: dep.Spec.Selector, Template: dep.Spec.Template},
		}
		rs.Labels["pod-template-hash"] = "5c8f7d9b6"
		if err := c.Create(ctx, rs); err != nil {
			return fmt.Errorf("create ReplicaSet %s/%s: %w", ns, rs.Name, err)
		}
		spec := *dep.Spec.Template.Spec.DeepCopy()
		spec.NodeName = benchNode(n % size.nodes)
		p := &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{
				Namespace: ns, Name: "waypoint-5c8f7d9b6-" + fmt.Sprintf("%05d", n), Labels: rs.Labels,
				Annotations: maps.Clone(dep.Spec.Template.Annotations),
				OwnerReferences: []metav1.OwnerReference{{
					APIVersion: "apps/v1", Kind: "ReplicaSet", Name: rs.Name, UID: rs.UID, Controller: &controller,
				}},
			},
			Spec: spec,
		}
		if err := createRunning(ctx, c, p, fmt.Sprintf("10.250.0.%d", n+1), nodeIP(n%size.nodes)); err != nil {
			return err
		}
		pods[n] = p
		return nil
	})
	return pods, err
}

// settled reports whether the leader has written every policy's status,
// amesh's parent entry of every HTTPRoute, the WaypointBound condition of
// every Service of the waypoint namespaces and the root certificate
// ConfigMaps: a controller restarted afterwards finds a cluster at rest,
// as after a rollout.
func settled(ctx context.Context, c client.Client, namespaces, waypoints int) (bool, string, error) {
	var aps v1alpha1.AuthorizationPolicyList
	if err := c.List(ctx, &aps); err != nil {
		return false, "", err
	}
	pending := 0
	for _, ap := range aps.Items {
		if ap.Status.ObservedGeneration != ap.Generation {
			pending++
		}
	}
	var routes gwv1.HTTPRouteList
	if err := c.List(ctx, &routes); err != nil {
		return false, "", err
	}
	for _, r := range routes.Items {
		if !slices.ContainsFunc(r.Status.Parents, func(p gwv1.RouteParentStatus) bool {
			return p.ControllerName == label.WaypointController
		}) {
			pending++
		}
	}
	// The WaypointBound condition of the Services bound to waypoints, and
	// the root certificate ConfigMaps, come last.
	var svcs corev1.ServiceList
	if err := c.List(ctx, &svcs); err != nil {
		return false, "", err
	}
	for _, svc := range svcs.Items {
		if svc.Namespace < benchNamespace(0) || svc.Namespace >= benchNamespace(waypoints) || svc.Name == "waypoint" {
			continue
		}
		if meta.FindStatusCondition(svc.Status.Conditions, translate.ConditionWaypointBound) == nil {
			pending++
		}
	}
	var cms corev1.ConfigMapList
	if err := c.List(ctx, &cms, client.MatchingFields{"metadata.name": label.RootCertConfigMap}); err != nil {
		return false, "", err
	}
	if len(cms.Items) < namespaces+1 {
		pending++
	}
	return pending == 0, fmt.Sprintf("%d policies, routes, Services or root certificate ConfigMaps without status", pending), nil
}
