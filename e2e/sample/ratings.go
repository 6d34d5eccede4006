package sample

import (
	"context"
	"hash/crc32"
	"strings"

	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/reflection"
	"google.golang.org/grpc/status"

	ratingsv1 "github.com/amesh-dev/amesh/e2e/sample/ratings/v1"
)

// maxProductID bounds the product id ratings accepts.
const maxProductID = 64

// ratingsServer is the ratings role: the Ratings service with knobs and
// counters applied by an interceptor.
type ratingsServer struct {
	ratingsv1.UnimplementedRatingsServer
	cfg   Config
	by    ServedBy
	log   *zap.Logger
	fail  *failer
	stats *counter
}

func newRatingsServer(cfg Config, log *zap.Logger, random func() float64) *ratingsServer {
	return &ratingsServer{cfg: cfg, by: cfg.servedBy(), log: log, fail: newFailer(random), stats: newCounter()}
}

func (s *ratingsServer) servedByProto() *ratingsv1.ServedBy {
	return &ratingsv1.ServedBy{Service: s.by.Service, Version: s.by.Version, Pod: s.by.Pod, Namespace: s.by.Namespace}
}

// GetRating implements ratingsv1.RatingsServer.
func (s *ratingsServer) GetRating(ctx context.Context, req *ratingsv1.GetRatingRequest) (*ratingsv1.GetRatingResponse, error) {
	id := req.GetProductId()
	if id == "" || len(id) > maxProductID {
		return nil, status.Errorf(codes.InvalidArgument, "product_id: want 1 to %d bytes", maxProductID)
	}
	return &ratingsv1.GetRatingResponse{
		ProductId: id,
		Stars:     int32(1 + crc32.ChecksumIEEE([]byte(id))%5),
		ServedBy:  s.servedByProto(),
		Peer:      grpcPeer(ctx),
	}, nil
}

// Stats implements ratingsv1.RatingsServer.
func (s *ratingsServer) Stats(_ context.Context, req *ratingsv1.StatsRequest) (*ratingsv1.StatsResponse, error) {
	st := s.stats.snapshot(s.by, req.GetReset_())
	return &ratingsv1.StatsResponse{Total: st.Total, ByMethod: st.ByKey, ServedBy: s.servedByProto()}, nil
}

// intercept names the instance in the response headers, counts the call
// and applies the knobs. The health and reflection services and Stats are
// neither counted nor subject to knobs.
func (s *ratingsServer) intercept(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	_ = grpc.SetHeader(ctx, metadata.Pairs(
		HeaderService, s.by.Service, HeaderVersion, s.by.Version,
		HeaderServedBy, s.by.Pod, HeaderPeer, grpcPeer(ctx),
	))
	if !strings.HasPrefix(info.FullMethod, "/"+ratingsv1.Ratings_ServiceDesc.ServiceName+"/") ||
		info.FullMethod == ratingsv1.Ratings_Stats_FullMethodName {
		return handler(ctx, req)
	}
	s.stats.add(info.FullMethod)
	md, _ := metadata.FromIncomingContext(ctx)
	get := func(k string) string { return strings.Join(md.Get(k), ",") }
	fault, err := s.cfg.Fault.override(RoleRatings, get)
	if err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	if !sleep(ctx.Done(), fault.Delay) {
		return nil, status.FromContextError(ctx.Err()).Err()
	}
	if s.fail.fail(fault.Fail) {
		s.stats.addFailed()
		_ = grpc.SetHeader(ctx, metadata.Pairs(HeaderFault, "abort"))
		return nil, status.Error(fault.grpcCode(), "injected fault")
	}
	resp, err := handler(ctx, req)
	if s.cfg.AccessLog {
		s.log.Info("request", zap.String("method", info.FullMethod), zap.String("peer", grpcPeer(ctx)),
			zap.Stringer("code", status.Code(err)))
	}
	return resp, err
}

// grpcServer builds the gRPC server of the ratings role, with the standard
// health service (overall and per service SERVING) and reflection.
func (s *ratingsServer) grpcServer() (*grpc.Server, *health.Server) {
	g := grpc.NewServer(grpc.ChainUnaryInterceptor(s.intercept))
	ratingsv1.RegisterRatingsServer(g, s)
	h := health.NewServer()
	h.SetServingStatus("", healthpb.HealthCheckResponse_SERVING)
	h.SetServingStatus(ratingsv1.Ratings_ServiceDesc.ServiceName, healthpb.HealthCheckResponse_SERVING)
	healthpb.RegisterHealthServer(g, h)
	reflection.Register(g)
	return g, h
}
