package proxy

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"

	"github.com/amesh-dev/amesh/api/hbone"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"go.uber.org/zap"

	"github.com/amesh-dev/amesh/ztunnel/internal/netns"
	"github.com/amesh-dev/amesh/ztunnel/internal/route"
)

// tunnel is the HBONE side of one pod: a client that dials from inside the
// pod's namespace with the pod's certificate, and the server of the pod's
// 15008 listener, presenting the pod's certificate.
type tunnel struct {
	pd     *pod
	client *hbone.Client
	server *hbone.Server
	ctx    context.Context // Serve's context: cancelled to stop and drain
	cancel context.CancelFunc
}

func newTunnel(pd *pod) *tunnel {
	p := pd.p
	t := &tunnel{pd: pd}
	t.ctx, t.cancel = context.WithCancel(context.Background())
	t.client = hbone.NewClient(hbone.ClientConfig{
		Certificates: p.cfg.Certs.Certificate,
		Bundle:       p.cfg.Bundle,
		Dial: func(ctx context.Context, network, addr string) (net.Conn, error) {
			return pd.ns.Dial(ctx, network, addr, netip.Addr{}, netns.SockOpts{Mark: p.cfg.Mark})
		},
		Logger: p.log.Named("hbone-client").With(zap.String("pod", pd.name())),
	})
	t.server = hbone.NewServer(hbone.ServerConfig{
		Certificate: func(h *tls.ClientHelloInfo) (*tls.Certificate, error) {
			return p.cfg.Certs.Certificate(h.Context(), pd.id)
		},
		Bundle:       p.cfg.Bundle,
		TrustDomain:  pd.id.TrustDomain(),
		Handler:      p.hboneHandler(pd),
		Logger:       p.log.Named("hbone-server").With(zap.String("pod", pd.name())),
		DrainTimeout: p.cfg.DrainTimeout,
	})
	return t
}

// dial opens an HBONE stream to a target as the pod.
func (t *tunnel) dial(ctx context.Context, target route.Target, src netip.Addr) (net.Conn, error) {
	h := http.Header{}
	if src.IsValid() {
		h.Set("Forwarded", forwardedFor(src))
	}
	c, err := t.client.Dial(ctx, hbone.DialRequest{
		Source:   t.pd.id,
		Expected: []spiffeid.ID{target.Identity},
		Proxy:    target.Proxy,
		Target:   target.Authority,
		PoolKey:  t.pd.uid,
		Header:   h,
	})
	if err != nil {
		if errors.Is(err, hbone.ErrDenied) {
			return nil, fmt.Errorf("%w: %w", errDenied, err)
		}
		return nil, err
	}
	return c, nil
}

// forwardedFor renders an RFC 7239 Forwarded header for the client.
func forwardedFor(a netip.Addr) string {
	if a.Is6() {
		return `for="[` + a.String() + `]"`
	}
	return "for=" + a.String()
}

// serve runs the HBONE server on the pod's 15008 listener until the pod
// stops accepting; it returns after the server drained.
func (t *tunnel) serve(ln net.Listener) {
	if err := t.server.Serve(t.ctx, ln); err != nil {
		t.pd.p.log.Warn("HBONE server stopped", zap.String("pod", t.pd.name()), zap.Error(err))
	}
}

// stopAccepting makes the server stop accepting, send GOAWAY and drain.
func (t *tunnel) stopAccepting() { t.cancel() }

// close stops the server and closes the client's pooled connections.
func (t *tunnel) close() {
	t.cancel()
	_ = t.client.Close()
}
