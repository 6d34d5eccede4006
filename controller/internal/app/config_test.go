package app

import (
	"strings"
	"testing"
)

// TestWaypointOptions: the deployer gets the controller's shared settings
// and an address of this controller that its serving certificate names.
func TestWaypointOptions(t *testing.T) {
	for _, tc := range []struct {
		name                 string
		mutate               func(*Config)
		controller, sni, img string
	}{
		{"defaults", func(*Config) {}, "amesh-controller.amesh-system.svc:15012", "amesh-controller.amesh-system.svc", "ghcr.io/amesh-dev/waypoint:latest"},
		{"grpc port", func(c *Config) { c.GRPCAddr = ":9443" }, "amesh-controller.amesh-system.svc:9443", "amesh-controller.amesh-system.svc", ""},
		{"ephemeral port", func(c *Config) { c.GRPCAddr = "127.0.0.1:0" }, "amesh-controller.amesh-system.svc:15012", "", ""},
		{"namespace and service", func(c *Config) { c.Namespace, c.ServiceName = "mesh", "ctl" }, "ctl.mesh.svc:15012", "ctl.mesh.svc", ""},
		{"explicit address", func(c *Config) { c.WaypointController = "10.0.0.1:15012" }, "10.0.0.1:15012", "amesh-controller.amesh-system.svc", ""},
		{"image from the environment", func(c *Config) {
			c.ApplyEnv(func(k string) string {
				if k == "WAYPOINT_IMAGE" {
					return "example/wp:1"
				}
				return ""
			})
		}, "", "", "example/wp:1"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := Default()
			tc.mutate(&c)
			if err := c.Validate(); err != nil {
				t.Fatal(err)
			}
			o := c.waypointOptions()
			if tc.controller != "" && o.Controller != tc.controller {
				t.Errorf("controller %q, want %q", o.Controller, tc.controller)
			}
			if tc.sni != "" && o.ControllerServerName != tc.sni {
				t.Errorf("server name %q, want %q", o.ControllerServerName, tc.sni)
			}
			if tc.img != "" && o.Image != tc.img {
				t.Errorf("image %q, want %q", o.Image, tc.img)
			}
			if o.TrustDomain != c.TrustDomain || o.ClusterDomain != c.ClusterDomain || o.ClusterID != c.ClusterID ||
				o.RootCertConfigMap != c.RootCertConfigMap || o.TokenAudience != c.TokenAudience || o.Class != c.WaypointClass {
				t.Errorf("shared settings not taken from the controller's: %+v", o)
			}
		})
	}
}

// TestValidateWaypoint: a bad waypoint setting is reported, unless the
// deployer is off.
func TestValidateWaypoint(t *testing.T) {
	c := Default()
	c.Waypoint.Image = "not an image"
	err := c.Validate()
	if err == nil || !strings.Contains(err.Error(), "waypoint deployer") {
		t.Fatalf("Validate: %v, want a waypoint deployer error", err)
	}
	c.DeployWaypoints = false
	if err := c.Validate(); err != nil {
		t.Fatalf("deployer off: %v", err)
	}
}
