package sandbox

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"

	securejoin "github.com/cyphar/filepath-securejoin"
	"golang.org/x/sys/unix"
)

// File descriptors the parent hands to the init helper.
const (
	statusFD = 3 // write end of the status pipe (close-on-exec)
	specFD   = 4 // read end of the spec pipe
)

const defaultPath = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

// Init runs in the helper process started by Start: it reads the spec,
// builds the sandbox and execs the workload. It only returns on failure,
// after reporting the error to the parent; the caller should exit non-zero.
func Init() error {
	// Everything below must happen on the thread that calls execve: network
	// namespace, capabilities and the sysfs mount are per thread.
	runtime.LockOSThread()
	status := os.NewFile(statusFD, "status")
	unix.CloseOnExec(statusFD)
	err := initSandbox()
	if status != nil {
		fmt.Fprint(status, err.Error())
		status.Close()
	}
	return err
}

func initSandbox() error {
	specFile := os.NewFile(specFD, "spec")
	if specFile == nil {
		return errors.New("sandbox init: no spec descriptor")
	}
	raw, err := io.ReadAll(specFile)
	specFile.Close()
	if err != nil {
		return fmt.Errorf("read spec: %w", err)
	}
	var s Spec
	if err := json.Unmarshal(raw, &s); err != nil {
		return fmt.Errorf("decode spec: %w", err)
	}
	if err := s.Validate(); err != nil {
		return err
	}
	if s.Netns != "" {
		fd, err := unix.Open(s.Netns, unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			return fmt.Errorf("open network namespace %s: %w", s.Netns, err)
		}
		err = unix.Setns(fd, unix.CLONE_NEWNET)
		unix.Close(fd)
		if err != nil {
			return fmt.Errorf("join network namespace %s: %w", s.Netns, err)
		}
	}
	if s.Hostname != "" {
		if err := unix.Sethostname([]byte(s.Hostname)); err != nil {
			return fmt.Errorf("set hostname: %w", err)
		}
	}
	root, err := buildRoot(&s)
	if err != nil {
		return err
	}
	if err := pivot(root); err != nil {
		return err
	}
	if s.ReadOnlyRoot {
		if err := unix.Mount("", "/", "", unix.MS_REMOUNT|unix.MS_BIND|unix.MS_RDONLY, ""); err != nil {
			return fmt.Errorf("make root read-only: %w", err)
		}
	}
	for k, v := range s.Sysctls {
		p := filepath.Join("/proc/sys", strings.ReplaceAll(k, ".", "/"))
		if err := os.WriteFile(p, []byte(v), 0); err != nil {
			return fmt.Errorf("sysctl %s=%s: %w", k, v, err)
		}
	}
	return execWorkload(&s)
}

// buildRoot mounts the overlay root and everything in it; it returns the
// root's path in the current (not yet pivoted) view.
func buildRoot(s *Spec) (string, error) {
	// Nothing mounted here may propagate back to the parent's namespace;
	// slave (not private) so that HostToContainer volumes keep receiving.
	if err := unix.Mount("", "/", "", unix.MS_REC|unix.MS_SLAVE, ""); err != nil {
		return "", fmt.Errorf("make mounts slave: %w", err)
	}
	base := s.Upper
	if base == "" {
		if err := unix.Mount("tmpfs", s.Scratch, "tmpfs", unix.MS_NOSUID|unix.MS_NODEV, "mode=755"); err != nil {
			return "", fmt.Errorf("mount scratch tmpfs: %w", err)
		}
		base = s.Scratch
	}
	upper, work := filepath.Join(base, "upper"), filepath.Join(base, "work")
	root := s.Scratch
	if s.Upper == "" {
		root = filepath.Join(s.Scratch, "root")
	}
	for _, d := range []string{upper, work, root} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return "", fmt.Errorf("create %s: %w", d, err)
		}
	}
	lower := s.Lower
	if lower == "" {
		lower = "/"
	}
	opts := fmt.Sprintf("lowerdir=%s,upperdir=%s,workdir=%s", lower, upper, work)
	if err := unix.Mount("overlay", root, "overlay", 0, opts); err != nil {
		return "", fmt.Errorf("mount overlay root (%s): %w", opts, err)
	}

	if err := mountAt(root, Mount{Type: "proc", Source: "proc", Target: "/proc"}, true); err != nil {
		return "", err
	}
	if err := mountAt(root, Mount{Type: "sysfs", Source: "sysfs", Target: "/sys", ReadOnly: !s.Privileged}, true); err != nil {
		return "", err
	}
	if err := mountDev(root, s.Privileged); err != nil {
		return "", err
	}
	for _, m := range s.Mounts {
		if err := mountAt(root, m, false); err != nil {
			return "", err
		}
	}
	for _, f := range s.Files {
		if err := writeFile(root, f); err != nil {
			return "", err
		}
	}
	return root, nil
}

// mountAt mounts m below root, creating the mount point. Symlinks in the
// target are resolved inside root, never outside it.
func mountAt(root string, m Mount, dir bool) error {
	target, err := securejoin.SecureJoin(root, m.Target)
	if err != nil {
		return fmt.Errorf("resolve %s: %w", m.Target, err)
	}
	isDir := dir || m.Type != "bind"
	if m.Type == "bind" {
		st, err := os.Stat(m.Source)
		if err != nil {
			return fmt.Errorf("bind source %s: %w", m.Source, err)
		}
		isDir = st.IsDir()
	}
	if isDir {
		if err := os.MkdirAll(target, 0o755); err != nil {
			return fmt.Errorf("create mount point %s: %w", m.Target, err)
		}
	} else {
		if err := os.MkdirAll(filepath.Dir(target), 0o755); err != nil {
			return fmt.Errorf("create mount point dir for %s: %w", m.Target, err)
		}
		f, err := os.OpenFile(target, os.O_CREATE|os.O_RDONLY, 0o644)
		if err != nil {
			return fmt.Errorf("create mount point %s: %w", m.Target, err)
		}
		f.Close()
	}
	var flags uintptr
	source, fstype := m.Source, m.Type
	if m.Type == "bind" {
		flags = unix.MS_BIND | unix.MS_REC
		fstype = ""
	} else {
		flags = unix.MS_NOSUID
		if m.Type != "devpts" && m.Target != "/dev" {
			flags |= unix.MS_NODEV
		}
		if m.Type == "proc" || m.Type == "sysfs" {
			flags |= unix.MS_NOEXEC
		}
		if m.ReadOnly {
			flags |= unix.MS_RDONLY
		}
		if source == "" {
			source = m.Type
		}
	}
	if err := unix.Mount(source, target, fstype, flags, m.Data); err != nil {
		return fmt.Errorf("mount %s %s at %s: %w", m.Type, m.Source, m.Target, err)
	}
	if m.Type == "bind" && m.ReadOnly {
		if err := unix.Mount("", target, "", unix.MS_BIND|unix.MS_REMOUNT|unix.MS_RDONLY, ""); err != nil {
			return fmt.Errorf("make %s read-only: %w", m.Target, err)
		}
	}
	switch m.Propagation {
	case "", PropagationPrivate:
		if m.Type == "bind" {
			if err := unix.Mount("", target, "", unix.MS_REC|unix.MS_PRIVATE, ""); err != nil {
				return fmt.Errorf("make %s private: %w", m.Target, err)
			}
		}
	case PropagationShared:
		if err := unix.Mount("", target, "", unix.MS_REC|unix.MS_SHARED, ""); err != nil {
			return fmt.Errorf("make %s shared: %w", m.Target, err)
		}
	case PropagationSlave:
		// A bind of a slave mount is already a slave of the same master.
	}
	return nil
}

// mountDev gives privileged sandboxes the caller's /dev and everyone else a
// minimal /dev like a container runtime's.
func mountDev(root string, privileged bool) error {
	if privileged {
		return mountAt(root, Mount{Type: "bind", Source: "/dev", Target: "/dev"}, true)
	}
	if err := mountAt(root, Mount{Type: "tmpfs", Target: "/dev", Data: "mode=755,size=65536k"}, true); err != nil {
		return err
	}
	for _, d := range []string{"null", "zero", "full", "random", "urandom", "tty"} {
		if err := mountAt(root, Mount{Type: "bind", Source: "/dev/" + d, Target: "/dev/" + d}, false); err != nil {
			return err
		}
	}
	if err := mountAt(root, Mount{Type: "devpts", Target: "/dev/pts", Data: "newinstance,ptmxmode=0666,mode=0620"}, true); err != nil {
		return err
	}
	if err := mountAt(root, Mount{Type: "tmpfs", Target: "/dev/shm", Data: "mode=1777,size=65536k"}, true); err != nil {
		return err
	}
	links := map[string]string{
		"ptmx": "pts/ptmx", "fd": "/proc/self/fd", "stdin": "/proc/self/fd/0",
		"stdout": "/proc/self/fd/1", "stderr": "/proc/self/fd/2",
	}
	for name, to := range links {
		if err := os.Symlink(to, filepath.Join(root, "dev", name)); err != nil {
			return fmt.Errorf("create /dev/%s: %w", name, err)
		}
	}
	return nil
}

func writeFile(root string, f File) error {
	p, err := securejoin.SecureJoin(root, f.Path)
	if err != nil {
		return fmt.Errorf("resolve %s: %w", f.Path, err)
	}
	// The lower layer may hold a symlink at the path (resolv.conf often is
	// one); SecureJoin followed it, so write to the link's own path instead.
	if lp := filepath.Join(root, filepath.Clean(f.Path)); lp != p {
		if st, err := os.Lstat(lp); err == nil && st.Mode()&os.ModeSymlink != 0 {
			if err := os.Remove(lp); err != nil {
				return fmt.Errorf("replace symlink %s: %w", f.Path, err)
			}
			p = lp
		}
	}
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		return fmt.Errorf("create dir for %s: %w", f.Path, err)
	}
	mode := os.FileMode(f.Mode)
	if mode == 0 {
		mode = 0o644
	}
	if err := os.WriteFile(p, f.Content, mode); err != nil {
		return fmt.Errorf("write %s: %w", f.Path, err)
	}
	return nil
}

// pivot makes root the root of the mount namespace and detaches the old one.
func pivot(root string) error {
	if err := unix.Chdir(root); err != nil {
		return fmt.Errorf("enter new root: %w", err)
	}
	if err := unix.PivotRoot(".", "."); err != nil {
		return fmt.Errorf("pivot_root: %w", err)
	}
	if err := unix.Unmount(".", unix.MNT_DETACH); err != nil {
		return fmt.Errorf("detach old root: %w", err)
	}
	if err := unix.Chdir("/"); err != nil {
		return fmt.Errorf("chdir /: %w", err)
	}
	return nil
}

func execWorkload(s *Spec) error {
	uid, gid := uint32(0), uint32(0)
	if s.UID != nil {
		uid = *s.UID
	}
	if s.GID != nil {
		gid = *s.GID
	}
	caps, err := capNumbers(s.Caps)
	if err != nil {
		return err
	}
	if uid != 0 && caps == nil {
		// "All capabilities" for a non-root user.
		for c := 0; c <= lastCap(); c++ {
			caps = append(caps, c)
		}
	}
	if err := dropBounding(caps); err != nil {
		return err
	}
	if s.NoNewPrivs {
		if err := unix.Prctl(unix.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0); err != nil {
			return fmt.Errorf("set no_new_privs: %w", err)
		}
	}
	if uid != 0 || gid != 0 || len(s.Groups) > 0 {
		if err := unix.Prctl(unix.PR_SET_KEEPCAPS, 1, 0, 0, 0); err != nil {
			return fmt.Errorf("keep capabilities: %w", err)
		}
		groups := make([]int, len(s.Groups))
		for i, g := range s.Groups {
			groups[i] = int(g)
		}
		if err := syscall.Setgroups(groups); err != nil {
			return fmt.Errorf("set groups: %w", err)
		}
		if err := syscall.Setresgid(int(gid), int(gid), int(gid)); err != nil {
			return fmt.Errorf("set gid %d: %w", gid, err)
		}
		if err := syscall.Setresuid(int(uid), int(uid), int(uid)); err != nil {
			return fmt.Errorf("set uid %d: %w", uid, err)
		}
	}
	if uid != 0 {
		if err := raiseAmbient(caps); err != nil {
			return err
		}
	}
	dir := s.Dir
	if dir == "" {
		dir = "/"
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("create working directory %s: %w", dir, err)
	}
	if err := unix.Chdir(dir); err != nil {
		return fmt.Errorf("enter working directory %s: %w", dir, err)
	}
	path, err := lookPath(s.Args[0], s.Env)
	if err != nil {
		return err
	}
	if err := unix.Exec(path, s.Args, s.Env); err != nil {
		return fmt.Errorf("exec %s: %w", path, err)
	}
	return nil
}

// lookPath resolves a command the way execvp does, with the workload's PATH.
func lookPath(cmd string, env []string) (string, error) {
	if strings.Contains(cmd, "/") {
		return cmd, nil
	}
	path := defaultPath
	for _, e := range env {
		if v, ok := strings.CutPrefix(e, "PATH="); ok {
			path = v
		}
	}
	for _, dir := range filepath.SplitList(path) {
		if dir == "" {
			dir = "."
		}
		p := filepath.Join(dir, cmd)
		if st, err := os.Stat(p); err == nil && !st.IsDir() && st.Mode()&0o111 != 0 {
			return p, nil
		}
	}
	return "", fmt.Errorf("executable %q not found in PATH %s", cmd, path)
}
