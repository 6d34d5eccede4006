package hbone

import (
	"context"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/amesh-dev/amesh/api/identity"
	"github.com/amesh-dev/amesh/api/identity/identitytest"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// countingListener counts accepted connections.
type countingListener struct {
	net.Listener
	n atomic.Int32
}

func (l *countingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err == nil {
		l.n.Add(1)
	}
	return c, err
}

// env is an HBONE server on loopback and a client for it, with certificates
// from a test CA.
type env struct {
	ca               *identitytest.CA
	bundle           *identity.Bundle
	srvCert, cliCert *tls.Certificate
	srvID, cliID     spiffeid.ID
	ln               *countingListener
	addr             netip.AddrPort
	srv              *Server
	stop             context.CancelFunc
	served           chan error
	client           *Client
	dials            atomic.Int32
}

type envOpt func(*ServerConfig, *ClientConfig)

func newEnv(t testing.TB, h Handler, opts ...envOpt) *env {
	t.Helper()
	e := &env{ca: identitytest.Must("cluster.local")}
	e.bundle = e.ca.Bundle()
	e.srvCert, e.srvID = e.ca.MustLeaf("srv-ns", "server")
	e.cliCert, e.cliID = e.ca.MustLeaf("cli-ns", "client")
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	e.ln = &countingListener{Listener: ln}
	e.addr = ln.Addr().(*net.TCPAddr).AddrPort()
	scfg := ServerConfig{
		Certificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) { return e.srvCert, nil },
		Bundle:      e.bundle,
		TrustDomain: e.ca.TrustDomain,
		Handler:     h,
	}
	var d net.Dialer
	ccfg := ClientConfig{
		Certificates: func(context.Context, spiffeid.ID) (*tls.Certificate, error) { return e.cliCert, nil },
		Bundle:       e.bundle,
		Dial: func(ctx context.Context, network, addr string) (net.Conn, error) {
			e.dials.Add(1)
			return d.DialContext(ctx, network, addr)
		},
	}
	for _, o := range opts {
		o(&scfg, &ccfg)
	}
	e.srv = NewServer(scfg)
	ctx, cancel := context.WithCancel(context.Background())
	e.stop = cancel
	e.served = make(chan error, 1)
	go func() { e.served <- e.srv.Serve(ctx, e.ln) }()
	e.client = NewClient(ccfg)
	t.Cleanup(func() {
		e.client.Close()
		e.shutdown(t)
	})
	return e
}

func (e *env) shutdown(t testing.TB) {
	if e.stop == nil {
		return
	}
	e.stop()
	e.stop = nil
	if err := <-e.served; err != nil {
		t.Errorf("Serve: %v", err)
	}
}

func (e *env) req(target string) DialRequest {
	return DialRequest{
		Source:   e.cliID,
		Expected: []spiffeid.ID{e.srvID},
		Proxy:    e.addr,
		Target:   netip.MustParseAddrPort(target),
	}
}

func (e *env) dial(t testing.TB, target string) *Stream {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := e.client.Dial(ctx, e.req(target))
	if err != nil {
		t.Fatalf("Dial: %v", err)
	}
	return c.(*Stream)
}

// echo is a handler whose streams echo what they read until EOF, then
// half-close.
func echo(context.Context, *Request) (func(net.Conn), error) {
	return func(s net.Conn) {
		_, _ = io.Copy(s, s)
		_ = s.(*Stream).CloseWrite()
		// Wait for the client to finish so Close does not reset.
		_, _ = io.Copy(io.Discard, s)
	}, nil
}

// tcpPair returns two ends of a loopback TCP connection.
func tcpPair(t testing.TB) (a, b *net.TCPConn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	var wg sync.WaitGroup
	var acc net.Conn
	var aerr error
	wg.Go(func() { acc, aerr = ln.Accept() })
	c, err := net.Dial("tcp", ln.Addr().String())
	wg.Wait()
	if err != nil || aerr != nil {
		t.Fatal(err, aerr)
	}
	return c.(*net.TCPConn), acc.(*net.TCPConn)
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

var (
	netipZero  netip.AddrPort
	netipPort0 = netip.MustParseAddrPort("10.0.0.1:0")
)
