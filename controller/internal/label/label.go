// Package label names the labels, annotations and well-known values through
// which users and the data plane talk to the controller (DESIGN.md §2).
package label

const (
	// DataplaneMode enrols a namespace or pod ("ambient"); "none" on a pod
	// opts it out.
	DataplaneMode = "amesh.dev/dataplane-mode"
	// DataplaneModeAmbient and DataplaneModeNone are DataplaneMode values.
	DataplaneModeAmbient = "ambient"
	DataplaneModeNone    = "none"

	// UseWaypoint binds a Namespace, Service or Pod to a waypoint Gateway
	// by name; "none" means no waypoint.
	UseWaypoint = "amesh.dev/use-waypoint"
	// UseWaypointNamespace names the waypoint's namespace when it is not
	// the object's own.
	UseWaypointNamespace = "amesh.dev/use-waypoint-namespace"
	// UseWaypointNone is the UseWaypoint value that opts out.
	UseWaypointNone = "none"

	// ForServiceAccount is the Gateway annotation that makes a waypoint
	// serve the workloads running as that service account.
	ForServiceAccount = "amesh.dev/for-service-account"
	// WaypointFor is the Gateway label saying what a waypoint serves.
	WaypointFor = "amesh.dev/waypoint-for"
	// WaypointFor values; WaypointForService is the default.
	WaypointForService  = "service"
	WaypointForWorkload = "workload"
	WaypointForAll      = "all"
	WaypointForNone     = "none"

	// Redirection is the pod annotation the node agent writes.
	Redirection = "amesh.dev/redirection"
	// RedirectionEnabled means capture rules are installed and ztunnel
	// serves the pod.
	RedirectionEnabled = "enabled"

	// GatewayName is the Gateway API label a gateway implementation puts
	// on the pods and Services of a Gateway.
	GatewayName = "gateway.networking.k8s.io/gateway-name"

	// WaypointClass is the GatewayClass of waypoints and WaypointController
	// its controllerName.
	WaypointClass      = "amesh-waypoint"
	WaypointController = "amesh.dev/waypoint-controller"

	// SystemNamespace is the controller's namespace and the mesh root
	// namespace.
	SystemNamespace = "amesh-system"
	// RootCertConfigMap is the ConfigMap carrying the mesh root
	// certificates in every enrolled namespace.
	RootCertConfigMap = "amesh-root-cert"
	// HBONEPort is the HBONE port of pods and waypoints.
	HBONEPort = 15008
)
