package app

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"testing"
	"time"

	discoveryv1 "github.com/amesh-dev/amesh/api/discovery/v1"
	"github.com/amesh-dev/amesh/api/hbone"
	"github.com/amesh-dev/amesh/api/identity"
	"github.com/go-jose/go-jose/v4/jwt"
)

// tcpEcho serves "echo:<line>" for each line on ip (a port no Service
// declares) and returns its address.
func tcpEcho(t *testing.T, ip netip.Addr) netip.AddrPort {
	t.Helper()
	ln, err := net.Listen("tcp", netip.AddrPortFrom(ip, 0).String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				b := make([]byte, 256)
				n, _ := c.Read(b)
				fmt.Fprintf(c, "echo:%s", b[:n])
			}()
		}
	}()
	return netip.MustParseAddrPort(ln.Addr().String())
}

// TestPerServiceAccountWaypoint: a waypoint for a service account serves
// the traffic ztunnel sends it addressed to its workloads (podIP:targetPort,
// the Service having no waypoint of its own) with the Gateway-targeted
// policies of its WaypointGateway — path DENY, JWT authentication and a
// request-principal requirement — at L7 on the port the Service declares
// HTTP, and at L4 under L4 policy on a port no Service declares. Workloads
// not bound to it are refused. Real HBONE on both sides.
func TestPerServiceAccountWaypoint(t *testing.T) {
	c := newController(t)
	hbonePort := freePortOn(t, netip.MustParseAddr("127.0.0.1"))
	wpID, _ := identity.ID(td, "default", "waypoint")
	app := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "details %s auth=%q", r.URL.Path, r.Header.Get("Authorization"))
	})
	bound := startPod(t, c, hbonePort, wpID, key("details"), 9080, "details", app, nil)
	unbound := startPod(t, c, hbonePort, wpID, key("details"), 9080, "other", app, nil)
	// Bound through the per-service-account waypoint (as the controller
	// sets it for amesh.dev/for-service-account=details).
	bound.workload.Waypoint = &discoveryv1.GatewayAddress{Gateway: "default/waypoint", HbonePort: 15008}
	echo := tcpEcho(t, bound.ip)

	details := service("details", netip.MustParseAddr("10.96.3.1"), 9080, "http")
	details.Waypoint = nil // the Service itself has no waypoint
	c.set(discoveryv1.ServiceType, details)
	c.set(discoveryv1.WorkloadType, bound.workload, unbound.workload)
	c.set(discoveryv1.WaypointServiceType)
	signKey, jwks := signer(t)
	const iss = "https://issuer.example"
	jwtPolicy := []*discoveryv1.RequestAuthentication{{Namespace: "default", Name: "jwt", JwtRules: []*discoveryv1.JWTRule{{
		Issuer: iss, Audiences: []string{"details"}, Jwks: jwks}}}}
	c.set(discoveryv1.WaypointGatewayType, &discoveryv1.WaypointGateway{Gateway: "default/waypoint",
		RequestAuthentications: jwtPolicy,
		Authorizations: []*discoveryv1.Authorization{
			{Namespace: "default", Name: "no-admin", Action: discoveryv1.Authorization_ACTION_DENY,
				Rules: []*discoveryv1.Rule{{To: []*discoveryv1.Operation{{Paths: []string{"/admin*"}}}}}},
			{Namespace: "default", Name: "private-needs-jwt", Action: discoveryv1.Authorization_ACTION_DENY,
				Rules: []*discoveryv1.Rule{{From: []*discoveryv1.Source{{NotRequestPrincipals: []string{"*"}}},
					To: []*discoveryv1.Operation{{Paths: []string{"/private*"}}}}}},
		}},
		// Another Gateway's resource (the controller may show it to every
		// waypoint) must not apply here.
		&discoveryv1.WaypointGateway{Gateway: "default/other-waypoint"})
	wp := startWaypoint(t, c, hbonePort)
	cl := newClient(t, c, wp)
	pod := cl.http1(netip.AddrPortFrom(bound.ip, bound.appPort))
	now := time.Now()
	valid := token(t, signKey, jwt.Claims{Issuer: iss, Subject: "alice", Audience: jwt.Audience{"details"}, Expiry: jwt.NewNumericDate(now.Add(time.Hour))})
	expired := token(t, signKey, jwt.Claims{Issuer: iss, Subject: "alice", Audience: jwt.Audience{"details"}, Expiry: jwt.NewNumericDate(now.Add(-time.Hour))})
	wrongAud := token(t, signKey, jwt.Claims{Issuer: iss, Subject: "alice", Audience: jwt.Audience{"api"}, Expiry: jwt.NewNumericDate(now.Add(time.Hour))})

	for _, tc := range []struct {
		name, path, token string
		code              int
		body              string
	}{
		{"default route to the workload", "/books", "", 200, `details /books auth=""`},
		{"gateway DENY by path", "/admin/users", "", 403, "RBAC: access denied"},
		{"gateway DENY by path even with a token", "/admin", valid, 403, "RBAC: access denied"},
		{"private without a token", "/private/x", "", 403, "RBAC: access denied"},
		{"private with a valid token (forwarded without it)", "/private/x", valid, 200, `details /private/x auth=""`},
		{"expired token", "/books", expired, 401, "Jwt verification fails"},
		{"wrong audience", "/books", wrongAud, 401, "Jwt verification fails"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			req, _ := http.NewRequest("GET", "http://details"+tc.path, nil)
			if tc.token != "" {
				req.Header.Set("Authorization", "Bearer "+tc.token)
			}
			resp, err := pod.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != tc.code || !strings.HasPrefix(string(b), tc.body) {
				t.Fatalf("%d %q, want %d %q", resp.StatusCode, b, tc.code, tc.body)
			}
			if tc.code == 401 && !strings.Contains(resp.Header.Get("Www-Authenticate"), `error="invalid_token"`) {
				t.Fatalf("401 without a bearer challenge: %v", resp.Header)
			}
		})
	}
	t.Run("destination saw the waypoint's identity", func(t *testing.T) {
		select {
		case peer := <-bound.peers:
			if peer != wpID {
				t.Fatalf("destination saw %s", peer)
			}
		default:
			t.Fatal("destination HBONE server saw no tunnel")
		}
	})
	t.Run("unbound workload refused", func(t *testing.T) {
		for _, target := range []netip.AddrPort{netip.AddrPortFrom(unbound.ip, unbound.appPort), netip.AddrPortFrom(unbound.ip, 1)} {
			if _, err := cl.dial(target)(context.Background(), "", ""); !errors.Is(err, hbone.ErrBadTarget) {
				t.Fatalf("%s: %v, want 400", target, err)
			}
		}
	})
	l4 := func() (string, error) {
		conn, err := cl.dial(echo)(context.Background(), "", "")
		if err != nil {
			return "", err
		}
		defer conn.Close()
		_, _ = io.WriteString(conn, "hello")
		b, err := io.ReadAll(conn)
		return string(b), err
	}
	t.Run("undeclared port is L4: the DENY policies deny it", func(t *testing.T) {
		// At L4 a DENY rule's HTTP fields cannot be evaluated and are
		// ignored, so the path DENY denies every TCP connection.
		if _, err := l4(); !errors.Is(err, hbone.ErrDenied) {
			t.Fatalf("got %v, want 401", err)
		}
	})
	t.Run("undeclared port is L4 passthrough once allowed", func(t *testing.T) {
		c.set(discoveryv1.WaypointGatewayType, &discoveryv1.WaypointGateway{Gateway: "default/waypoint", RequestAuthentications: jwtPolicy,
			Authorizations: []*discoveryv1.Authorization{{Namespace: "default", Name: "frontend-only",
				Rules: []*discoveryv1.Rule{{From: []*discoveryv1.Source{{Namespaces: []string{"frontend"}}}}}}}})
		deadline := time.Now().Add(10 * time.Second)
		for {
			got, err := l4()
			if err == nil && got == "echo:hello" {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("L4 passthrough: %q %v", got, err)
			}
			time.Sleep(20 * time.Millisecond)
		}
		// The new policy applies at L7 too: /admin is no longer denied.
		resp, err := pod.Get("http://details/admin")
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != 200 {
			t.Fatalf("/admin after the update: %d", resp.StatusCode)
		}
	})
	t.Run("tcp metrics for the workload", func(t *testing.T) {
		resp, err := http.Get("http://" + wp.metric + "/metrics")
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		for _, want := range []string{`destination_principal="spiffe://cluster.local/ns/default/sa/details"`, `response_code="403"`,
			`response_code="401"`, `istio_tcp_connections_opened_total{`} {
			if !bytes.Contains(b, []byte(want)) {
				t.Errorf("metrics lack %s", want)
			}
		}
	})
}

// TestRefusesUntilSynced: before the initial discovery state has arrived
// — every subscribed type, not only services, workloads and waypoint
// services — the waypoint refuses every tunnel with 503 and is not ready;
// once synced it serves service traffic, but refuses traffic for a
// workload bound to it (503) until its WaypointGateway arrives.
func TestRefusesUntilSynced(t *testing.T) {
	c := newController(t)
	hbonePort := freePortOn(t, netip.MustParseAddr("127.0.0.1"))
	wpID, _ := identity.ID(td, "default", "waypoint")
	app := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { fmt.Fprint(w, "ok") })
	p := startPod(t, c, hbonePort, wpID, key("shop"), 80, "shop", app, nil)
	p.workload.Waypoint = &discoveryv1.GatewayAddress{Gateway: "default/waypoint", HbonePort: 15008}
	vip := netip.AddrPortFrom(netip.MustParseAddr("10.96.4.1"), 80)
	podAddr := netip.AddrPortFrom(p.ip, p.appPort)

	wp := launchWaypoint(t, c, hbonePort)
	cl := newClient(t, c, wp)
	// Wait until the waypoint answers CONNECT at all (its certificate is
	// issued); it must then answer 503.
	deadline := time.Now().Add(20 * time.Second)
	for {
		_, err := cl.dial(vip)(context.Background(), "", "")
		if errors.Is(err, hbone.ErrUnreachable) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("before sync: %v, want 503", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	if _, err := cl.dial(podAddr)(context.Background(), "", ""); !errors.Is(err, hbone.ErrUnreachable) {
		t.Fatalf("bound workload before sync: %v, want 503", err)
	}
	if resp, err := http.Get("http://" + wp.ready + "/healthz/ready"); err != nil || resp.StatusCode != 503 {
		t.Fatalf("ready before sync: %v %v", resp, err)
	} else {
		resp.Body.Close()
	}

	c.set(discoveryv1.ServiceType, service("shop", vip.Addr(), 80, "http"))
	c.set(discoveryv1.WorkloadType, p.workload)
	c.set(discoveryv1.WaypointServiceType, &discoveryv1.WaypointService{Service: key("shop"), Gateway: "default/waypoint"})
	// The WaypointGateway type has no state yet: not synced.
	deadline = time.Now().Add(10 * time.Second)
	for len(wp.app.xds.Versions(discoveryv1.WaypointServiceType)) == 0 {
		if time.Now().After(deadline) {
			t.Fatal("waypoint services never arrived")
		}
		time.Sleep(20 * time.Millisecond)
	}
	if resp, err := http.Get("http://" + wp.ready + "/healthz/ready"); err != nil || resp.StatusCode != 503 {
		t.Fatalf("ready before the WaypointGateway type synced: %v %v", resp, err)
	} else {
		resp.Body.Close()
	}
	if _, err := cl.dial(vip)(context.Background(), "", ""); !errors.Is(err, hbone.ErrUnreachable) {
		t.Fatalf("service traffic before the WaypointGateway type synced: %v, want 503", err)
	}
	// Synced without this waypoint's WaypointGateway (another's only).
	c.set(discoveryv1.WaypointGatewayType, &discoveryv1.WaypointGateway{Gateway: "default/other"})
	wp.waitReady(t)
	get := func(target netip.AddrPort) (int, error) {
		resp, err := cl.http1(target).Get("http://shop/")
		if err != nil {
			return 0, err
		}
		resp.Body.Close()
		return resp.StatusCode, nil
	}
	if code, err := get(vip); err != nil || code != 200 {
		t.Fatalf("service traffic once synced: %d %v", code, err)
	}
	if _, err := cl.dial(podAddr)(context.Background(), "", ""); !errors.Is(err, hbone.ErrUnreachable) {
		t.Fatalf("bound workload without a WaypointGateway: %v, want 503", err)
	}
	c.set(discoveryv1.WaypointGatewayType, &discoveryv1.WaypointGateway{Gateway: "default/waypoint"})
	deadline = time.Now().Add(10 * time.Second)
	for {
		code, err := get(podAddr)
		if err == nil && code == 200 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("bound workload once the WaypointGateway arrived: %d %v", code, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
