// Package gatewayclass decides which Gateways are amesh waypoints — whether
// a GatewayClass is amesh's waypoint class (Waypoint) and whether a Gateway
// of that class is one amesh runs (CheckGateway) — so that the deployer, the
// translator and the discovery/CA authorizer agree on them.
package gatewayclass

import (
	"fmt"

	gwv1 "sigs.k8s.io/gateway-api/apis/v1"
)

// Ours reports whether gc names controller (amesh's waypoint controller)
// and is not being deleted: amesh then reports its status and that of its
// Gateways.
func Ours(gc *gwv1.GatewayClass, controller string) bool {
	return gc != nil && string(gc.Spec.ControllerName) == controller && gc.DeletionTimestamp == nil
}

// Accepted is the Accepted condition amesh gives a class of its own: only
// the class named waypointClass, and without parameters (amesh takes none).
func Accepted(gc *gwv1.GatewayClass, waypointClass string) (ok bool, reason gwv1.GatewayClassConditionReason, message string) {
	switch {
	case gc.Name != waypointClass:
		return false, gwv1.GatewayClassReasonUnsupported,
			fmt.Sprintf("amesh serves waypoints only through the GatewayClass %s", waypointClass)
	case gc.Spec.ParametersRef != nil:
		return false, gwv1.GatewayClassReasonInvalidParameters,
			fmt.Sprintf("amesh waypoints take no parameters; remove spec.parametersRef (%s %s)", gc.Spec.ParametersRef.Kind, gc.Spec.ParametersRef.Name)
	}
	return true, gwv1.GatewayClassReasonAccepted, "amesh deploys a waypoint for each Gateway of this class"
}

// Waypoint reports whether the Gateways of gc — the GatewayClass named
// waypointClass, nil when it does not exist — are amesh waypoints: the
// class exists, names controller, is not being deleted and is accepted.
// Only then does the deployer run them, so only then may they be bound to,
// receive waypoint configuration or be given a waypoint's identity. why
// says what is missing.
func Waypoint(gc *gwv1.GatewayClass, waypointClass, controller string) (ok bool, why string) {
	switch {
	case gc == nil:
		return false, fmt.Sprintf("the GatewayClass %s does not exist", waypointClass)
	case gc.DeletionTimestamp != nil:
		return false, fmt.Sprintf("the GatewayClass %s is being deleted", waypointClass)
	case string(gc.Spec.ControllerName) != controller:
		return false, fmt.Sprintf("the GatewayClass %s belongs to controller %s, not %s", waypointClass, gc.Spec.ControllerName, controller)
	}
	if ok, _, msg := Accepted(gc, waypointClass); !ok {
		return false, fmt.Sprintf("the GatewayClass %s is not accepted: %s", waypointClass, msg)
	}
	return true, ""
}
