package bearer

import (
	"context"
	"errors"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

func TestFromIncoming(t *testing.T) {
	tests := []struct {
		name string
		md   metadata.MD // nil: no metadata at all
		want string
	}{
		{"bearer", metadata.Pairs(Header, "Bearer abc.def"), "abc.def"},
		{"scheme case-insensitive", metadata.Pairs(Header, "bearer abc"), "abc"},
		{"no metadata", nil, ""},
		{"no header", metadata.Pairs("x", "y"), ""},
		{"basic auth", metadata.Pairs(Header, "Basic dXNlcjpwYXNz"), ""},
		{"no scheme", metadata.Pairs(Header, "abc"), ""},
		{"empty token", metadata.Pairs(Header, "Bearer  "), ""},
		{"two headers", metadata.Pairs(Header, "Bearer a", Header, "Bearer b"), ""},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			ctx := context.Background()
			if tc.md != nil {
				ctx = metadata.NewIncomingContext(ctx, tc.md)
			}
			got, err := FromIncoming(ctx)
			if tc.want == "" {
				if status.Code(err) != codes.Unauthenticated {
					t.Errorf("FromIncoming = %q, %v; want Unauthenticated", got, err)
				}
				return
			}
			if err != nil || got != tc.want {
				t.Errorf("FromIncoming = %q, %v; want %q", got, err, tc.want)
			}
		})
	}
}

func TestOutgoingReachesIncoming(t *testing.T) {
	ctx := AppendOutgoing(context.Background(), "tok")
	md, _ := metadata.FromOutgoingContext(ctx)
	got, err := FromIncoming(metadata.NewIncomingContext(context.Background(), md))
	if err != nil || got != "tok" {
		t.Errorf("round trip = %q, %v", got, err)
	}
}

func TestPerRPC(t *testing.T) {
	p := PerRPC(func(context.Context) (string, error) { return "tok", nil })
	if !p.RequireTransportSecurity() {
		t.Error("bearer credentials must require transport security")
	}
	md, err := p.GetRequestMetadata(context.Background())
	if err != nil || md[Header] != "Bearer tok" {
		t.Errorf("GetRequestMetadata = %v, %v", md, err)
	}
	bad := PerRPC(func(context.Context) (string, error) { return "", errors.New("no token file") })
	if _, err := bad.GetRequestMetadata(context.Background()); status.Code(err) != codes.Unauthenticated {
		t.Errorf("GetRequestMetadata with a failing source = %v", err)
	}
}
