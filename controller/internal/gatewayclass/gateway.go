package gatewayclass

import (
	"fmt"
	"strings"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/util/validation"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"

	"github.com/amesh-dev/amesh/controller/internal/label"
)

// ProtocolHBONE is the protocol of a waypoint's listener.
const ProtocolHBONE gwv1.ProtocolType = "HBONE"

// Listener is the judgement of one listener of a waypoint Gateway.
type Listener struct {
	Name    gwv1.SectionName
	OK      bool
	Reason  gwv1.ListenerConditionReason
	Message string
}

// Verdict is what amesh makes of a Gateway of its waypoint class: whether
// it runs it (Accepted), and the Accepted condition's reason and message.
type Verdict struct {
	Accepted  bool
	Reason    gwv1.GatewayConditionReason
	Message   string
	Listeners []Listener
}

// CheckGateway judges a Gateway of the waypoint class against what amesh
// implements (its class is judged by Waypoint). The deployer runs only the
// Gateways it accepts and reports the verdict in their status; the
// translator and the authorizer treat the others as waypoints nobody runs.
// It is pure: the same Gateway always gets the same verdict.
func CheckGateway(gw *gwv1.Gateway) Verdict {
	var v Verdict
	for _, l := range gw.Spec.Listeners {
		v.Listeners = append(v.Listeners, checkListener(l))
	}
	invalid := func(reason gwv1.GatewayConditionReason, format string, a ...any) Verdict {
		v.Accepted, v.Reason, v.Message = false, reason, fmt.Sprintf(format, a...)
		return v
	}
	if msgs := validation.IsDNS1035Label(gw.Name); len(msgs) > 0 {
		return invalid(gwv1.GatewayReasonInvalid,
			"a waypoint's name must be a DNS-1035 label because it names its Service: %s", strings.Join(msgs, "; "))
	}
	if len(gw.Spec.Addresses) > 0 {
		return invalid(gwv1.GatewayReasonUnsupportedAddress,
			"a waypoint's address is the cluster IP of its Service; spec.addresses is not supported")
	}
	if inf := gw.Spec.Infrastructure; inf != nil && inf.ParametersRef != nil {
		return invalid(gwv1.GatewayReasonInvalidParameters,
			"amesh waypoints take no parameters; remove spec.infrastructure.parametersRef (%s %s)", inf.ParametersRef.Kind, inf.ParametersRef.Name)
	}
	if sa, ok := gw.Annotations[label.ForServiceAccount]; ok {
		if msgs := validation.IsDNS1123Subdomain(sa); len(msgs) > 0 {
			return invalid(gwv1.GatewayReasonInvalid, "annotation %s=%q is not a service account name: %s",
				label.ForServiceAccount, sa, strings.Join(msgs, "; "))
		}
	}
	var notes []string
	switch f, ok := gw.Labels[label.WaypointFor]; {
	case !ok:
	case f == label.WaypointForService, f == label.WaypointForWorkload, f == label.WaypointForAll, f == label.WaypointForNone:
	default:
		notes = append(notes, fmt.Sprintf("label %s=%q is not service, workload, all or none: the waypoint serves %q",
			label.WaypointFor, f, Serves(gw)))
	}

	var good int
	var bad []string
	for _, l := range v.Listeners {
		if l.OK {
			good++
		} else {
			bad = append(bad, string(l.Name))
		}
	}
	switch {
	case good == 0:
		return invalid(gwv1.GatewayReasonListenersNotValid,
			"a waypoint needs the listener {name: mesh, port: %d, protocol: %s}", label.HBONEPort, ProtocolHBONE)
	case len(bad) > 0:
		v.Accepted, v.Reason = true, gwv1.GatewayReasonListenersNotValid
		v.Message = fmt.Sprintf("listeners %s are not valid and are ignored; the waypoint serves HBONE on %d", strings.Join(bad, ", "), label.HBONEPort)
	default:
		v.Accepted, v.Reason, v.Message = true, gwv1.GatewayReasonAccepted, "the waypoint is accepted"
	}
	if len(notes) > 0 {
		v.Message += "; " + strings.Join(notes, "; ")
	}
	return v
}

// Serves is the traffic a waypoint Gateway serves: its waypoint-for label
// (service, workload, all or none) when that is one of those; otherwise
// service, or workload for a per-service-account waypoint (annotation
// for-service-account), whose point is to take its service account's
// workload traffic.
func Serves(gw *gwv1.Gateway) string {
	switch f := gw.Labels[label.WaypointFor]; f {
	case label.WaypointForService, label.WaypointForWorkload, label.WaypointForAll, label.WaypointForNone:
		return f
	}
	if _, ok := gw.Annotations[label.ForServiceAccount]; ok {
		return label.WaypointForWorkload
	}
	return label.WaypointForService
}

// ServesWorkloads reports whether a waypoint-for value takes traffic
// addressed to workloads.
func ServesWorkloads(serves string) bool {
	return serves == label.WaypointForWorkload || serves == label.WaypointForAll
}

// checkListener accepts only HBONE on 15008.
func checkListener(l gwv1.Listener) Listener {
	v := Listener{Name: l.Name}
	switch {
	case l.Protocol != ProtocolHBONE:
		v.Reason = gwv1.ListenerReasonUnsupportedProtocol
		v.Message = fmt.Sprintf("protocol %s is not supported by waypoints: use %s on port %d", l.Protocol, ProtocolHBONE, label.HBONEPort)
	case l.Port != label.HBONEPort:
		v.Reason = gwv1.ListenerReasonPortUnavailable
		v.Message = fmt.Sprintf("waypoints serve %s on port %d only, not %d", ProtocolHBONE, label.HBONEPort, l.Port)
	case l.TLS != nil:
		v.Reason = gwv1.ListenerReasonUnsupportedValue
		v.Message = fmt.Sprintf("%s listeners take no tls: the mesh identity secures them", ProtocolHBONE)
	default:
		v.OK = true
		v.Reason = gwv1.ListenerReasonAccepted
		v.Message = "the listener is accepted"
	}
	return v
}

// AdmitsNamespace reports whether the waypoint Gateway gw takes traffic
// bound to it from namespace ns (whose labels are nsLabels), as Gateway
// API listeners admit routes: its own namespace always; another only when
// one of its valid listeners says so in allowedRoutes.namespaces (from All,
// or from Selector with a selector matching ns). The default, from Same,
// admits no other namespace: a Gateway's owner consents to serving others'
// traffic, which its policies then govern.
func AdmitsNamespace(gw *gwv1.Gateway, ns string, nsLabels map[string]string) bool {
	if gw.Namespace == ns {
		return true
	}
	for _, l := range gw.Spec.Listeners {
		if !checkListener(l).OK || l.AllowedRoutes == nil || l.AllowedRoutes.Namespaces == nil ||
			l.AllowedRoutes.Namespaces.From == nil {
			continue
		}
		switch *l.AllowedRoutes.Namespaces.From {
		case gwv1.NamespacesFromAll:
			return true
		case gwv1.NamespacesFromSelector:
			if l.AllowedRoutes.Namespaces.Selector == nil {
				continue
			}
			sel, err := metav1.LabelSelectorAsSelector(l.AllowedRoutes.Namespaces.Selector)
			if err == nil && sel.Matches(labels.Set(nsLabels)) {
				return true
			}
		}
	}
	return false
}
