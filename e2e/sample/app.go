package sample

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"time"

	"go.uber.org/zap"
	"google.golang.org/grpc"

	ratingsv1 "github.com/amesh-dev/amesh/e2e/sample/ratings/v1"
)

// App is one instance of the sample application.
type App struct {
	cfg Config
	log *zap.Logger

	// Exactly one of web and ratings is set.
	web     *httpServer
	ratings *ratingsServer
	// conn is reviews v2's connection to ratings.
	conn *grpc.ClientConn
}

// Option adjusts an App (tests).
type Option func(*options)

type options struct{ random func() float64 }

// WithRandom sets the source of the random fractions of fail specs.
func WithRandom(f func() float64) Option { return func(o *options) { o.random = f } }

// New validates cfg and allocates the instance; it does no I/O.
func New(cfg Config, log *zap.Logger, opts ...Option) (*App, error) {
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("sample config: %w", err)
	}
	var o options
	for _, f := range opts {
		f(&o)
	}
	a := &App{cfg: cfg, log: log}
	switch cfg.Role {
	case RoleRatings:
		a.ratings = newRatingsServer(cfg, log, o.random)
		return a, nil
	case RoleProductPage:
		a.web = newHTTPServer(cfg, log, o.random)
		a.web.registerProductPage(upstreamClient())
	case RoleDetails:
		a.web = newHTTPServer(cfg, log, o.random)
		a.web.registerDetails()
	case RoleReviews:
		a.web = newHTTPServer(cfg, log, o.random)
		var client ratingsv1.RatingsClient
		if cfg.Version != "v1" {
			conn, err := dialRatings(cfg.RatingsAddr)
			if err != nil {
				return nil, err
			}
			a.conn = conn
			client = ratingsv1.NewRatingsClient(conn)
		}
		a.web.registerReviews(client)
	case RoleClient:
		a.web = newHTTPServer(cfg, log, o.random)
		a.web.registerClient()
	}
	return a, nil
}

// Run listens on the configured address and serves until ctx ends, then
// drains (within the drain timeout) and returns.
func (a *App) Run(ctx context.Context) error {
	var lc net.ListenConfig
	ln, err := lc.Listen(ctx, "tcp", a.cfg.Listen)
	if err != nil {
		return fmt.Errorf("listen %s: %w", a.cfg.Listen, err)
	}
	return a.Serve(ctx, ln)
}

// Serve serves on ln (which it closes) until ctx ends, then drains and
// returns. It returns only after every goroutine it started has exited.
func (a *App) Serve(ctx context.Context, ln net.Listener) error {
	if a.conn != nil {
		defer a.conn.Close()
	}
	a.log.Info("serving", zap.String("role", string(a.cfg.Role)), zap.String("version", a.cfg.Version),
		zap.Stringer("addr", ln.Addr()))
	if a.ratings != nil {
		return a.serveGRPC(ctx, ln)
	}
	return a.serveHTTP(ctx, ln)
}

func (a *App) serveHTTP(ctx context.Context, ln net.Listener) error {
	var protocols http.Protocols
	protocols.SetHTTP1(true)
	protocols.SetUnencryptedHTTP2(true) // h2c: what a waypoint may speak upstream
	srv := &http.Server{
		Handler:           a.web,
		Protocols:         &protocols,
		ReadHeaderTimeout: 10 * time.Second,
		IdleTimeout:       2 * time.Minute,
		MaxHeaderBytes:    64 << 10,
		ErrorLog:          zap.NewStdLog(a.log.Named("http")),
	}
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	select {
	case err := <-errc:
		return fmt.Errorf("serve: %w", err)
	case <-ctx.Done():
	}
	drain, cancel := context.WithTimeout(context.Background(), a.cfg.DrainTimeout)
	defer cancel()
	err := srv.Shutdown(drain)
	if err != nil {
		err = errors.Join(fmt.Errorf("drain: %w", err), srv.Close())
	}
	if serr := <-errc; !errors.Is(serr, http.ErrServerClosed) {
		err = errors.Join(err, serr)
	}
	return err
}

func (a *App) serveGRPC(ctx context.Context, ln net.Listener) error {
	g, health := a.ratings.grpcServer()
	errc := make(chan error, 1)
	go func() { errc <- g.Serve(ln) }()
	select {
	case err := <-errc:
		return fmt.Errorf("serve: %w", err)
	case <-ctx.Done():
	}
	health.Shutdown() // NOT_SERVING while draining
	stopped := make(chan struct{})
	go func() {
		g.GracefulStop()
		close(stopped)
	}()
	t := time.NewTimer(a.cfg.DrainTimeout)
	defer t.Stop()
	select {
	case <-stopped:
	case <-t.C:
		g.Stop()
		<-stopped
	}
	if err := <-errc; err != nil && !errors.Is(err, grpc.ErrServerStopped) {
		return fmt.Errorf("serve: %w", err)
	}
	return nil
}
