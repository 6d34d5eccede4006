// Package app wires ztunnel together: the discovery client feeding the
// store, the certificate store backed by the controller's CA, the node
// agent client handing pods to the proxy, and the admin, metrics and
// readiness servers. Run blocks until its context ends and every part has
// drained and stopped.
package app

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"strings"

	"github.com/amesh-dev/amesh/api/bearer"
	"github.com/amesh-dev/amesh/api/ca"
	"github.com/amesh-dev/amesh/api/capture"
	discoveryv1 "github.com/amesh-dev/amesh/api/discovery/v1"
	"github.com/amesh-dev/amesh/api/identity"
	"github.com/amesh-dev/amesh/api/xds/xdsclient"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"go.uber.org/zap"
	"golang.org/x/sync/errgroup"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/structpb"

	"github.com/amesh-dev/amesh/ztunnel/internal/admin"
	"github.com/amesh-dev/amesh/ztunnel/internal/agent"
	"github.com/amesh-dev/amesh/ztunnel/internal/config"
	"github.com/amesh-dev/amesh/ztunnel/internal/proxy"
	"github.com/amesh-dev/amesh/ztunnel/internal/route"
	"github.com/amesh-dev/amesh/ztunnel/internal/store"
	"github.com/amesh-dev/amesh/ztunnel/internal/telemetry"
)

// TypeURLs are the discovery types ztunnel subscribes to, in order.
var TypeURLs = []string{
	discoveryv1.TrustBundleType,
	discoveryv1.ServiceType,
	discoveryv1.WorkloadType,
	discoveryv1.AuthorizationType,
}

// Run runs ztunnel until ctx ends.
func Run(ctx context.Context, cfg config.Config, log *zap.Logger) error {
	if err := cfg.Validate(); err != nil {
		return fmt.Errorf("config: %w", err)
	}
	td, err := spiffeid.TrustDomainFromString(cfg.TrustDomain)
	if err != nil {
		return fmt.Errorf("trust domain: %w", err)
	}
	rootPEM, err := os.ReadFile(cfg.RootCertFile)
	if err != nil {
		return fmt.Errorf("root certificates: %w", err)
	}
	bundle := identity.NewBundle()
	if err := bundle.SetPEM(td, rootPEM); err != nil {
		return fmt.Errorf("root certificates: %w", err)
	}

	token := func(context.Context) (string, error) {
		b, err := os.ReadFile(cfg.TokenFile)
		if err != nil {
			return "", fmt.Errorf("service-account token: %w", err)
		}
		return strings.TrimSpace(string(b)), nil
	}
	conn, err := grpc.NewClient(cfg.Controller,
		// The controller is verified at each handshake against the roots
		// discovery publishes and those of the root file now (a root
		// rotation; identity.ControllerRoots).
		grpc.WithTransportCredentials(credentials.NewTLS(identity.ControllerTLS(cfg.ControllerName, identity.ControllerRoots(bundle, td, cfg.RootCertFile)))),
		grpc.WithPerRPCCredentials(bearer.PerRPC(token)),
	)
	if err != nil {
		return fmt.Errorf("controller connection: %w", err)
	}
	defer conn.Close()

	st := store.New(cfg.TrustDomain)
	certs := identity.NewStore(ca.NewClient(conn, nil) /* the conn carries the token */, identity.StoreOptions{TTL: cfg.CertTTL, Logger: log.Named("certs")})
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	var accessLog *zap.Logger
	if cfg.AccessLog {
		accessLog = log.Named("access")
	}
	px := proxy.New(proxy.Config{
		Store: st, Router: route.New(st), Certs: certs, Bundle: bundle,
		Metrics: telemetry.NewMetrics(reg), Logger: log.Named("proxy"), AccessLog: accessLog,
		TrustDomain: cfg.TrustDomain, Mark: capture.Mark,
		ConnectTimeout: cfg.ConnectTimeout, DrainTimeout: cfg.DrainTimeout,
	})
	ag := agent.New(cfg.ZDSSocket, px, log.Named("agent"))
	meta, err := structpb.NewStruct(map[string]any{
		"kind": "ztunnel", "node": cfg.NodeName, "namespace": cfg.PodNamespace, "pod": cfg.PodName,
	})
	if err != nil {
		return fmt.Errorf("node metadata: %w", err)
	}
	nodeID := cfg.PodName
	if nodeID == "" {
		nodeID = "ztunnel-" + cfg.NodeName
	}
	xc := xdsclient.New(xdsclient.Options{
		Conn:     conn,
		Node:     &xdsclient.Node{ID: nodeID, Metadata: meta},
		TypeURLs: TypeURLs,
		Handler:  xdsclient.HandlerFunc(func(typeURL string, ups []*xdsclient.Resource, rm []string) error { return apply(st, typeURL, ups, rm) }),
		Logger:   log.Named("xds"),
	})
	synced := func() bool {
		select {
		case <-xc.Synced():
			return true
		default:
			return false
		}
	}
	adm := admin.New(admin.Config{
		AdminAddr: cfg.AdminAddr, MetricsAddr: cfg.MetricsAddr, ReadyAddr: cfg.ReadyAddr,
		Gatherer: reg,
		Ready: func() error {
			if !synced() {
				return errors.New("discovery not synced")
			}
			return ag.Ready()
		},
		Dump:   func() any { return dump(st, certs, px, synced()) },
		Logger: log.Named("admin"),
	})
	if err := adm.Listen(); err != nil {
		return err
	}

	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error { return certs.Run(gctx) })
	g.Go(func() error { return xc.Run(gctx) })
	g.Go(func() error { followBundles(gctx, st, bundle, td, rootPEM, log); return nil })
	g.Go(func() error { return px.Run(gctx) })
	g.Go(func() error {
		// Take pods only once discovery has the full picture: before that
		// every destination looks unknown and would pass through in
		// plaintext. Until then the capture rules send the pods' traffic
		// to listeners that do not exist yet, and it is refused.
		select {
		case <-xc.Synced():
		case <-gctx.Done():
			return nil
		}
		log.Info("discovery synced; connecting to the node agent")
		return ag.Run(gctx)
	})
	g.Go(func() error { return adm.Run(gctx) })
	log.Info("ztunnel started", zap.String("node", cfg.NodeName), zap.String("controller", cfg.Controller))
	return g.Wait()
}

// apply feeds one discovery response into the store. Resources the store
// rejects are reported to the discovery client as such (it NACKs naming
// them and keeps track of the rest, which the store applied).
func apply(st *store.Store, typeURL string, ups []*xdsclient.Resource, rm []string) error {
	rs := make([]store.Resource, len(ups))
	for i, u := range ups {
		rs[i] = store.Resource{Name: u.Name, Body: u.Body}
	}
	err := st.Apply(typeURL, rs, rm)
	if rej, ok := errors.AsType[*store.RejectedError](err); ok {
		return &xdsclient.RejectedError{Rejected: rej.Rejected}
	}
	return err
}

// followBundles keeps the HBONE trust bundle equal to the roots published
// through discovery, falling back to the root file for the mesh's trust
// domain while discovery publishes none.
func followBundles(ctx context.Context, st *store.Store, b *identity.Bundle, td spiffeid.TrustDomain, rootPEM []byte, log *zap.Logger) {
	known := map[string]bool{}
	for {
		ch := st.Changed()
		roots := st.Roots()
		for name, rs := range roots {
			t, err := spiffeid.TrustDomainFromString(name)
			if err != nil {
				continue
			}
			b.Set(t, rs)
			known[name] = true
		}
		for name := range known {
			if _, ok := roots[name]; ok {
				continue
			}
			delete(known, name)
			t, err := spiffeid.TrustDomainFromString(name)
			if err != nil {
				continue
			}
			if t == td {
				if err := b.SetPEM(td, rootPEM); err != nil {
					log.Warn("restoring file roots", zap.Error(err))
				}
			} else {
				b.Set(t, nil)
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-ch:
		}
	}
}

func protoList[M proto.Message](ms []M) []json.RawMessage {
	out := make([]json.RawMessage, 0, len(ms))
	for _, m := range ms {
		b, err := protojson.Marshal(m)
		if err != nil {
			continue
		}
		out = append(out, b)
	}
	return out
}

func dump(st *store.Store, certs *identity.Store, px *proxy.Proxy, synced bool) any {
	d := st.Snapshot()
	return map[string]any{
		"discovery": map[string]any{"synced": synced, "version": d.Version},
		"pods":      px.Dump(),
		"workloads": protoList(d.Workloads), "services": protoList(d.Services),
		"authorizations": protoList(d.Authorizations), "trustBundles": d.TrustBundles,
		"endpoints": d.Endpoints, "rejected": d.Rejected, "certificates": certs.Snapshot(),
	}
}
