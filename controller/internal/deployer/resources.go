package deployer

import (
	"fmt"
	"maps"
	"strconv"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	"k8s.io/apimachinery/pkg/util/intstr"
	appsv1ac "k8s.io/client-go/applyconfigurations/apps/v1"
	corev1ac "k8s.io/client-go/applyconfigurations/core/v1"
	metav1ac "k8s.io/client-go/applyconfigurations/meta/v1"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"

	"github.com/amesh-dev/amesh/controller/internal/label"
)

// Ports of a waypoint (DESIGN.md §3).
const (
	portHBONE   = label.HBONEPort
	portMetrics = 15020
	portReady   = 15021
)

// Labels the deployer puts on everything it creates, besides the Gateway
// API's gateway-name label (the pods' selector).
const (
	labelName      = "app.kubernetes.io/name"
	labelComponent = "app.kubernetes.io/component"
	labelPartOf    = "app.kubernetes.io/part-of"
	labelManagedBy = "app.kubernetes.io/managed-by"
	managedBy      = "amesh-controller"
	componentValue = "waypoint"
)

// waypointContainer names the waypoint's container in its pod.
const waypointContainer = "waypoint"

// Paths inside the waypoint container.
const (
	tokenDir    = "/var/run/secrets/tokens"
	tokenFile   = "amesh-token"
	rootCertDir = "/var/run/secrets/amesh"
	rootCertKey = "root-cert.pem"
	// tokenTTL is the projected token's lifetime; the kubelet refreshes it
	// at 80 %.
	tokenTTL = 12 * 3600
)

// selector selects a waypoint's pods.
func selector(gw *gwv1.Gateway) map[string]string {
	return map[string]string{label.GatewayName: gw.Name}
}

// objectLabels are the labels of every object made for gw: the Gateway's
// infrastructure labels (GEP-1867), then the deployer's own, which win.
func objectLabels(gw *gwv1.Gateway) map[string]string {
	m := map[string]string{}
	if inf := gw.Spec.Infrastructure; inf != nil {
		for k, v := range inf.Labels {
			m[string(k)] = string(v)
		}
	}
	maps.Copy(m, selector(gw))
	m[labelName] = gw.Name
	m[labelComponent] = componentValue
	m[labelPartOf] = "amesh"
	m[labelManagedBy] = managedBy
	return m
}

// objectAnnotations are the Gateway's infrastructure annotations.
func objectAnnotations(gw *gwv1.Gateway) map[string]string {
	m := map[string]string{}
	if inf := gw.Spec.Infrastructure; inf != nil {
		for k, v := range inf.Annotations {
			m[string(k)] = string(v)
		}
	}
	return m
}

// ownerRef makes gw the controlling owner: the garbage collector deletes
// the object with the Gateway.
func ownerRef(gw *gwv1.Gateway) *metav1ac.OwnerReferenceApplyConfiguration {
	return metav1ac.OwnerReference().
		WithAPIVersion(gwv1.GroupVersion.String()).
		WithKind("Gateway").
		WithName(gw.Name).
		WithUID(gw.UID).
		WithController(true).
		WithBlockOwnerDeletion(true)
}

// serviceAccount is the waypoint's identity:
// spiffe://<trust-domain>/ns/<namespace>/sa/<gateway name>.
func serviceAccount(gw *gwv1.Gateway) *corev1ac.ServiceAccountApplyConfiguration {
	return corev1ac.ServiceAccount(gw.Name, gw.Namespace).
		WithLabels(objectLabels(gw)).
		WithAnnotations(objectAnnotations(gw)).
		WithOwnerReferences(ownerRef(gw)).
		// The waypoint never calls the Kubernetes API: it presents only
		// its projected, audience-bound token to the controller.
		WithAutomountServiceAccountToken(false)
}

// service is the waypoint's address: ztunnel sends HBONE to its cluster IP.
// It has the Gateway's name (the translator finds it by that name).
func service(gw *gwv1.Gateway) *corev1ac.ServiceApplyConfiguration {
	return corev1ac.Service(gw.Name, gw.Namespace).
		WithLabels(objectLabels(gw)).
		WithAnnotations(objectAnnotations(gw)).
		WithOwnerReferences(ownerRef(gw)).
		WithSpec(corev1ac.ServiceSpec().
			WithType(corev1.ServiceTypeClusterIP).
			WithSelector(selector(gw)).
			WithPorts(
				corev1ac.ServicePort().WithName("mesh").WithProtocol(corev1.ProtocolTCP).
					WithPort(portHBONE).WithTargetPort(intstr.FromInt32(portHBONE)),
				corev1ac.ServicePort().WithName("http-metrics").WithProtocol(corev1.ProtocolTCP).
					WithPort(portMetrics).WithTargetPort(intstr.FromInt32(portMetrics)).WithAppProtocol("http"),
			))
}

// deployment runs the waypoint. It leaves replicas unset so that an
// operator or autoscaler may scale it (the API server defaults it to 1).
func deployment(gw *gwv1.Gateway, o Options) *appsv1ac.DeploymentApplyConfiguration {
	podLabels := objectLabels(gw)
	// The mesh's own pods are never captured.
	podLabels[label.DataplaneMode] = label.DataplaneModeNone
	podAnnotations := objectAnnotations(gw)
	podAnnotations["prometheus.io/scrape"] = "true"
	podAnnotations["prometheus.io/port"] = strconv.Itoa(portMetrics)
	podAnnotations["prometheus.io/path"] = "/metrics"

	resources := corev1ac.ResourceRequirements().WithRequests(corev1.ResourceList{
		corev1.ResourceCPU:    o.CPURequest,
		corev1.ResourceMemory: o.MemoryRequest,
	})
	if !o.MemoryLimit.IsZero() {
		resources.WithLimits(corev1.ResourceList{corev1.ResourceMemory: o.MemoryLimit})
	}
	fieldEnv := func(name, path string) *corev1ac.EnvVarApplyConfiguration {
		return corev1ac.EnvVar().WithName(name).WithValueFrom(corev1ac.EnvVarSource().
			WithFieldRef(corev1ac.ObjectFieldSelector().WithFieldPath(path)))
	}
	args := []string{
		"-gateway=" + gw.Namespace + "/" + gw.Name,
		"-namespace=$(POD_NAMESPACE)",
		"-service-account=$(SERVICE_ACCOUNT)",
		"-pod-name=$(POD_NAME)",
		"-node-name=$(NODE_NAME)",
		"-trust-domain=" + o.TrustDomain,
		"-cluster-id=" + o.ClusterID,
		"-controller=" + o.Controller,
		"-controller-server-name=" + o.controllerServerName(),
		"-root-cert=" + rootCertDir + "/" + rootCertKey,
		"-token-file=" + tokenDir + "/" + tokenFile,
		fmt.Sprintf("-hbone-addr=:%d", portHBONE),
		fmt.Sprintf("-metrics-addr=:%d", portMetrics),
		fmt.Sprintf("-ready-addr=:%d", portReady),
		"-drain-timeout=" + o.DrainTimeout.String(),
	}
	grace := int64(o.DrainTimeout.Seconds()) + 10
	nonRoot := int64(65532)

	env := []*corev1ac.EnvVarApplyConfiguration{
		fieldEnv("POD_NAME", "metadata.name"),
		fieldEnv("POD_NAMESPACE", "metadata.namespace"),
		fieldEnv("NODE_NAME", "spec.nodeName"),
		fieldEnv("SERVICE_ACCOUNT", "spec.serviceAccountName"),
	}
	if !o.MemoryLimit.IsZero() {
		// The Go GC works to stay under the pod's memory limit instead of
		// letting the heap double past it: GOMEMLIMIT takes a plain byte
		// count, which is what the downward API renders with divisor 1.
		env = append(env, corev1ac.EnvVar().WithName("GOMEMLIMIT").WithValueFrom(corev1ac.EnvVarSource().
			WithResourceFieldRef(corev1ac.ResourceFieldSelector().WithContainerName(waypointContainer).
				WithResource("limits.memory").WithDivisor(resource.MustParse("1")))))
	}

	container := corev1ac.Container().
		WithName(waypointContainer).
		WithImage(o.Image).
		WithImagePullPolicy(o.ImagePullPolicy).
		WithArgs(args...).
		WithEnv(env...).
		WithPorts(
			corev1ac.ContainerPort().WithName("hbone").WithContainerPort(portHBONE).WithProtocol(corev1.ProtocolTCP),
			corev1ac.ContainerPort().WithName("http-metrics").WithContainerPort(portMetrics).WithProtocol(corev1.ProtocolTCP),
			corev1ac.ContainerPort().WithName("http-ready").WithContainerPort(portReady).WithProtocol(corev1.ProtocolTCP),
		).
		WithReadinessProbe(corev1ac.Probe().
			WithHTTPGet(corev1ac.HTTPGetAction().WithPath("/healthz/ready").WithPort(intstr.FromInt32(portReady))).
			WithPeriodSeconds(5).
			WithFailureThreshold(3)).
		WithResources(resources).
		WithSecurityContext(corev1ac.SecurityContext().
			WithAllowPrivilegeEscalation(false).
			WithReadOnlyRootFilesystem(true).
			WithRunAsNonRoot(true).
			WithRunAsUser(nonRoot).
			WithRunAsGroup(nonRoot).
			WithCapabilities(corev1ac.Capabilities().WithDrop("ALL"))).
		WithVolumeMounts(
			corev1ac.VolumeMount().WithName("amesh-token").WithMountPath(tokenDir).WithReadOnly(true),
			corev1ac.VolumeMount().WithName("root-cert").WithMountPath(rootCertDir).WithReadOnly(true),
		)

	// Spread replicas over nodes when possible.
	antiAffinity := corev1ac.PodAntiAffinity().WithPreferredDuringSchedulingIgnoredDuringExecution(
		corev1ac.WeightedPodAffinityTerm().WithWeight(100).WithPodAffinityTerm(
			corev1ac.PodAffinityTerm().
				WithTopologyKey(corev1.LabelHostname).
				WithLabelSelector(metav1ac.LabelSelector().WithMatchLabels(selector(gw)))))

	pod := corev1ac.PodSpec().
		WithServiceAccountName(gw.Name).
		WithAutomountServiceAccountToken(false).
		WithTerminationGracePeriodSeconds(grace).
		WithNodeSelector(map[string]string{corev1.LabelOSStable: "linux"}).
		WithAffinity(corev1ac.Affinity().WithPodAntiAffinity(antiAffinity)).
		WithSecurityContext(corev1ac.PodSecurityContext().
			WithSeccompProfile(corev1ac.SeccompProfile().WithType(corev1.SeccompProfileTypeRuntimeDefault))).
		WithContainers(container).
		WithVolumes(
			// The waypoint's identity toward the controller (TokenReview).
			corev1ac.Volume().WithName("amesh-token").WithProjected(corev1ac.ProjectedVolumeSource().WithSources(
				corev1ac.VolumeProjection().WithServiceAccountToken(corev1ac.ServiceAccountTokenProjection().
					WithAudience(o.TokenAudience).WithExpirationSeconds(tokenTTL).WithPath(tokenFile)))),
			// The mesh roots, published by the controller. Not optional: a
			// waypoint never starts without them.
			corev1ac.Volume().WithName("root-cert").WithConfigMap(corev1ac.ConfigMapVolumeSource().
				WithName(o.RootCertConfigMap)),
		)

	return appsv1ac.Deployment(gw.Name, gw.Namespace).
		WithLabels(objectLabels(gw)).
		WithAnnotations(objectAnnotations(gw)).
		WithOwnerReferences(ownerRef(gw)).
		WithSpec(appsv1ac.DeploymentSpec().
			WithSelector(metav1ac.LabelSelector().WithMatchLabels(selector(gw))).
			WithTemplate(corev1ac.PodTemplateSpec().
				WithLabels(podLabels).
				WithAnnotations(podAnnotations).
				WithSpec(pod)))
}
