// Package cgroup groups the local cluster's processes in cgroup v2 so that
// every process a cluster started — including grandchildren that escaped
// their parent — can be listed and killed, also after a crash.
//
// A cgroup that was killed must be removed and created anew before
// processes are started in it again: on some kernels a child cloned into a
// cgroup (CLONE_INTO_CGROUP) is killed at birth when that cgroup's
// cgroup.kill sequence differs from the parent's.
package cgroup

import (
	"bufio"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// Mount returns where the cgroup v2 hierarchy is mounted (for example
// /sys/fs/cgroup or, on hybrid hosts, /sys/fs/cgroup/unified).
func Mount() (string, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return "", fmt.Errorf("read mountinfo: %w", err)
	}
	defer f.Close()
	s := bufio.NewScanner(f)
	for s.Scan() {
		// id parent major:minor root mountpoint opts [optional...] - fstype source superopts
		fields := strings.Fields(s.Text())
		for i, fld := range fields {
			if fld == "-" && i+1 < len(fields) && fields[i+1] == "cgroup2" && len(fields) > 4 {
				return fields[4], nil
			}
		}
	}
	if err := s.Err(); err != nil {
		return "", fmt.Errorf("read mountinfo: %w", err)
	}
	return "", errors.New("cgroup: no cgroup v2 hierarchy is mounted (the local cluster needs one to track its processes)")
}

// Create makes the cgroup directory path (and its parents).
func Create(path string) error {
	if err := os.MkdirAll(path, 0o755); err != nil {
		return fmt.Errorf("create cgroup %s: %w", path, err)
	}
	return nil
}

// Open returns a directory file descriptor for path, suitable for
// SysProcAttr.CgroupFD (clone3 CLONE_INTO_CGROUP). The caller closes it.
func Open(path string) (*os.File, error) {
	f, err := os.OpenFile(path, unix.O_DIRECTORY|os.O_RDONLY, 0)
	if err != nil {
		return nil, fmt.Errorf("open cgroup %s: %w", path, err)
	}
	return f, nil
}

// Procs lists the process IDs in path and all cgroups below it.
func Procs(path string) ([]int, error) {
	var pids []int
	err := filepath.WalkDir(path, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				return nil
			}
			return err
		}
		if !d.IsDir() {
			return nil
		}
		b, err := os.ReadFile(filepath.Join(p, "cgroup.procs"))
		if errors.Is(err, fs.ErrNotExist) {
			return nil
		}
		if err != nil {
			return err
		}
		for _, l := range strings.Fields(string(b)) {
			if pid, err := strconv.Atoi(l); err == nil {
				pids = append(pids, pid)
			}
		}
		return nil
	})
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("list processes of %s: %w", path, err)
	}
	sort.Ints(pids)
	return pids, nil
}

// Kill sends SIGKILL to every process in path and below (cgroup.kill) and
// waits up to timeout for them to be gone.
func Kill(path string, timeout time.Duration) error {
	if _, err := os.Stat(path); errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err := os.WriteFile(filepath.Join(path, "cgroup.kill"), []byte("1"), 0); err != nil {
		if !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("kill cgroup %s: %w", path, err)
		}
		// Kernels before 5.14 have no cgroup.kill: signal each process.
		pids, err := Procs(path)
		if err != nil {
			return err
		}
		for _, pid := range pids {
			_ = unix.Kill(pid, unix.SIGKILL)
		}
	}
	deadline := time.Now().Add(timeout)
	for {
		pids, err := Procs(path)
		if err != nil {
			return err
		}
		if len(pids) == 0 {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("cgroup %s: processes %v still alive after SIGKILL", path, pids)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Remove kills everything in path and below, then removes the cgroups
// bottom-up. Removing a cgroup that does not exist is not an error.
func Remove(path string, timeout time.Duration) error {
	if err := Kill(path, timeout); err != nil {
		return err
	}
	var dirs []string
	err := filepath.WalkDir(path, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				return nil
			}
			return err
		}
		if d.IsDir() {
			dirs = append(dirs, p)
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("walk cgroup %s: %w", path, err)
	}
	for i := len(dirs) - 1; i >= 0; i-- {
		if err := unix.Rmdir(dirs[i]); err != nil && !errors.Is(err, unix.ENOENT) {
			return fmt.Errorf("remove cgroup %s: %w", dirs[i], err)
		}
	}
	return nil
}
