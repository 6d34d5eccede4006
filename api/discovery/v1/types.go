// Package discoveryv1 holds the discovery resources the controller streams to
// ztunnel and waypoints over delta xDS. The messages are generated from
// discovery.proto; this file names their xDS type URLs.
package discoveryv1

// Type URLs of the discovery resources, as carried in google.protobuf.Any and
// in DeltaDiscoveryRequest.type_url.
const (
	WorkloadType        = "type.googleapis.com/amesh.discovery.v1.Workload"
	ServiceType         = "type.googleapis.com/amesh.discovery.v1.Service"
	AuthorizationType   = "type.googleapis.com/amesh.discovery.v1.Authorization"
	TrustBundleType     = "type.googleapis.com/amesh.discovery.v1.TrustBundle"
	WaypointServiceType = "type.googleapis.com/amesh.discovery.v1.WaypointService"
	WaypointGatewayType = "type.googleapis.com/amesh.discovery.v1.WaypointGateway"
)
