// Package image maps container image references to locally built binaries.
// The local cluster has no registry and no image store: an "image" is the
// node's root filesystem plus a few files bind-mounted at fixed paths (the
// binaries the image would carry) and a default entrypoint. The table is
// small, ordered and configurable; the first matching entry wins.
package image

import (
	"errors"
	"fmt"
	"os"
	"path"
	"path/filepath"
	"strings"

	"sigs.k8s.io/yaml"
)

// Entry maps references matching Pattern to an image.
type Entry struct {
	// Pattern is matched against the normalised reference
	// ("registry/repo:tag", tag defaulting to "latest", digest dropped);
	// "*" matches any run of characters, "/" included.
	Pattern string `json:"image"`
	// Entrypoint is the image's default command (Docker ENTRYPOINT).
	Entrypoint []string `json:"entrypoint,omitempty"`
	// Cmd is the image's default arguments (Docker CMD).
	Cmd []string `json:"cmd,omitempty"`
	// Files maps paths inside the container to files on the node.
	Files map[string]string `json:"files,omitempty"`
	// Env is the image's environment (KEY=value).
	Env []string `json:"env,omitempty"`
}

// Table is an ordered image table.
type Table struct {
	Entries []Entry `json:"images"`
}

// ErrNotFound means no entry matches a reference.
var ErrNotFound = errors.New("image not in the local image table")

// Load reads a YAML or JSON table file.
func Load(file string) (Table, error) {
	raw, err := os.ReadFile(file)
	if err != nil {
		return Table{}, fmt.Errorf("read image table: %w", err)
	}
	t, err := Parse(raw)
	if err != nil {
		return Table{}, fmt.Errorf("image table %s: %w", file, err)
	}
	return t, nil
}

// Parse decodes and validates a YAML or JSON table; unknown fields are
// errors.
func Parse(raw []byte) (Table, error) {
	var t Table
	if err := yaml.UnmarshalStrict(raw, &t); err != nil {
		return Table{}, fmt.Errorf("parse: %w", err)
	}
	if err := t.Validate(); err != nil {
		return Table{}, err
	}
	return t, nil
}

// Validate checks every entry.
func (t Table) Validate() error {
	var errs []error
	for i, e := range t.Entries {
		switch {
		case e.Pattern == "":
			errs = append(errs, fmt.Errorf("entry %d: no image pattern", i))
		case !strings.HasSuffix(e.Pattern, "*") && Normalize(e.Pattern) != e.Pattern:
			// References are matched with their tag ("latest" by default).
			errs = append(errs, fmt.Errorf("entry %d: pattern %q needs a tag (name:tag or name:*) or a trailing *", i, e.Pattern))
		}
		for in, host := range e.Files {
			if !filepath.IsAbs(in) || !filepath.IsAbs(host) {
				errs = append(errs, fmt.Errorf("entry %q: file %q → %q: both paths must be absolute", e.Pattern, in, host))
			}
		}
	}
	return errors.Join(errs...)
}

// Resolve returns the first entry matching ref.
func (t Table) Resolve(ref string) (Entry, error) {
	n := Normalize(ref)
	for _, e := range t.Entries {
		if Match(e.Pattern, n) {
			return e, nil
		}
	}
	return Entry{}, fmt.Errorf("%w: %q (normalised %q)", ErrNotFound, ref, n)
}

// Normalize drops a digest and adds the "latest" tag when there is none.
func Normalize(ref string) string {
	ref, _, _ = strings.Cut(ref, "@")
	last := ref[strings.LastIndex(ref, "/")+1:]
	if !strings.Contains(last, ":") {
		ref += ":latest"
	}
	return ref
}

// Match reports whether name matches pattern, where "*" matches any run of
// characters including "/".
func Match(pattern, name string) bool {
	parts := strings.Split(pattern, "*")
	if len(parts) == 1 {
		return pattern == name
	}
	if !strings.HasPrefix(name, parts[0]) {
		return false
	}
	name = name[len(parts[0]):]
	for i, p := range parts[1:] {
		if i == len(parts)-2 {
			return strings.HasSuffix(name, p)
		}
		j := strings.Index(name, p)
		if j < 0 {
			return false
		}
		name = name[j+len(p):]
	}
	return true
}

// Default is the built-in table. binDir holds the repository's built
// binaries (bin/), coreDNS is the CoreDNS binary. Images that carry no
// files (busybox, curl, debian…) run the node's own tools.
func Default(binDir, coreDNS string) Table {
	bin := func(name string) Entry {
		in := "/usr/local/bin/" + name
		return Entry{
			Pattern:    "*/" + name + ":*",
			Entrypoint: []string{in},
			Files:      map[string]string{in: path.Join(binDir, name)},
		}
	}
	cniAgent := bin("amesh-cni-agent")
	cniAgent.Files["/usr/local/bin/amesh-cni"] = path.Join(binDir, "amesh-cni")
	return Table{Entries: []Entry{
		bin("ztunnel"),
		bin("waypoint"),
		bin("amesh-controller"),
		cniAgent,
		bin("echoserver"),
		bin("sampleapp"),
		{
			Pattern:    "registry.k8s.io/coredns/coredns:*",
			Entrypoint: []string{"/coredns"},
			Files:      map[string]string{"/coredns": coreDNS},
		},
		{Pattern: "busybox:*", Cmd: []string{"sh"}},
		{Pattern: "*/busybox:*", Cmd: []string{"sh"}},
		{Pattern: "*curlimages/curl:*", Entrypoint: []string{"curl"}},
		{Pattern: "debian:*", Cmd: []string{"bash"}},
		{Pattern: "*/debian:*", Cmd: []string{"bash"}},
		{Pattern: "*nicolaka/netshoot:*", Cmd: []string{"bash"}},
	}}
}
