package cluster

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/amesh-dev/amesh/e2e/internal/image"
	"github.com/amesh-dev/amesh/e2e/internal/node"
	"github.com/amesh-dev/amesh/e2e/internal/sandbox"
)

func netipPrefix(a netip.Addr, bits int) netip.Prefix { return netip.PrefixFrom(a, bits) }

func (c *Cluster) etcdArgs(port, peer int) []string {
	p := c.cfg.pkiDir()
	client := "https://127.0.0.1:" + strconv.Itoa(port)
	peerURL := "http://127.0.0.1:" + strconv.Itoa(peer)
	return []string{
		"--name=" + c.cfg.Name,
		"--data-dir=" + filepath.Join(c.cfg.StateDir, "etcd"),
		"--listen-client-urls=" + client,
		"--advertise-client-urls=" + client,
		"--listen-peer-urls=" + peerURL,
		"--initial-advertise-peer-urls=" + peerURL,
		"--initial-cluster=" + c.cfg.Name + "=" + peerURL,
		"--cert-file=" + filepath.Join(p, "etcd-server.crt"),
		"--key-file=" + filepath.Join(p, "etcd-server.key"),
		"--trusted-ca-file=" + filepath.Join(p, "etcd-ca.crt"),
		"--client-cert-auth=true",
		// A throw-away development cluster: trade durability for speed.
		"--unsafe-no-fsync=true",
		"--snapshot-count=10000",
		"--log-level=warn",
	}
}

func (c *Cluster) apiserverArgs(etcdPort int) []string {
	p := c.cfg.pkiDir()
	host := c.cfg.hostIP().String()
	return []string{
		"--advertise-address=" + host,
		"--bind-address=" + host,
		"--secure-port=" + strconv.Itoa(c.cfg.APIServerPort),
		"--etcd-servers=https://127.0.0.1:" + strconv.Itoa(etcdPort),
		"--etcd-cafile=" + filepath.Join(p, "etcd-ca.crt"),
		"--etcd-certfile=" + filepath.Join(p, "apiserver-etcd-client.crt"),
		"--etcd-keyfile=" + filepath.Join(p, "apiserver-etcd-client.key"),
		"--client-ca-file=" + filepath.Join(p, "ca.crt"),
		"--tls-cert-file=" + filepath.Join(p, "apiserver.crt"),
		"--tls-private-key-file=" + filepath.Join(p, "apiserver.key"),
		"--kubelet-client-certificate=" + filepath.Join(p, "apiserver-kubelet-client.crt"),
		"--kubelet-client-key=" + filepath.Join(p, "apiserver-kubelet-client.key"),
		"--kubelet-certificate-authority=" + filepath.Join(p, "ca.crt"),
		"--kubelet-preferred-address-types=InternalIP,Hostname",
		"--service-cluster-ip-range=" + c.cfg.ServiceCIDR.String(),
		"--service-account-issuer=" + c.cfg.issuer(),
		"--service-account-key-file=" + filepath.Join(p, "sa.pub"),
		"--service-account-signing-key-file=" + filepath.Join(p, "sa.key"),
		"--api-audiences=" + c.cfg.issuer(),
		"--authorization-mode=Node,RBAC",
		"--enable-admission-plugins=NodeRestriction",
		"--allow-privileged=true",
		"--cert-dir=" + filepath.Join(c.cfg.StateDir, "apiserver"),
		"--profiling=false",
		"--event-ttl=1h",
		"--endpoint-reconciler-type=lease",
		"--requestheader-client-ca-file=" + filepath.Join(p, "front-proxy-ca.crt"),
		"--requestheader-allowed-names=front-proxy-client",
		"--requestheader-username-headers=X-Remote-User",
		"--requestheader-group-headers=X-Remote-Group",
		"--requestheader-extra-headers-prefix=X-Remote-Extra-",
		"--proxy-client-cert-file=" + filepath.Join(p, "front-proxy-client.crt"),
		"--proxy-client-key-file=" + filepath.Join(p, "front-proxy-client.key"),
		"--enable-aggregator-routing=true",
	}
}

func (c *Cluster) controllerManagerArgs(port int) []string {
	p := c.cfg.pkiDir()
	kc := filepath.Join(c.cfg.StateDir, "controller-manager.kubeconfig")
	return []string{
		"--kubeconfig=" + kc,
		"--authentication-kubeconfig=" + kc,
		"--authorization-kubeconfig=" + kc,
		"--bind-address=127.0.0.1",
		"--secure-port=" + strconv.Itoa(port),
		"--cert-dir=" + filepath.Join(c.cfg.StateDir, "controller-manager"),
		"--leader-elect=false",
		"--use-service-account-credentials=true",
		"--service-account-private-key-file=" + filepath.Join(p, "sa.key"),
		"--root-ca-file=" + filepath.Join(p, "ca.crt"),
		"--cluster-signing-cert-file=" + filepath.Join(p, "ca.crt"),
		"--cluster-signing-key-file=" + filepath.Join(p, "ca.key"),
		"--cluster-name=" + c.cfg.Name,
		"--cluster-cidr=" + c.cfg.PodCIDR.String(),
		"--service-cluster-ip-range=" + c.cfg.ServiceCIDR.String(),
		"--allocate-node-cidrs=false",
		"--controllers=*,bootstrapsigner,tokencleaner",
		"--profiling=false",
	}
}

func (c *Cluster) schedulerArgs(port int) []string {
	kc := filepath.Join(c.cfg.StateDir, "scheduler.kubeconfig")
	return []string{
		"--kubeconfig=" + kc,
		"--authentication-kubeconfig=" + kc,
		"--authorization-kubeconfig=" + kc,
		"--bind-address=127.0.0.1",
		"--secure-port=" + strconv.Itoa(port),
		"--leader-elect=false",
		"--profiling=false",
	}
}

// Node-view paths (inside a node's root filesystem view).
const (
	nodeStateDir = "/var/lib/amesh-node"
	nodeLogDir   = "/var/log/pods"
	nodeCNIConf  = "/etc/cni/net.d"
)

// imageTable is the effective image table: the optional file's entries,
// then the built-ins.
func (c *Cluster) imageTable() (image.Table, error) {
	t := image.Table{}
	if c.cfg.ImagesFile != "" {
		extra, err := image.Load(c.cfg.ImagesFile)
		if err != nil {
			return image.Table{}, err
		}
		t.Entries = append(t.Entries, extra.Entries...)
	}
	t.Entries = append(t.Entries, image.Default(c.cfg.BinDir, c.cfg.CoreDNS).Entries...)
	return t, nil
}

// writeNodeFiles lays out node i's directory: its root filesystem layers,
// /run, /tmp, state (config, kubeconfigs, images), logs and CNI config.
func (c *Cluster) writeNodeFiles(i int, version string) error {
	d := c.cfg.NodeDir(i)
	for _, sub := range []string{"rootfs", "root", "run", "tmp", "state", "logs", "cni"} {
		if err := os.MkdirAll(filepath.Join(d, sub), 0o755); err != nil {
			return fmt.Errorf("create node dir: %w", err)
		}
	}
	if err := os.Chmod(filepath.Join(d, "tmp"), 0o1777); err != nil {
		return err
	}
	st := c.cfg.nodeStateDir(i)
	table, err := c.imageTable()
	if err != nil {
		return err
	}
	if err := writeJSON(filepath.Join(st, "images.json"), table); err != nil {
		return err
	}
	proxyCfg := fmt.Sprintf(`apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection:
  kubeconfig: %s/kube-proxy.kubeconfig
hostnameOverride: %s
clusterCIDR: %s
mode: %s
detectLocalMode: ClusterCIDR
metricsBindAddress: 127.0.0.1:10249
healthzBindAddress: 0.0.0.0:10256
conntrack:
  maxPerCore: 0
  min: 0
  tcpEstablishedTimeout: 0s
  tcpCloseWaitTimeout: 0s
`, nodeStateDir, c.cfg.NodeName(i), c.cfg.PodCIDR, c.cfg.ProxyMode)
	if err := os.WriteFile(filepath.Join(st, "kube-proxy.yaml"), []byte(proxyCfg), 0o644); err != nil {
		return err
	}
	pod := c.cfg.NodePodCIDR(i)
	conflist := map[string]any{
		"cniVersion": "1.0.0",
		"name":       "amesh-cluster",
		"plugins": []any{
			map[string]any{
				"type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": false, "hairpinMode": true,
				"ipam": map[string]any{
					"type":   "host-local",
					"ranges": [][]map[string]string{{{"subnet": pod.String(), "gateway": pod.Addr().Next().String()}}},
					"routes": []map[string]string{{"dst": "0.0.0.0/0"}},
				},
			},
			map[string]any{"type": "portmap", "capabilities": map[string]bool{"portMappings": true}},
		},
	}
	if err := writeJSON(filepath.Join(d, "cni", "10-amesh-cluster.conflist"), conflist); err != nil {
		return err
	}
	nc := node.Config{
		NodeName:          c.cfg.NodeName(i),
		ClusterName:       c.cfg.Name,
		Kubeconfig:        nodeStateDir + "/kubeconfig",
		NodeIP:            c.cfg.NodeIP(i),
		PodCIDR:           pod,
		ClusterDNS:        c.cfg.DNSIP(),
		ClusterDomain:     c.cfg.ClusterDomain,
		StateDir:          nodeStateDir,
		LogDir:            nodeLogDir,
		CNIConfDir:        nodeCNIConf,
		CgroupDir:         filepath.Join(c.cgroup, "nodes", c.cfg.NodeName(i)),
		Helper:            c.cfg.NodeBinary,
		ImagesFile:        nodeStateDir + "/images.json",
		ServingCrt:        nodeStateDir + "/pki/kubelet.crt",
		ServingKey:        nodeStateDir + "/pki/kubelet.key",
		ClientCA:          nodeStateDir + "/pki/ca.crt",
		Version:           version,
		RestartBackoff:    node.Duration(c.cfg.RestartBackoff),
		MaxRestartBackoff: node.Duration(max(5*time.Minute, c.cfg.RestartBackoff)),
		Daemons: []node.Daemon{{
			Name: "kube-proxy",
			Args: []string{filepath.Join(c.cfg.KubeBinDir, "kube-proxy"), "--config=" + nodeStateDir + "/kube-proxy.yaml"},
		}},
	}
	nc.Default()
	if err := nc.Validate(); err != nil {
		return err
	}
	return writeJSON(filepath.Join(st, "config.json"), nc)
}

func writeJSON(path string, v any) error {
	raw, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	return os.WriteFile(path, raw, 0o644)
}

// binDirs are host directories the node views must see at the same path
// (the binaries the nodes run and the image table's files).
func (c *Cluster) binDirs() []string {
	dirs := []string{filepath.Dir(c.cfg.NodeBinary), c.cfg.KubeBinDir, filepath.Dir(c.cfg.CoreDNS), c.cfg.BinDir}
	if t, err := c.imageTable(); err == nil {
		for _, e := range t.Entries {
			for _, host := range e.Files {
				dirs = append(dirs, filepath.Dir(host))
			}
		}
	}
	var out []string
	for _, d := range dirs {
		d = filepath.Clean(d)
		if strings.HasPrefix(d+"/", c.cfg.StateDir+"/") || slices.Contains(out, d) {
			continue
		}
		if st, err := os.Stat(d); err != nil || !st.IsDir() {
			continue
		}
		out = append(out, d)
	}
	slices.Sort(out)
	return out
}

// nodeStart starts node i's agent inside the node: its network namespace,
// and a mount namespace whose root is an overlay of the host's root with
// the node's own persistent upper layer, /run, /tmp, state, logs and CNI
// config. hostPath volumes of the node's pods therefore land in the node's
// own layer, and every node sees the same paths.
func (c *Cluster) nodeStart(i int) func(logf, cg *os.File) (*exec.Cmd, error) {
	d := c.cfg.NodeDir(i)
	return func(logf, cg *os.File) (*exec.Cmd, error) {
		if err := os.MkdirAll(c.cfg.BinDir, 0o755); err != nil {
			return nil, err
		}
		mounts := []sandbox.Mount{
			{Type: "bind", Source: filepath.Join(d, "run"), Target: "/run"},
			{Type: "bind", Source: filepath.Join(d, "tmp"), Target: "/tmp"},
			{Type: "bind", Source: "/sys/fs/cgroup", Target: "/sys/fs/cgroup"},
			{Type: "tmpfs", Target: c.cfg.StateDir, Data: "mode=755,size=4k", ReadOnly: true},
			{Type: "bind", Source: c.cfg.nodeStateDir(i), Target: nodeStateDir},
			{Type: "bind", Source: filepath.Join(d, "logs"), Target: nodeLogDir},
			{Type: "bind", Source: filepath.Join(d, "cni"), Target: nodeCNIConf},
		}
		for _, b := range c.binDirs() {
			mounts = append(mounts, sandbox.Mount{Type: "bind", Source: b, Target: b, ReadOnly: true})
		}
		spec := &sandbox.Spec{
			Netns:      filepath.Join(netnsDir(), c.cfg.NodeNetns(i)),
			Hostname:   c.cfg.NodeName(i),
			Scratch:    filepath.Join(d, "root"),
			Upper:      filepath.Join(d, "rootfs"),
			Privileged: true,
			Mounts:     mounts,
			Args:       []string{c.cfg.NodeBinary, "--config=" + nodeStateDir + "/config.json"},
			Env:        []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/root"},
		}
		return sandbox.Start(spec, sandbox.Options{Helper: c.cfg.NodeBinary, Stdout: logf, Stderr: logf, Cgroup: cg, NewIPC: true, Pdeathsig: syscall.SIGKILL, Spawner: c.spawner})
	}
}

func netnsDir() string { return "/run/netns" }
