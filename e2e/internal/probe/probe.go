// Package probe runs Kubernetes container probes — HTTP GET, TCP socket,
// gRPC health and exec — from the node, as the kubelet does, and tracks
// their thresholds.
package probe

import (
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
)

// Result of one probe.
type Result int

// Probe results.
const (
	Unknown Result = iota
	Success
	Failure
)

// Exec runs a command in the container and returns its combined output and
// exit code.
type Exec func(ctx context.Context, cmd []string) (output []byte, exitCode int, err error)

// Target is what a probe checks.
type Target struct {
	PodIP     string
	Container *corev1.Container
	Exec      Exec
}

// Run executes p once against t and returns the result and a message.
func Run(ctx context.Context, p *corev1.Probe, t Target) (Result, string) {
	timeout := time.Duration(p.TimeoutSeconds) * time.Second
	if timeout <= 0 {
		timeout = time.Second
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	switch {
	case p.HTTPGet != nil:
		return httpGet(ctx, p.HTTPGet, t)
	case p.TCPSocket != nil:
		return tcp(ctx, p.TCPSocket, t)
	case p.Exec != nil:
		if t.Exec == nil {
			return Failure, "exec probes are not available"
		}
		out, code, err := t.Exec(ctx, p.Exec.Command)
		if err != nil {
			return Failure, fmt.Sprintf("exec probe: %v", err)
		}
		if code != 0 {
			return Failure, fmt.Sprintf("exec probe exited %d: %s", code, trim(out))
		}
		return Success, ""
	case p.GRPC != nil:
		return grpcHealth(ctx, p.GRPC, t)
	}
	return Failure, "probe has no handler"
}

func trim(b []byte) string {
	s := strings.TrimSpace(string(b))
	if len(s) > 200 {
		s = s[:200] + "…"
	}
	return s
}

// port resolves a numeric or named container port.
func port(p intstr.IntOrString, c *corev1.Container) (int, error) {
	if p.Type == intstr.Int {
		if p.IntVal <= 0 || p.IntVal > 65535 {
			return 0, fmt.Errorf("invalid port %d", p.IntVal)
		}
		return int(p.IntVal), nil
	}
	if n, err := strconv.Atoi(p.StrVal); err == nil {
		return n, nil
	}
	if c != nil {
		for _, cp := range c.Ports {
			if cp.Name == p.StrVal {
				return int(cp.ContainerPort), nil
			}
		}
	}
	return 0, fmt.Errorf("no container port named %q", p.StrVal)
}

func httpGet(ctx context.Context, g *corev1.HTTPGetAction, t Target) (Result, string) {
	n, err := port(g.Port, t.Container)
	if err != nil {
		return Failure, err.Error()
	}
	host := g.Host
	if host == "" {
		host = t.PodIP
	}
	scheme := strings.ToLower(string(g.Scheme))
	if scheme == "" {
		scheme = "http"
	}
	path := g.Path
	if !strings.HasPrefix(path, "/") {
		path = "/" + path
	}
	u := &url.URL{Scheme: scheme, Host: net.JoinHostPort(host, strconv.Itoa(n))}
	full := u.String() + path
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, full, nil)
	if err != nil {
		return Failure, err.Error()
	}
	req.Header.Set("User-Agent", "kube-probe/1.37")
	req.Header.Set("Accept", "*/*")
	for _, h := range g.HTTPHeaders {
		if strings.EqualFold(h.Name, "host") {
			req.Host = h.Value
			continue
		}
		req.Header.Add(h.Name, h.Value)
	}
	tr := &http.Transport{
		TLSClientConfig:   &tls.Config{InsecureSkipVerify: true}, //nolint:gosec // the kubelet does not verify probe certificates
		DisableKeepAlives: true,
	}
	defer tr.CloseIdleConnections()
	client := &http.Client{Transport: tr, CheckRedirect: func(*http.Request, []*http.Request) error {
		return http.ErrUseLastResponse
	}}
	resp, err := client.Do(req)
	if err != nil {
		return Failure, fmt.Sprintf("Get %q: %v", full, err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 10<<10))
	if resp.StatusCode >= 200 && resp.StatusCode < 400 {
		return Success, ""
	}
	return Failure, fmt.Sprintf("HTTP probe failed with statuscode: %d %s", resp.StatusCode, trim(body))
}

func tcp(ctx context.Context, s *corev1.TCPSocketAction, t Target) (Result, string) {
	n, err := port(s.Port, t.Container)
	if err != nil {
		return Failure, err.Error()
	}
	host := s.Host
	if host == "" {
		host = t.PodIP
	}
	var d net.Dialer
	c, err := d.DialContext(ctx, "tcp", net.JoinHostPort(host, strconv.Itoa(n)))
	if err != nil {
		return Failure, fmt.Sprintf("dial tcp %s: %v", net.JoinHostPort(host, strconv.Itoa(n)), err)
	}
	c.Close()
	return Success, ""
}
