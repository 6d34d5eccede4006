package agentapi

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"net"
	"net/http"
	"time"
)

// Handler is the agent side of the protocol.
type Handler interface {
	// Add handles a new pod sandbox; for an enrolled pod it returns only
	// once redirection is in place (or failed).
	Add(ctx context.Context, r *PodRequest) (enrolled bool, err error)
	// Del handles a pod sandbox going away; it is idempotent.
	Del(ctx context.Context, r *PodRequest) error
	// Check verifies a pod's redirection.
	Check(ctx context.Context, r *PodRequest) (enrolled bool, err error)
	// Ready returns nil when the agent can serve Add.
	Ready() error
}

// ErrNotReady is returned by Handler.Ready (wrapped) while the agent is
// starting; it maps to 503.
var ErrNotReady = errors.New("node agent not ready")

// NewHTTPHandler serves the protocol with h.
func NewHTTPHandler(h Handler) http.Handler {
	mux := http.NewServeMux()
	pod := func(fn func(context.Context, *PodRequest) (bool, error)) http.HandlerFunc {
		return func(w http.ResponseWriter, req *http.Request) {
			var r PodRequest
			dec := json.NewDecoder(io.LimitReader(req.Body, MaxBody))
			if err := dec.Decode(&r); err != nil {
				reply(w, http.StatusBadRequest, PodResponse{Error: "malformed request: " + err.Error()})
				return
			}
			if err := r.Validate(); err != nil {
				reply(w, http.StatusBadRequest, PodResponse{Error: err.Error()})
				return
			}
			enrolled, err := fn(req.Context(), &r)
			if err != nil {
				code := http.StatusInternalServerError
				if errors.Is(err, ErrNotReady) {
					code = http.StatusServiceUnavailable
				}
				reply(w, code, PodResponse{Enrolled: enrolled, Error: err.Error()})
				return
			}
			reply(w, http.StatusOK, PodResponse{Enrolled: enrolled})
		}
	}
	mux.Handle("POST "+PathAdd, pod(h.Add))
	mux.Handle("POST "+PathCheck, pod(h.Check))
	mux.Handle("POST "+PathDel, pod(func(ctx context.Context, r *PodRequest) (bool, error) {
		return false, h.Del(ctx, r)
	}))
	mux.HandleFunc("GET "+PathStatus, func(w http.ResponseWriter, _ *http.Request) {
		if err := h.Ready(); err != nil {
			reply(w, http.StatusServiceUnavailable, PodResponse{Error: err.Error()})
			return
		}
		reply(w, http.StatusOK, PodResponse{})
	})
	return mux
}

func reply(w http.ResponseWriter, code int, r PodResponse) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	_ = json.NewEncoder(w).Encode(r)
}

// Serve serves h on ln until ctx is done, then shuts down gracefully
// (in-flight requests get up to grace to finish). It returns after the
// server has stopped.
func Serve(ctx context.Context, ln net.Listener, h Handler, grace time.Duration) error {
	srv := &http.Server{Handler: NewHTTPHandler(h), ReadHeaderTimeout: 10 * time.Second}
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	select {
	case err := <-errc:
		return err
	case <-ctx.Done():
	}
	sctx, cancel := context.WithTimeout(context.Background(), grace)
	defer cancel()
	err := srv.Shutdown(sctx)
	<-errc
	return err
}
