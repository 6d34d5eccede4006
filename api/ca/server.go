package ca

import (
	"context"
	"crypto/x509"
	"errors"
	"math"
	"sync/atomic"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"

	cav1 "github.com/amesh-dev/amesh/api/ca/v1"
)

// Authorizer decides whether the caller of a gRPC request (its context:
// bearer token via bearer.FromIncoming, peer, TLS state) may obtain a
// certificate for id. It returns nil to allow, or a gRPC status error:
// Unauthenticated when the caller cannot be identified, PermissionDenied when
// it may not have id. Any other error refuses the request with
// PermissionDenied (fail closed).
type Authorizer interface {
	Authorize(ctx context.Context, id spiffeid.ID) error
}

// AuthorizerFunc adapts a function to Authorizer.
type AuthorizerFunc func(ctx context.Context, id spiffeid.ID) error

// Authorize calls f.
func (f AuthorizerFunc) Authorize(ctx context.Context, id spiffeid.ID) error { return f(ctx, id) }

// ServerOptions configures a Server.
type ServerOptions struct {
	// Logger logs refusals (Warn) and issued certificates (Debug). Default:
	// zap.NewNop().
	Logger *zap.Logger
	// OnRefusal, if set, is called for every refused request with the
	// requested identity (as sent) and the status error returned to the
	// caller; status.Code(err) gives the code. For metrics.
	OnRefusal func(ctx context.Context, identity string, err error)
	// OnIssued, if set, is called for every certificate issued.
	OnIssued func(ctx context.Context, id spiffeid.ID)
}

// Server implements cav1.CertificateServiceServer on an Authority.
type Server struct {
	cav1.UnimplementedCertificateServiceServer

	authority atomic.Pointer[Authority]
	authz     Authorizer
	opts      ServerOptions
	log       *zap.Logger
}

var _ cav1.CertificateServiceServer = (*Server)(nil)

// NewServer returns a CertificateService backed by a and guarded by authz.
// A nil authz refuses everything.
func NewServer(a *Authority, authz Authorizer, opts ServerOptions) *Server {
	if opts.Logger == nil {
		opts.Logger = zap.NewNop()
	}
	s := &Server{authz: authz, opts: opts, log: opts.Logger}
	s.authority.Store(a)
	return s
}

// Register registers the service on g.
func (s *Server) Register(g *grpc.Server) { cav1.RegisterCertificateServiceServer(g, s) }

// SetAuthority replaces the signing authority (root rotation); requests in
// flight finish with the old one.
func (s *Server) SetAuthority(a *Authority) { s.authority.Store(a) }

// CreateCertificate authorizes the caller for the requested identity, then
// signs the CSR.
func (s *Server) CreateCertificate(ctx context.Context, req *cav1.CreateCertificateRequest) (*cav1.CreateCertificateResponse, error) {
	a := s.authority.Load()
	id, err := spiffeid.FromString(req.GetIdentity())
	if err != nil {
		return nil, s.refuse(ctx, req.GetIdentity(), status.Errorf(codes.InvalidArgument, "identity %q: %v", req.GetIdentity(), err))
	}
	if err := a.checkID(id); err != nil {
		return nil, s.refuse(ctx, req.GetIdentity(), status.Error(codes.InvalidArgument, err.Error()))
	}
	if s.authz == nil {
		return nil, s.refuse(ctx, req.GetIdentity(), status.Error(codes.PermissionDenied, "no authorizer configured"))
	}
	if err := s.authz.Authorize(ctx, id); err != nil {
		st, ok := status.FromError(err)
		if !ok || st.Code() == codes.OK {
			st = status.New(codes.PermissionDenied, err.Error())
		}
		return nil, s.refuse(ctx, req.GetIdentity(), st.Err())
	}
	secs := req.GetValiditySeconds()
	if secs < 0 {
		return nil, s.refuse(ctx, req.GetIdentity(), status.Errorf(codes.InvalidArgument, "negative validity %d s", secs))
	}
	ttl := time.Duration(min(secs, math.MaxInt64/int64(time.Second))) * time.Second
	chain, err := a.Sign([]byte(req.GetCsrPem()), id, ttl)
	if err != nil {
		code := codes.Internal
		if errors.Is(err, ErrInvalidCSR) || errors.Is(err, ErrInvalidIdentity) {
			code = codes.InvalidArgument
		}
		return nil, s.refuse(ctx, req.GetIdentity(), status.Error(code, err.Error()))
	}
	resp := &cav1.CreateCertificateResponse{}
	for _, c := range chain {
		resp.CertChainPem = append(resp.CertChainPem, string(EncodeCertsPEM([]*x509.Certificate{c})))
	}
	for _, r := range a.roots {
		resp.RootsPem = append(resp.RootsPem, string(EncodeCertsPEM([]*x509.Certificate{r})))
	}
	s.log.Debug("certificate issued", zap.Stringer("identity", id), zap.Time("notAfter", chain[0].NotAfter), zap.String("peer", peerAddr(ctx)))
	if s.opts.OnIssued != nil {
		s.opts.OnIssued(ctx, id)
	}
	return resp, nil
}

func (s *Server) refuse(ctx context.Context, identity string, err error) error {
	st := status.Convert(err)
	s.log.Warn("certificate request refused",
		zap.String("identity", identity),
		zap.Stringer("code", st.Code()),
		zap.String("reason", st.Message()),
		zap.String("peer", peerAddr(ctx)))
	if s.opts.OnRefusal != nil {
		s.opts.OnRefusal(ctx, identity, err)
	}
	return err
}

func peerAddr(ctx context.Context) string {
	if p, ok := peer.FromContext(ctx); ok && p.Addr != nil {
		return p.Addr.String()
	}
	return ""
}
