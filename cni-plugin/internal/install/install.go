// Package install puts the amesh-cni plugin on the node: it copies the
// plugin binary into the CNI bin dir and chains the plugin at the end of
// the primary CNI's configuration list in the CNI conf dir, keeps it
// chained when the primary CNI rewrites its file, and removes both on
// uninstall.
//
// The primary configuration is the one the container runtime uses: the
// first file, in lexical order, ending in .conflist, .conf or .json. A
// single-plugin .conf/.json is converted to a .conflist of the same base
// name (the original is removed so the runtime does not pick it). Every
// write goes to a temporary file in the same directory that is then
// renamed over the target, so the runtime never reads a half-written file;
// nothing is written when the content would not change.
package install

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/fsnotify/fsnotify"
	"go.uber.org/zap"

	"github.com/amesh-dev/amesh/cni-plugin/internal/agentapi"
)

// PluginType is the "type" of amesh-cni's conflist entry (and the binary's name).
const PluginType = "amesh-cni"

// ErrNoPrimary: the conf dir holds no CNI configuration to chain into yet.
var ErrNoPrimary = errors.New("no primary CNI configuration found")

// Config configures the installer.
type Config struct {
	ConfDir      string // CNI conf dir, e.g. /etc/cni/net.d
	BinDir       string // CNI bin dir, e.g. /opt/cni/bin
	PluginBinary string // the amesh-cni binary to copy ("" = do not copy)
	// StateFile is the agent's state file for the plugin; Uninstall
	// removes it ("" = leave it).
	StateFile string
	// Entry is amesh-cni's settings in the conflist (besides "type").
	Entry Entry
	// Poll is the fallback re-check interval besides fsnotify (default 30s).
	Poll   time.Duration
	Logger *zap.Logger
}

// Entry is the plugin configuration written into the conflist.
type Entry struct {
	AgentSocket       string   `json:"agentSocket,omitempty"`
	StateFile         string   `json:"stateFile,omitempty"`
	AgentTimeout      string   `json:"agentTimeout,omitempty"`
	ExcludeNamespaces []string `json:"excludeNamespaces,omitempty"`
}

func (e Entry) object() map[string]any {
	m := map[string]any{"type": PluginType}
	if e.AgentSocket != "" {
		m["agentSocket"] = e.AgentSocket
	}
	if e.StateFile != "" {
		m["stateFile"] = e.StateFile
	}
	if e.AgentTimeout != "" {
		m["agentTimeout"] = e.AgentTimeout
	}
	if e.ExcludeNamespaces != nil {
		m["excludeNamespaces"] = e.ExcludeNamespaces
	}
	return m
}

// Installer installs and keeps amesh-cni installed.
type Installer struct {
	cfg Config
	log *zap.Logger
}

// New allocates an Installer.
func New(cfg Config) *Installer {
	if cfg.Poll <= 0 {
		cfg.Poll = 30 * time.Second
	}
	if cfg.Logger == nil {
		cfg.Logger = zap.NewNop()
	}
	return &Installer{cfg: cfg, log: cfg.Logger}
}

// Primary returns the path of the configuration the runtime uses.
func Primary(confDir string) (string, error) {
	entries, err := os.ReadDir(confDir)
	if err != nil {
		return "", fmt.Errorf("install: %w", err)
	}
	var names []string
	for _, e := range entries {
		n := e.Name()
		if e.IsDir() || strings.HasPrefix(n, ".") {
			continue
		}
		switch filepath.Ext(n) {
		case ".conflist", ".conf", ".json":
			names = append(names, n)
		}
	}
	if len(names) == 0 {
		return "", fmt.Errorf("install: %s: %w", confDir, ErrNoPrimary)
	}
	slices.Sort(names)
	return filepath.Join(confDir, names[0]), nil
}

// Chain returns the conflist content with amesh-cni as the last plugin.
// data is a conflist or a single-plugin conf; the result is a conflist.
// Any existing amesh-cni entry is replaced. Other content is preserved.
func Chain(data []byte, entry Entry) ([]byte, error) {
	list, err := toList(data)
	if err != nil {
		return nil, err
	}
	plugins := withoutAmesh(list["plugins"].([]any))
	list["plugins"] = append(plugins, entry.object())
	return encode(list)
}

// Unchain returns the conflist content without amesh-cni.
func Unchain(data []byte) ([]byte, error) {
	list, err := toList(data)
	if err != nil {
		return nil, err
	}
	list["plugins"] = withoutAmesh(list["plugins"].([]any))
	return encode(list)
}

func encode(v map[string]any) ([]byte, error) {
	var b bytes.Buffer
	enc := json.NewEncoder(&b)
	enc.SetIndent("", "  ")
	enc.SetEscapeHTML(false)
	if err := enc.Encode(v); err != nil {
		return nil, err
	}
	return b.Bytes(), nil
}

// toList parses a conflist, or converts a single-plugin conf to one.
func toList(data []byte) (map[string]any, error) {
	var m map[string]any
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.UseNumber()
	if err := dec.Decode(&m); err != nil {
		return nil, fmt.Errorf("install: decoding CNI configuration: %w", err)
	}
	if m == nil {
		return nil, errors.New("install: CNI configuration is not a JSON object")
	}
	if raw, ok := m["plugins"]; ok {
		plugins, ok := raw.([]any)
		if !ok {
			return nil, errors.New("install: conflist \"plugins\" is not a list")
		}
		for i, p := range plugins {
			if _, ok := p.(map[string]any); !ok {
				return nil, fmt.Errorf("install: conflist plugin %d is not an object", i)
			}
		}
		return m, nil
	}
	if _, ok := m["type"].(string); !ok {
		return nil, errors.New("install: CNI configuration has neither \"plugins\" nor \"type\"")
	}
	// Single plugin: name and cniVersion move to the list.
	list := map[string]any{"plugins": []any{m}}
	for _, k := range []string{"name", "cniVersion"} {
		if v, ok := m[k]; ok {
			list[k] = v
			delete(m, k)
		}
	}
	return list, nil
}

func withoutAmesh(plugins []any) []any {
	out := make([]any, 0, len(plugins)+1)
	for _, p := range plugins {
		if p.(map[string]any)["type"] == PluginType {
			continue
		}
		out = append(out, p)
	}
	return out
}

// Ensure installs the binary (when configured) and chains the plugin into
// the primary configuration. It returns whether it changed anything.
func (in *Installer) Ensure() (bool, error) {
	changed := false
	if in.cfg.PluginBinary != "" {
		c, err := installBinary(in.cfg.PluginBinary, filepath.Join(in.cfg.BinDir, PluginType))
		if err != nil {
			return false, err
		}
		changed = c
	}
	path, err := Primary(in.cfg.ConfDir)
	if err != nil {
		return changed, err
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return changed, fmt.Errorf("install: %w", err)
	}
	out, err := Chain(data, in.cfg.Entry)
	if err != nil {
		return changed, fmt.Errorf("install: %s: %w", path, err)
	}
	target := path
	if filepath.Ext(path) != ".conflist" {
		target = strings.TrimSuffix(path, filepath.Ext(path)) + ".conflist"
	}
	if target == path && bytes.Equal(out, data) {
		return changed, nil
	}
	if err := agentapi.WriteFileAtomic(target, out, 0o644); err != nil {
		return changed, fmt.Errorf("install: %w", err)
	}
	if target != path {
		if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
			return true, fmt.Errorf("install: removing converted %s: %w", path, err)
		}
	}
	in.log.Info("chained amesh-cni into the CNI configuration", zap.String("file", target))
	return true, nil
}

// Uninstall removes amesh-cni from every configuration in the conf dir,
// then deletes the binary and the state file. It is idempotent.
func (in *Installer) Uninstall() error {
	entries, err := os.ReadDir(in.cfg.ConfDir)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("install: %w", err)
	}
	for _, e := range entries {
		if e.IsDir() || filepath.Ext(e.Name()) != ".conflist" || strings.HasPrefix(e.Name(), ".") {
			continue
		}
		path := filepath.Join(in.cfg.ConfDir, e.Name())
		data, err := os.ReadFile(path)
		if err != nil {
			return fmt.Errorf("install: %w", err)
		}
		out, err := Unchain(data)
		if err != nil {
			in.log.Warn("skipping unparsable CNI configuration", zap.String("file", path), zap.Error(err))
			continue
		}
		if bytes.Equal(Normalize(data), out) {
			continue
		}
		if err := agentapi.WriteFileAtomic(path, out, 0o644); err != nil {
			return fmt.Errorf("install: %w", err)
		}
		in.log.Info("removed amesh-cni from the CNI configuration", zap.String("file", path))
	}
	if in.cfg.BinDir != "" {
		if err := os.Remove(filepath.Join(in.cfg.BinDir, PluginType)); err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("install: %w", err)
		}
	}
	if in.cfg.StateFile != "" {
		if err := os.Remove(in.cfg.StateFile); err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("install: %w", err)
		}
	}
	return nil
}

// Normalize re-encodes a conflist the way Chain and Unchain write it
// (for comparisons); invalid input is returned as is.
func Normalize(data []byte) []byte {
	list, err := toList(data)
	if err != nil {
		return data
	}
	out, err := encode(list)
	if err != nil {
		return data
	}
	return out
}

func fileHash(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return nil, err
	}
	return h.Sum(nil), nil
}

// installBinary copies src to dst atomically unless dst already has the
// same content.
func installBinary(src, dst string) (bool, error) {
	want, err := fileHash(src)
	if err != nil {
		return false, fmt.Errorf("install: plugin binary: %w", err)
	}
	if have, err := fileHash(dst); err == nil && bytes.Equal(have, want) {
		return false, nil
	}
	data, err := os.ReadFile(src)
	if err != nil {
		return false, fmt.Errorf("install: plugin binary: %w", err)
	}
	if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
		return false, fmt.Errorf("install: %w", err)
	}
	if err := agentapi.WriteFileAtomic(dst, data, 0o755); err != nil {
		return false, fmt.Errorf("install: plugin binary: %w", err)
	}
	return true, nil
}

// Run installs, then keeps the plugin chained: it re-checks whenever the
// conf dir changes (fsnotify) and every Poll interval, until ctx is done.
// ready is called after the first successful install.
func (in *Installer) Run(ctx context.Context, ready func()) error {
	w, err := fsnotify.NewWatcher()
	if err != nil {
		return fmt.Errorf("install: %w", err)
	}
	defer w.Close()
	if err := os.MkdirAll(in.cfg.ConfDir, 0o755); err != nil {
		return fmt.Errorf("install: %w", err)
	}
	if err := w.Add(in.cfg.ConfDir); err != nil {
		return fmt.Errorf("install: watching %s: %w", in.cfg.ConfDir, err)
	}
	tick := time.NewTicker(in.cfg.Poll)
	defer tick.Stop()
	installed := false
	check := func() {
		if _, err := in.Ensure(); err != nil {
			if errors.Is(err, ErrNoPrimary) {
				in.log.Info("waiting for the primary CNI configuration", zap.String("dir", in.cfg.ConfDir))
			} else {
				in.log.Warn("CNI install check failed", zap.Error(err))
			}
			return
		}
		if !installed {
			installed = true
			if ready != nil {
				ready()
			}
		}
	}
	check()
	var debounce <-chan time.Time
	for {
		select {
		case <-ctx.Done():
			return nil
		case ev, ok := <-w.Events:
			if !ok {
				return errors.New("install: watcher closed")
			}
			if strings.HasPrefix(filepath.Base(ev.Name), ".") {
				continue // our own temporary files
			}
			debounce = time.After(100 * time.Millisecond)
		case err := <-w.Errors:
			in.log.Warn("fsnotify", zap.Error(err))
		case <-debounce:
			debounce = nil
			check()
		case <-tick.C:
			check()
		}
	}
}
