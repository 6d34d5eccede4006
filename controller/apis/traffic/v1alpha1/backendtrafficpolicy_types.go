package v1alpha1

import (
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// Duration is a Gateway API duration (GEP-2257): one to four
// <number><unit> pairs, units h, m, s, ms; e.g. "1h30m", "250ms".
// +kubebuilder:validation:Pattern=`^([0-9]{1,5}(h|m|s|ms)){1,4}$`
type Duration string

// PolicyTargetReference names the object a policy attaches to: a Service
// (traffic to it, at the waypoint it is bound to) or a waypoint Gateway
// (every service it serves), in the policy's namespace.
//
// +kubebuilder:validation:XValidation:rule="(self.group == 'gateway.networking.k8s.io' && self.kind == 'Gateway') || (size(self.group) == 0 && self.kind == 'Service')",message="targetRefs may name a Gateway (group gateway.networking.k8s.io) or a Service (core group)"
type PolicyTargetReference struct {
	// Group of the target: "gateway.networking.k8s.io" or "" (core).
	// +kubebuilder:validation:MaxLength=253
	// +kubebuilder:validation:Pattern=`^$|^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$`
	// +required
	Group string `json:"group"`
	// Kind of the target: "Gateway" or "Service".
	// +kubebuilder:validation:MinLength=1
	// +kubebuilder:validation:MaxLength=63
	// +required
	Kind string `json:"kind"`
	// Name of the target.
	// +kubebuilder:validation:MinLength=1
	// +kubebuilder:validation:MaxLength=253
	// +required
	Name string `json:"name"`
}

// BackendTrafficPolicySpec is the desired behaviour of a
// BackendTrafficPolicy. A policy targeting a Service overrides, field by
// field, one targeting the waypoint Gateway.
//
// +kubebuilder:validation:XValidation:rule="has(self.loadBalancer) || has(self.circuitBreaker) || has(self.outlierDetection) || has(self.connectionPool) || has(self.localRateLimit) || has(self.faultInjection)",message="a policy needs at least one setting"
type BackendTrafficPolicySpec struct {
	// TargetRefs name the Services or waypoint Gateways the policy applies
	// to.
	// +required
	// +listType=atomic
	// +kubebuilder:validation:MinItems=1
	// +kubebuilder:validation:MaxItems=16
	TargetRefs []PolicyTargetReference `json:"targetRefs"`
	// LoadBalancer picks an endpoint per request.
	// +optional
	LoadBalancer *LoadBalancer `json:"loadBalancer,omitempty"`
	// CircuitBreaker bounds concurrency towards the backend; excess
	// requests fail fast with 503.
	// +optional
	CircuitBreaker *CircuitBreaker `json:"circuitBreaker,omitempty"`
	// OutlierDetection ejects failing endpoints for a while.
	// +optional
	OutlierDetection *OutlierDetection `json:"outlierDetection,omitempty"`
	// ConnectionPool tunes upstream connections.
	// +optional
	ConnectionPool *ConnectionPool `json:"connectionPool,omitempty"`
	// LocalRateLimit is a token bucket per waypoint replica; excess
	// requests get 429.
	// +optional
	LocalRateLimit *LocalRateLimit `json:"localRateLimit,omitempty"`
	// FaultInjection delays or aborts a share of requests.
	// +optional
	FaultInjection *FaultInjection `json:"faultInjection,omitempty"`
}

// LoadBalancerType is a load-balancing algorithm.
// +kubebuilder:validation:Enum=RoundRobin;LeastRequest;Random;ConsistentHash
type LoadBalancerType string

// Load-balancing algorithms.
const (
	LoadBalancerRoundRobin     LoadBalancerType = "RoundRobin"
	LoadBalancerLeastRequest   LoadBalancerType = "LeastRequest"
	LoadBalancerRandom         LoadBalancerType = "Random"
	LoadBalancerConsistentHash LoadBalancerType = "ConsistentHash"
)

// LoadBalancer selects the algorithm.
//
// +kubebuilder:validation:XValidation:rule="(self.type == 'ConsistentHash') == has(self.consistentHash)",message="consistentHash is required with, and only allowed with, type ConsistentHash"
type LoadBalancer struct {
	// Type of load balancing; LeastRequest uses the power of two choices.
	// +required
	Type LoadBalancerType `json:"type"`
	// ConsistentHash says what to hash.
	// +optional
	ConsistentHash *ConsistentHash `json:"consistentHash,omitempty"`
}

// ConsistentHashType is what a consistent hash is computed over.
// +kubebuilder:validation:Enum=Header;Cookie;SourceIP
type ConsistentHashType string

// Consistent hash keys.
const (
	ConsistentHashHeader   ConsistentHashType = "Header"
	ConsistentHashCookie   ConsistentHashType = "Cookie"
	ConsistentHashSourceIP ConsistentHashType = "SourceIP"
)

// ConsistentHash is the hash key.
//
// +kubebuilder:validation:XValidation:rule="(self.type == 'Header') == has(self.header)",message="header is required with, and only allowed with, type Header"
// +kubebuilder:validation:XValidation:rule="(self.type == 'Cookie') == has(self.cookie)",message="cookie is required with, and only allowed with, type Cookie"
type ConsistentHash struct {
	// +required
	Type ConsistentHashType `json:"type"`
	// +optional
	Header *HashHeader `json:"header,omitempty"`
	// +optional
	Cookie *HashCookie `json:"cookie,omitempty"`
}

// HashHeader hashes on a request header.
type HashHeader struct {
	// +kubebuilder:validation:MinLength=1
	// +kubebuilder:validation:MaxLength=256
	// +kubebuilder:validation:Pattern=`^[A-Za-z0-9!#$%&'*+.^_|~-]+$`
	// +required
	Name string `json:"name"`
}

// HashCookie hashes on a cookie; with a TTL, the waypoint sets the cookie
// when it is absent.
type HashCookie struct {
	// +kubebuilder:validation:MinLength=1
	// +kubebuilder:validation:MaxLength=256
	// +kubebuilder:validation:Pattern=`^[A-Za-z0-9!#$%&'*+.^_|~-]+$`
	// +required
	Name string `json:"name"`
	// +optional
	TTL *Duration `json:"ttl,omitempty"`
	// +optional
	// +kubebuilder:validation:MaxLength=1024
	// +kubebuilder:validation:Pattern=`^/`
	Path string `json:"path,omitempty"`
}

// CircuitBreaker limits per backend service port and waypoint replica;
// an unset field means Envoy's default (1024 connections, 1024 pending
// requests, 1024 requests, 3 concurrent retries).
type CircuitBreaker struct {
	// +optional
	// +kubebuilder:validation:Minimum=1
	MaxConnections *int32 `json:"maxConnections,omitempty"`
	// +optional
	// +kubebuilder:validation:Minimum=1
	MaxPendingRequests *int32 `json:"maxPendingRequests,omitempty"`
	// +optional
	// +kubebuilder:validation:Minimum=1
	MaxRequests *int32 `json:"maxRequests,omitempty"`
	// +optional
	// +kubebuilder:validation:Minimum=1
	MaxRetries *int32 `json:"maxRetries,omitempty"`
}

// OutlierDetection ejects an endpoint after consecutive errors for
// baseEjectionTime × number of ejections (at most maxEjectionTime, or
// baseEjectionTime if that is longer), never more than maxEjectionPercent
// of the endpoints at once.
//
// +kubebuilder:validation:XValidation:rule="has(self.consecutive5xx) || has(self.consecutiveGatewayErrors)",message="consecutive5xx or consecutiveGatewayErrors is required"
type OutlierDetection struct {
	// Consecutive5xx responses (or connect failures) that eject.
	// +optional
	// +kubebuilder:validation:Minimum=1
	Consecutive5xx *int32 `json:"consecutive5xx,omitempty"`
	// ConsecutiveGatewayErrors (502, 503, 504, connect failures) that eject.
	// +optional
	// +kubebuilder:validation:Minimum=1
	ConsecutiveGatewayErrors *int32 `json:"consecutiveGatewayErrors,omitempty"`
	// Interval between ejection sweeps; default 10s.
	// +optional
	Interval *Duration `json:"interval,omitempty"`
	// BaseEjectionTime; default 30s.
	// +optional
	BaseEjectionTime *Duration `json:"baseEjectionTime,omitempty"`
	// MaxEjectionPercent; default 10.
	// +optional
	// +kubebuilder:validation:Minimum=0
	// +kubebuilder:validation:Maximum=100
	MaxEjectionPercent *int32 `json:"maxEjectionPercent,omitempty"`
	// MaxEjectionTime caps one ejection; default 300s (Envoy's).
	// +optional
	// +kubebuilder:default="300s"
	// +kubebuilder:validation:XValidation:rule="duration(self) > duration('0s')",message="maxEjectionTime must be positive"
	MaxEjectionTime *Duration `json:"maxEjectionTime,omitempty"`
}

// ConnectionPool tunes upstream connections.
type ConnectionPool struct {
	// +optional
	ConnectTimeout *Duration `json:"connectTimeout,omitempty"`
	// +optional
	IdleTimeout *Duration `json:"idleTimeout,omitempty"`
	// +optional
	// +kubebuilder:validation:Minimum=1
	MaxRequestsPerConnection *int32 `json:"maxRequestsPerConnection,omitempty"`
}

// LocalRateLimit is a token bucket: it holds at most maxTokens and gains
// tokensPerFill every fillInterval; each request takes one token.
//
// +kubebuilder:validation:XValidation:rule="!has(self.tokensPerFill) || self.tokensPerFill <= self.maxTokens",message="tokensPerFill must not exceed maxTokens"
type LocalRateLimit struct {
	// +required
	// +kubebuilder:validation:Minimum=1
	MaxTokens int32 `json:"maxTokens"`
	// TokensPerFill; default maxTokens.
	// +optional
	// +kubebuilder:validation:Minimum=1
	TokensPerFill *int32 `json:"tokensPerFill,omitempty"`
	// +required
	// +kubebuilder:validation:XValidation:rule="duration(self) > duration('0s')",message="fillInterval must be positive"
	FillInterval Duration `json:"fillInterval"`
}

// FaultInjection delays and/or aborts requests.
//
// +kubebuilder:validation:XValidation:rule="has(self.delay) || has(self.abort)",message="delay or abort is required"
type FaultInjection struct {
	// +optional
	Delay *FaultDelay `json:"delay,omitempty"`
	// +optional
	Abort *FaultAbort `json:"abort,omitempty"`
}

// Fraction is numerator/denominator, as in Gateway API.
//
// +kubebuilder:validation:XValidation:rule="self.numerator <= self.denominator",message="numerator must not exceed denominator"
type Fraction struct {
	// +required
	// +kubebuilder:validation:Minimum=0
	Numerator int32 `json:"numerator"`
	// +optional
	// +kubebuilder:default=100
	// +kubebuilder:validation:Minimum=1
	Denominator int32 `json:"denominator,omitempty"`
}

// FaultDelay delays a share of requests; percent or fraction (not both)
// give the share, default all.
//
// +kubebuilder:validation:XValidation:rule="!(has(self.percent) && has(self.fraction))",message="percent and fraction are mutually exclusive"
type FaultDelay struct {
	// +optional
	// +kubebuilder:validation:Minimum=0
	// +kubebuilder:validation:Maximum=100
	Percent *int32 `json:"percent,omitempty"`
	// +optional
	Fraction *Fraction `json:"fraction,omitempty"`
	// FixedDelay is how long to delay.
	// +required
	FixedDelay Duration `json:"fixedDelay"`
}

// FaultAbort answers a share of requests with an error; percent or
// fraction (not both) give the share, default all.
//
// +kubebuilder:validation:XValidation:rule="!(has(self.percent) && has(self.fraction))",message="percent and fraction are mutually exclusive"
type FaultAbort struct {
	// +optional
	// +kubebuilder:validation:Minimum=0
	// +kubebuilder:validation:Maximum=100
	Percent *int32 `json:"percent,omitempty"`
	// +optional
	Fraction *Fraction `json:"fraction,omitempty"`
	// HTTPStatus answered.
	// +required
	// +kubebuilder:validation:Minimum=200
	// +kubebuilder:validation:Maximum=599
	HTTPStatus int32 `json:"httpStatus"`
	// GRPCStatus answered instead on gRPC requests.
	// +optional
	// +kubebuilder:validation:Minimum=0
	// +kubebuilder:validation:Maximum=16
	GRPCStatus *int32 `json:"grpcStatus,omitempty"`
}

// PolicyStatus is the observed state of a policy.
type PolicyStatus struct {
	// ObservedGeneration is the metadata.generation the status was computed
	// for.
	// +optional
	ObservedGeneration int64 `json:"observedGeneration,omitempty"`
	// Conditions describe whether and where the policy is enforced.
	// +optional
	// +listType=map
	// +listMapKey=type
	// +kubebuilder:validation:MaxItems=8
	Conditions []metav1.Condition `json:"conditions,omitempty"`
}

// BackendTrafficPolicy sets load balancing, circuit breaking, outlier
// detection, connection pool, local rate limit and fault injection for
// traffic that waypoints send to a Service.
//
// +kubebuilder:object:root=true
// +kubebuilder:subresource:status
// +kubebuilder:resource:shortName=btp,categories=amesh
// +kubebuilder:printcolumn:name="Accepted",type=string,JSONPath=`.status.conditions[?(@.type=="Accepted")].status`
// +kubebuilder:printcolumn:name="Age",type=date,JSONPath=`.metadata.creationTimestamp`
type BackendTrafficPolicy struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	// +required
	Spec BackendTrafficPolicySpec `json:"spec"`
	// +optional
	Status PolicyStatus `json:"status,omitempty"`
}

// BackendTrafficPolicyList is a list of BackendTrafficPolicy.
//
// +kubebuilder:object:root=true
type BackendTrafficPolicyList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []BackendTrafficPolicy `json:"items"`
}
