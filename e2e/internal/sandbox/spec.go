// Package sandbox starts a process in an isolated view of a machine: its own
// mount namespace with an overlay root (the lower layer is the caller's root
// filesystem, so locally built binaries and the host's tools are the
// "image"), bind-mounted volumes, fresh /proc, /sys and /dev, optionally a
// network namespace, a hostname, credentials and a capability set. The local
// cluster uses it twice: for a node (netns + its own persistent root) and for
// every container of a pod on that node.
//
// The parent (Start) re-executes a helper binary whose main calls Init when
// its first argument is InitArg; Init builds the view on a locked OS thread
// and execve(2)s the workload, so the workload inherits exactly that thread's
// namespaces. Errors before execve are reported back over a pipe.
package sandbox

import (
	"errors"
	"fmt"
	"path/filepath"
	"strings"
)

// InitArg is the first argument of the helper process that runs Init.
const InitArg = "sandbox-init"

// Propagation of a bind mount (Kubernetes' mountPropagation).
const (
	PropagationPrivate = "private" // None
	PropagationSlave   = "rslave"  // HostToContainer
	PropagationShared  = "rshared" // Bidirectional
)

// Mount is one mount inside the sandbox.
type Mount struct {
	// Type is "bind" or a filesystem type such as "tmpfs".
	Type string `json:"type"`
	// Source is a path in the caller's view for binds.
	Source string `json:"source,omitempty"`
	// Target is the absolute path inside the sandbox.
	Target string `json:"target"`
	// Data is the filesystem data (for example "mode=755,size=64m").
	Data        string `json:"data,omitempty"`
	ReadOnly    bool   `json:"readOnly,omitempty"`
	Propagation string `json:"propagation,omitempty"`
}

// File is written into the sandbox's root before the workload starts.
type File struct {
	Path    string `json:"path"`
	Content []byte `json:"content"`
	Mode    uint32 `json:"mode"`
}

// Spec describes a sandbox and the process that runs in it.
type Spec struct {
	// Netns is the path of a network namespace to join; empty keeps the
	// caller's.
	Netns string `json:"netns,omitempty"`
	// Hostname is set in the sandbox's own UTS namespace when not empty.
	Hostname string `json:"hostname,omitempty"`
	// Scratch is an existing empty directory where the root is assembled.
	Scratch string `json:"scratch"`
	// Upper holds the overlay's upper and work directories, so writes to the
	// root persist there; empty means a tmpfs private to the sandbox.
	Upper string `json:"upper,omitempty"`
	// Lower is the overlay's lower directory; empty means "/".
	Lower string `json:"lower,omitempty"`
	// Privileged gives the host's /dev and a writable /sys.
	Privileged bool `json:"privileged,omitempty"`
	// ReadOnlyRoot makes the root filesystem read-only (volumes keep their
	// own mode).
	ReadOnlyRoot bool `json:"readOnlyRoot,omitempty"`
	// Mounts are applied in order after /proc, /sys and /dev.
	Mounts []Mount `json:"mounts,omitempty"`
	// Files are written after the mounts (for example /etc/hosts).
	Files []File `json:"files,omitempty"`
	// Sysctls are written under /proc/sys inside the sandbox.
	Sysctls map[string]string `json:"sysctls,omitempty"`

	Args []string `json:"args"`
	Env  []string `json:"env,omitempty"`
	// Dir is the working directory; it is created when missing.
	Dir string `json:"dir,omitempty"`
	// UID and GID default to 0.
	UID    *uint32  `json:"uid,omitempty"`
	GID    *uint32  `json:"gid,omitempty"`
	Groups []uint32 `json:"groups,omitempty"`
	// Caps is the capability set (names without "CAP_"); nil keeps all.
	Caps []string `json:"caps"`
	// NoNewPrivs sets PR_SET_NO_NEW_PRIVS (allowPrivilegeEscalation: false).
	NoNewPrivs bool `json:"noNewPrivs,omitempty"`
}

// Validate checks the spec.
func (s *Spec) Validate() error {
	var errs []error
	if len(s.Args) == 0 || s.Args[0] == "" {
		errs = append(errs, errors.New("no command"))
	}
	if !filepath.IsAbs(s.Scratch) {
		errs = append(errs, fmt.Errorf("scratch %q is not absolute", s.Scratch))
	}
	if s.Upper != "" && !filepath.IsAbs(s.Upper) {
		errs = append(errs, fmt.Errorf("upper %q is not absolute", s.Upper))
	}
	for _, m := range s.Mounts {
		if !filepath.IsAbs(m.Target) {
			errs = append(errs, fmt.Errorf("mount target %q is not absolute", m.Target))
		}
		if m.Type == "bind" && !filepath.IsAbs(m.Source) {
			errs = append(errs, fmt.Errorf("bind source %q is not absolute", m.Source))
		}
		if m.Type == "" {
			errs = append(errs, fmt.Errorf("mount at %q has no type", m.Target))
		}
		switch m.Propagation {
		case "", PropagationPrivate, PropagationSlave, PropagationShared:
		default:
			errs = append(errs, fmt.Errorf("mount at %q: unknown propagation %q", m.Target, m.Propagation))
		}
	}
	for _, f := range s.Files {
		if !filepath.IsAbs(f.Path) {
			errs = append(errs, fmt.Errorf("file %q is not absolute", f.Path))
		}
	}
	for k := range s.Sysctls {
		if strings.Contains(k, "..") || strings.HasPrefix(k, "/") {
			errs = append(errs, fmt.Errorf("invalid sysctl %q", k))
		}
	}
	if _, err := capNumbers(s.Caps); err != nil {
		errs = append(errs, err)
	}
	if len(errs) > 0 {
		return fmt.Errorf("sandbox spec: %w", errors.Join(errs...))
	}
	return nil
}
