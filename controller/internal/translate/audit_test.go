package translate

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// crossNamespaceEndpoints: namespace "evil" owns a selector-less Service
// bound to its own waypoint, and an EndpointSlice whose endpoint names a
// pod of namespace "victim" by targetRef. Kubernetes accepts such a slice
// (and the EndpointSlice mirroring controller writes one from a plain
// Endpoints object, which the namespace "edit" role may create).
const crossNamespaceEndpoints = `
apiVersion: v1
kind: Namespace
metadata: {name: victim, labels: {amesh.dev/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: evil, labels: {amesh.dev/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata:
  name: db
  namespace: victim
  uid: 11111111-1111-1111-1111-111111111111
  labels: {app: db}
  annotations: {amesh.dev/redirection: enabled}
spec:
  nodeName: node-1
  serviceAccountName: db
  containers: [{name: db, image: db}]
status:
  phase: Running
  podIP: 10.0.0.5
  podIPs: [{ip: 10.0.0.5}]
  conditions: [{type: Ready, status: "True"}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: wp, namespace: evil, uid: 22222222-2222-2222-2222-222222222222}
spec:
  gatewayClassName: amesh-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
---
apiVersion: v1
kind: Service
metadata:
  name: grab
  namespace: evil
  labels: {amesh.dev/use-waypoint: wp}
spec:
  clusterIP: 10.96.0.50
  ports: [{name: pg, port: 5432, protocol: TCP}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: grab-1
  namespace: evil
  labels: {kubernetes.io/service-name: grab}
addressType: IPv4
ports: [{name: pg, port: 5432, protocol: TCP}]
endpoints:
- addresses: [10.0.0.5]
  conditions: {ready: true}
  targetRef: {kind: Pod, namespace: victim, name: db}
`

// TestAuditEndpointSliceCannotAdoptPodOfAnotherNamespace: a pod's services
// map decides which waypoints its ztunnel admits without applying the
// pod's own L4 policies (route.Router.Waypoints). A slice in another
// namespace must not put that namespace's Service (and its waypoint) on
// the pod.
func TestAuditEndpointSliceCannotAdoptPodOfAnotherNamespace(t *testing.T) {
	f := filepath.Join(t.TempDir(), "x.in.yaml")
	if err := os.WriteFile(f, []byte(crossNamespaceEndpoints), 0o644); err != nil {
		t.Fatal(err)
	}
	out := Translate(Config{}, loadInput(t, f))
	found := false
	for _, w := range out.Workloads {
		if w.Namespace != "victim" || w.Name != "db" {
			continue
		}
		found = true
		for svc := range w.Services {
			if strings.HasPrefix(svc, "evil/") {
				t.Errorf("victim/db lists %s among its services: the waypoint of namespace evil is then admitted by victim/db's ztunnel without victim's L4 policies", svc)
			}
		}
	}
	if !found {
		t.Fatal("no workload for victim/db")
	}
}

