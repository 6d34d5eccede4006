// Package bearer carries a bearer token (the caller's projected Kubernetes
// service-account token, audience "amesh") in gRPC metadata: the data plane
// attaches it to certificate and discovery calls, the controller reads it.
package bearer

import (
	"context"
	"strings"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

// Header is the gRPC metadata key of the token ("authorization: Bearer <t>").
const Header = "authorization"

// Source returns the current token. It is called for every RPC (projected
// tokens are rotated on disk; read the file each time or cache briefly).
type Source func(ctx context.Context) (string, error)

// FromIncoming returns the bearer token of an incoming gRPC call. A missing,
// repeated or malformed authorization header is a status error with code
// Unauthenticated.
func FromIncoming(ctx context.Context) (string, error) {
	md, ok := metadata.FromIncomingContext(ctx)
	if !ok {
		return "", status.Error(codes.Unauthenticated, "no authorization metadata")
	}
	vals := md.Get(Header)
	switch len(vals) {
	case 0:
		return "", status.Error(codes.Unauthenticated, "no authorization metadata")
	case 1:
	default:
		return "", status.Error(codes.Unauthenticated, "more than one authorization header")
	}
	scheme, tok, ok := strings.Cut(vals[0], " ")
	if !ok || !strings.EqualFold(scheme, "Bearer") {
		return "", status.Error(codes.Unauthenticated, "authorization is not a bearer token")
	}
	tok = strings.TrimSpace(tok)
	if tok == "" {
		return "", status.Error(codes.Unauthenticated, "empty bearer token")
	}
	return tok, nil
}

// AppendOutgoing returns ctx with the token added to the outgoing metadata.
func AppendOutgoing(ctx context.Context, token string) context.Context {
	return metadata.AppendToOutgoingContext(ctx, Header, "Bearer "+token)
}

// PerRPC is gRPC per-RPC credentials that attach the token from src to every
// call (grpc.WithPerRPCCredentials). They refuse to travel over a connection
// without transport security.
func PerRPC(src Source) credentials.PerRPCCredentials { return perRPC{src} }

type perRPC struct{ src Source }

func (p perRPC) GetRequestMetadata(ctx context.Context, _ ...string) (map[string]string, error) {
	tok, err := p.src(ctx)
	if err != nil {
		return nil, status.Errorf(codes.Unauthenticated, "bearer token: %v", err)
	}
	return map[string]string{Header: "Bearer " + tok}, nil
}

func (perRPC) RequireTransportSecurity() bool { return true }
