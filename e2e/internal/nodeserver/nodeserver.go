// Package nodeserver is the node agent's kubelet API: the HTTPS endpoint the
// kube-apiserver calls for `kubectl logs`, `kubectl exec` and
// `kubectl port-forward`. Callers must present a client certificate signed
// by the cluster CA whose subject is one of Config.AllowedUsers (the
// apiserver's kubelet-client identity) or in the system:masters group; the
// kubelet's SubjectAccessReview-based authorization is not reproduced.
package nodeserver

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"

	"go.uber.org/zap"
	"k8s.io/cri-streaming/pkg/streaming/portforward"
	"k8s.io/cri-streaming/pkg/streaming/remotecommand"
)

// Runtime is what the server needs from the node agent.
type Runtime interface {
	// LogPath returns the log file of a container (of its previous run when
	// previous is set).
	LogPath(namespace, pod, container string, previous bool) (string, error)
	// Resolve returns the UID of a pod and the name of its container
	// (defaulting to the first one when container is empty).
	Resolve(namespace, pod, container string) (uid, name string, err error)
	remotecommand.Executor
	remotecommand.Attacher
	portforward.PortForwarder
}

// ErrNotFound is what a Runtime returns for unknown pods or containers.
var ErrNotFound = errors.New("not found")

// Config of the server.
type Config struct {
	Addr     string
	CertFile string
	KeyFile  string
	ClientCA string
	// AllowedUsers are the certificate common names allowed in (default
	// kube-apiserver-kubelet-client); system:masters is always allowed.
	AllowedUsers []string
}

// Server is the kubelet API server.
type Server struct {
	cfg Config
	rt  Runtime
	log *zap.Logger
}

// New returns a server.
func New(cfg Config, rt Runtime, log *zap.Logger) *Server {
	return &Server{cfg: cfg, rt: rt, log: log}
}

// Run serves until ctx ends.
func (s *Server) Run(ctx context.Context) error {
	caPEM, err := os.ReadFile(s.cfg.ClientCA)
	if err != nil {
		return fmt.Errorf("read client CA: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		return fmt.Errorf("no certificate in %s", s.cfg.ClientCA)
	}
	cert, err := tls.LoadX509KeyPair(s.cfg.CertFile, s.cfg.KeyFile)
	if err != nil {
		return fmt.Errorf("load serving certificate: %w", err)
	}
	srv := &http.Server{
		Handler:           s.authorize(s.Handler()),
		ReadHeaderTimeout: 10 * time.Second,
		TLSConfig: &tls.Config{
			Certificates: []tls.Certificate{cert},
			ClientAuth:   tls.RequireAndVerifyClientCert,
			ClientCAs:    pool,
			MinVersion:   tls.VersionTLS12,
			// SPDY upgrades need HTTP/1.1.
			NextProtos: []string{"http/1.1"},
		},
		ErrorLog: zap.NewStdLog(s.log),
	}
	ln, err := net.Listen("tcp", s.cfg.Addr)
	if err != nil {
		return fmt.Errorf("listen %s: %w", s.cfg.Addr, err)
	}
	errc := make(chan error, 1)
	go func() { errc <- srv.ServeTLS(ln, "", "") }()
	select {
	case err := <-errc:
		return fmt.Errorf("kubelet API: %w", err)
	case <-ctx.Done():
	}
	shCtx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	_ = srv.Shutdown(shCtx)
	_ = srv.Close()
	<-errc
	return nil
}

// Handler returns the API's routes.
func (s *Server) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) { _, _ = io.WriteString(w, "ok") })
	mux.HandleFunc("GET /containerLogs/{ns}/{pod}/{container}", s.logs)
	for _, m := range []string{"GET", "POST"} {
		mux.HandleFunc(m+" /exec/{ns}/{pod}/{container}", s.exec)
		mux.HandleFunc(m+" /exec/{ns}/{pod}/{uid}/{container}", s.exec)
		mux.HandleFunc(m+" /attach/{ns}/{pod}/{container}", s.attach)
		mux.HandleFunc(m+" /attach/{ns}/{pod}/{uid}/{container}", s.attach)
		mux.HandleFunc(m+" /portForward/{ns}/{pod}", s.portForward)
		mux.HandleFunc(m+" /portForward/{ns}/{pod}/{uid}", s.portForward)
	}
	return mux
}

// authorize admits only the configured client identities.
func (s *Server) authorize(next http.Handler) http.Handler {
	allowed := s.cfg.AllowedUsers
	if len(allowed) == 0 {
		allowed = []string{"kube-apiserver-kubelet-client"}
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.TLS == nil || len(r.TLS.PeerCertificates) == 0 {
			http.Error(w, "client certificate required", http.StatusUnauthorized)
			return
		}
		subj := r.TLS.PeerCertificates[0].Subject
		if !slices.Contains(allowed, subj.CommonName) && !slices.Contains(subj.Organization, "system:masters") {
			s.log.Warn("kubelet API access denied", zap.String("user", subj.CommonName), zap.String("path", r.URL.Path))
			http.Error(w, "forbidden: "+subj.CommonName+" may not use the kubelet API", http.StatusForbidden)
			return
		}
		next.ServeHTTP(w, r)
	})
}

func httpError(w http.ResponseWriter, err error) {
	code := http.StatusInternalServerError
	if errors.Is(err, ErrNotFound) {
		code = http.StatusNotFound
	}
	http.Error(w, err.Error(), code)
}

func (s *Server) logs(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	ns, pod, ctr := r.PathValue("ns"), r.PathValue("pod"), r.PathValue("container")
	path, err := s.rt.LogPath(ns, pod, ctr, q.Get("previous") == "true")
	if err != nil {
		httpError(w, err)
		return
	}
	f, err := os.Open(path)
	if err != nil {
		httpError(w, fmt.Errorf("open log: %w", err))
		return
	}
	defer f.Close()
	var limit int64 = -1
	if v := q.Get("limitBytes"); v != "" {
		if n, err := strconv.ParseInt(v, 10, 64); err == nil && n > 0 {
			limit = n
		}
	}
	out := io.Writer(w)
	if limit > 0 {
		out = &limitWriter{w: w, n: limit}
	}
	w.Header().Set("Content-Type", "text/plain")
	if v := q.Get("tailLines"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 0 {
			http.Error(w, "invalid tailLines", http.StatusBadRequest)
			return
		}
		if err := seekTail(f, n); err != nil {
			httpError(w, err)
			return
		}
	}
	if _, err := io.Copy(out, f); err != nil {
		return
	}
	if q.Get("follow") != "true" {
		return
	}
	flusher, _ := w.(http.Flusher)
	buf := make([]byte, 32<<10)
	for {
		if flusher != nil {
			flusher.Flush()
		}
		select {
		case <-r.Context().Done():
			return
		case <-time.After(250 * time.Millisecond):
		}
		for {
			n, err := f.Read(buf)
			if n > 0 {
				if _, werr := out.Write(buf[:n]); werr != nil {
					return
				}
			}
			if err != nil {
				break
			}
		}
		// A new log file means the container restarted: stop following,
		// as the kubelet does.
		if cur, err := s.rt.LogPath(ns, pod, ctr, false); err != nil || cur != path {
			return
		}
	}
}

// seekTail positions f at the start of its last n lines.
func seekTail(f *os.File, n int) error {
	st, err := f.Stat()
	if err != nil {
		return err
	}
	size := st.Size()
	if n == 0 {
		_, err := f.Seek(0, io.SeekEnd)
		return err
	}
	const chunk = 32 << 10
	var lines int
	pos := size
	buf := make([]byte, chunk)
	for pos > 0 {
		read := int64(chunk)
		if pos < read {
			read = pos
		}
		pos -= read
		if _, err := f.ReadAt(buf[:read], pos); err != nil && !errors.Is(err, io.EOF) {
			return err
		}
		b := buf[:read]
		for i := len(b) - 1; i >= 0; i-- {
			if b[i] != '\n' {
				continue
			}
			if pos+int64(i) == size-1 {
				continue // the file's final newline ends the last line
			}
			lines++
			if lines == n {
				_, err := f.Seek(pos+int64(i)+1, io.SeekStart)
				return err
			}
		}
	}
	_, err = f.Seek(0, io.SeekStart)
	return err
}

type limitWriter struct {
	w io.Writer
	n int64
}

func (l *limitWriter) Write(p []byte) (int, error) {
	if l.n <= 0 {
		return 0, io.EOF
	}
	if int64(len(p)) > l.n {
		p = p[:l.n]
	}
	n, err := l.w.Write(p)
	l.n -= int64(n)
	return n, err
}

func (s *Server) exec(w http.ResponseWriter, r *http.Request) {
	ns, pod := r.PathValue("ns"), r.PathValue("pod")
	uid, ctr, err := s.rt.Resolve(ns, pod, r.PathValue("container"))
	if err != nil {
		httpError(w, err)
		return
	}
	opts, err := remotecommand.NewOptions(r)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	cmd := r.URL.Query()["command"]
	if len(cmd) == 0 {
		http.Error(w, "no command", http.StatusBadRequest)
		return
	}
	s.log.Info("exec", zap.String("pod", ns+"/"+pod), zap.String("container", ctr), zap.Strings("command", cmd))
	remotecommand.ServeExec(w, r, s.rt, ns+"/"+pod, uid, ctr, cmd, opts, 4*time.Hour, remotecommand.DefaultStreamCreationTimeout, remotecommand.SupportedStreamingProtocols)
}

func (s *Server) attach(w http.ResponseWriter, r *http.Request) {
	ns, pod := r.PathValue("ns"), r.PathValue("pod")
	uid, ctr, err := s.rt.Resolve(ns, pod, r.PathValue("container"))
	if err != nil {
		httpError(w, err)
		return
	}
	opts, err := remotecommand.NewOptions(r)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	remotecommand.ServeAttach(w, r, s.rt, ns+"/"+pod, uid, ctr, opts, 4*time.Hour, remotecommand.DefaultStreamCreationTimeout, remotecommand.SupportedStreamingProtocols)
}

func (s *Server) portForward(w http.ResponseWriter, r *http.Request) {
	ns, pod := r.PathValue("ns"), r.PathValue("pod")
	uid, _, err := s.rt.Resolve(ns, pod, "")
	if err != nil {
		httpError(w, err)
		return
	}
	opts, err := portforward.NewV4Options(r)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	portforward.ServePortForward(w, r, s.rt, ns+"/"+pod, uid, opts, 4*time.Hour, remotecommand.DefaultStreamCreationTimeout, portforward.SupportedProtocols)
}

// LastLines returns the last n lines of a file (for events and tests).
func LastLines(path string, n int) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	if err := seekTail(f, n); err != nil {
		return "", err
	}
	var b bytes.Buffer
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		b.WriteString(sc.Text())
		b.WriteByte('\n')
	}
	return strings.TrimRight(b.String(), "\n"), sc.Err()
}
