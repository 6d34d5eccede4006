// Package agentapi is the small protocol between the amesh-cni plugin and
// the node agent (amesh-cni-agent).
//
// Transport: HTTP/1.1 over the unix socket DefaultSocket (the agent
// listens, the plugin dials; the socket is reachable only from the host).
// Bodies are JSON.
//
//	POST /v1/add    PodRequest → PodResponse  a pod sandbox was created (CNI ADD)
//	POST /v1/del    PodRequest → PodResponse  a pod sandbox is going away (CNI DEL)
//	POST /v1/check  PodRequest → PodResponse  verify a pod's redirection (CNI CHECK)
//	GET  /v1/status            → PodResponse  the agent is ready (CNI STATUS)
//
// 200 means success; PodResponse.Enrolled says whether the pod is in the
// mesh (and, for add, that its capture rules are in place and ztunnel has
// acknowledged it). Any other status carries PodResponse.Error: 400 for a
// malformed request, 500 when the agent failed (for add: the pod must not
// start), 503 when the agent is not ready yet.
//
// When the plugin cannot reach the agent it refuses the pod (fail closed:
// it cannot tell whether the pod is enrolled, by its namespace's label or
// its own), unless the pod's namespace is one the agent excludes from the
// mesh, as listed in the state file (State, DefaultStateFile) the agent
// writes when it starts. Without a readable state file only the mesh's own
// SystemNamespace passes, so that the mesh can always come up.
package agentapi

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"time"
)

// Defaults shared by the plugin and the agent.
const (
	DefaultSocket    = "/var/run/amesh/cni.sock"
	DefaultStateFile = "/var/run/amesh/cni-state.json"
	// MaxBody bounds request and response bodies.
	MaxBody = 64 << 10
	// SystemNamespace is the mesh's own namespace (DESIGN.md §2).
	SystemNamespace = "amesh-system"
)

// Paths of the endpoints.
const (
	PathAdd    = "/v1/add"
	PathDel    = "/v1/del"
	PathCheck  = "/v1/check"
	PathStatus = "/v1/status"
)

// PodRequest describes one pod sandbox, from the CNI invocation.
type PodRequest struct {
	ContainerID  string   `json:"containerID"`
	Netns        string   `json:"netns,omitempty"`
	IfName       string   `json:"ifName,omitempty"`
	PodName      string   `json:"podName"`
	PodNamespace string   `json:"podNamespace"`
	PodUID       string   `json:"podUID,omitempty"`
	IPs          []string `json:"ips,omitempty"` // from prevResult, as text
}

// Validate reports whether the request names a pod.
func (r *PodRequest) Validate() error {
	if r.PodName == "" || r.PodNamespace == "" {
		return errors.New("pod name and namespace are required")
	}
	if r.ContainerID == "" {
		return errors.New("container ID is required")
	}
	return nil
}

// PodResponse is the agent's answer.
type PodResponse struct {
	Enrolled bool   `json:"enrolled"`
	Error    string `json:"error,omitempty"`
}

// ErrUnreachable: the agent could not be reached (no socket, nobody
// listening, the connection could not be made in time).
var ErrUnreachable = errors.New("node agent unreachable")

// ErrNoAnswer: the agent took the request but gave no complete answer (it
// timed out deciding, or went away meanwhile). Unlike ErrUnreachable the
// agent was there: the plugin must not fall back on the state file, since
// the agent may have been about to enrol the pod.
var ErrNoAnswer = errors.New("node agent gave no answer")

// dialError marks a failure to connect to the agent's socket.
type dialError struct{ err error }

func (e *dialError) Error() string { return e.err.Error() }
func (e *dialError) Unwrap() error { return e.err }

// AgentError is an error the agent reported.
type AgentError struct {
	Status int
	Msg    string
}

func (e *AgentError) Error() string { return fmt.Sprintf("node agent: %s (HTTP %d)", e.Msg, e.Status) }

// Client talks to the agent.
type Client struct {
	http *http.Client
}

// NewClient returns a client for the agent listening on socket. timeout
// bounds each call.
func NewClient(socket string, timeout time.Duration) *Client {
	tr := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			c, err := d.DialContext(ctx, "unix", socket)
			if err != nil {
				return nil, &dialError{err}
			}
			return c, nil
		},
		DisableKeepAlives: true,
	}
	return &Client{http: &http.Client{Transport: tr, Timeout: timeout}}
}

// Add reports a new pod sandbox.
func (c *Client) Add(ctx context.Context, r *PodRequest) (*PodResponse, error) {
	return c.call(ctx, http.MethodPost, PathAdd, r)
}

// Del reports a pod sandbox going away.
func (c *Client) Del(ctx context.Context, r *PodRequest) (*PodResponse, error) {
	return c.call(ctx, http.MethodPost, PathDel, r)
}

// Check asks the agent to verify a pod's redirection.
func (c *Client) Check(ctx context.Context, r *PodRequest) (*PodResponse, error) {
	return c.call(ctx, http.MethodPost, PathCheck, r)
}

// Status asks whether the agent is ready.
func (c *Client) Status(ctx context.Context) error {
	_, err := c.call(ctx, http.MethodGet, PathStatus, nil)
	return err
}

func (c *Client) call(ctx context.Context, method, path string, body any) (*PodResponse, error) {
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return nil, err
		}
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, "http://amesh-agent"+path, rd)
	if err != nil {
		return nil, err
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := c.http.Do(req)
	if err != nil {
		if de := (*dialError)(nil); errors.As(err, &de) {
			return nil, fmt.Errorf("%w: %w", ErrUnreachable, err)
		}
		return nil, fmt.Errorf("%w: %w", ErrNoAnswer, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, MaxBody))
	if err != nil {
		return nil, fmt.Errorf("%w: reading answer: %w", ErrNoAnswer, err)
	}
	var pr PodResponse
	if err := json.Unmarshal(b, &pr); err != nil {
		return nil, &AgentError{Status: resp.StatusCode, Msg: fmt.Sprintf("undecodable answer: %v", err)}
	}
	if resp.StatusCode != http.StatusOK {
		msg := pr.Error
		if msg == "" {
			msg = http.StatusText(resp.StatusCode)
		}
		return nil, &AgentError{Status: resp.StatusCode, Msg: msg}
	}
	return &pr, nil
}

// State is what the plugin falls back on when the agent is unreachable.
type State struct {
	// ExcludedNamespaces are the namespaces the agent never enrols (its
	// configuration): their pods may start while the agent is away.
	ExcludedNamespaces []string `json:"excludedNamespaces"`
	// Updated is when the agent last wrote the file.
	Updated time.Time `json:"updated"`
}

// Excluded reports whether ns is listed as excluded from the mesh.
func (s *State) Excluded(ns string) bool { return slices.Contains(s.ExcludedNamespaces, ns) }

// ReadState reads the state file.
func ReadState(path string) (*State, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var s State
	if err := json.Unmarshal(b, &s); err != nil {
		return nil, fmt.Errorf("state file %s: %w", path, err)
	}
	return &s, nil
}

// WriteState replaces the state file atomically (temporary file + rename).
func WriteState(path string, s *State) error {
	b, err := json.Marshal(s)
	if err != nil {
		return err
	}
	return WriteFileAtomic(path, b, 0o644)
}

// WriteFileAtomic writes data to a temporary file in path's directory,
// syncs it and renames it over path, so readers see the old or the new
// content, never a mix.
func WriteFileAtomic(path string, data []byte, perm os.FileMode) error {
	dir := filepath.Dir(path)
	f, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return err
	}
	tmp := f.Name()
	defer os.Remove(tmp) // no-op after a successful rename
	if _, err := f.Write(data); err != nil {
		f.Close()
		return err
	}
	if err := f.Chmod(perm); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}
