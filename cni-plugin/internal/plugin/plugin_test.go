package plugin

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"

	"github.com/amesh-dev/amesh/cni-plugin/internal/agentapi"
)

var pluginPath string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "amesh-cni-test-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	pluginPath = filepath.Join(dir, "amesh-cni")
	if out, err := exec.Command("go", "build", "-o", pluginPath, "../../cmd/amesh-cni").CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "build: %v\n%s", err, out)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// prev031 is a 0.3.1 result as ptp/bridge + host-local return it.
const prev031 = `{"cniVersion":"0.3.1","interfaces":[{"name":"eth0","sandbox":"/var/run/netns/x"}],"ips":[{"version":"4","address":"10.1.0.5/24","gateway":"10.1.0.1","interface":0}],"routes":[{"dst":"0.0.0.0/0"}],"dns":{}}`

const prev10 = `{"cniVersion":"1.0.0","interfaces":[{"name":"eth0","sandbox":"/var/run/netns/x"}],"ips":[{"address":"10.1.0.5/24","interface":0}]}`

// run executes the plugin binary like a runtime and returns stdout and the
// CNI error it printed (nil on success).
func run(t *testing.T, command, stdin, cniArgs string) (string, *types.Error) {
	t.Helper()
	c := exec.Command(pluginPath)
	c.Stdin = strings.NewReader(stdin)
	c.Env = []string{"CNI_COMMAND=" + command, "CNI_CONTAINERID=abc", "CNI_NETNS=/var/run/netns/does-not-matter",
		"CNI_IFNAME=eth0", "CNI_PATH=/usr/lib/cni", "CNI_ARGS=" + cniArgs}
	out, err := c.Output()
	if err == nil {
		return string(out), nil
	}
	var e types.Error
	if jerr := json.Unmarshal(out, &e); jerr != nil {
		t.Fatalf("plugin failed without a CNI error (%v): %q", err, out)
	}
	return string(out), &e
}

func TestErrors(t *testing.T) {
	dir := t.TempDir()
	sock := filepath.Join(dir, "none.sock")
	state := filepath.Join(dir, "state.json")
	// The agent excludes "infra" besides the defaults; this conflist's
	// entry predates that (it lists only the defaults).
	if err := agentapi.WriteState(state, &agentapi.State{ExcludedNamespaces: []string{"amesh-system", "infra", "kube-system"}}); err != nil {
		t.Fatal(err)
	}
	conf := func(version, extra string) string {
		return fmt.Sprintf(`{"cniVersion":%q,"name":"n","type":"amesh-cni","agentSocket":%q,"stateFile":%q%s}`, version, sock, state, extra)
	}
	podArgs := func(ns string) string { return "K8S_POD_NAMESPACE=" + ns + ";K8S_POD_NAME=p;K8S_POD_UID=u" }
	for _, tc := range []struct {
		name    string
		command string
		stdin   string
		args    string
		code    uint // 0 = success
	}{
		{"not json", "ADD", `{"cniVersion":`, podArgs("x"), types.ErrDecodingFailure},
		{"empty stdin", "ADD", ``, podArgs("x"), types.ErrDecodingFailure},
		{"wrong field type", "ADD", conf("1.0.0", `,"excludeNamespaces":"kube-system","prevResult":`+prev10), podArgs("x"), types.ErrDecodingFailure},
		{"unsupported version", "ADD", conf("0.2.0", `,"prevResult":`+prev10), podArgs("x"), types.ErrIncompatibleCNIVersion},
		// kindnet, flannel and Calico write 0.3.1 conflists; libcni passes
		// the list's version to every plugin of the chain.
		{"agent down, 0.3.1", "ADD", conf("0.3.1", `,"prevResult":`+prev031), podArgs("kube-system"), 0},
		{"agent down, 0.3.0", "ADD", conf("0.3.0", `,"prevResult":`+strings.Replace(prev031, "0.3.1", "0.3.0", 1)), podArgs("kube-system"), 0},
		{"0.3.1 prevResult bad ip", "ADD", conf("0.3.1", `,"prevResult":{"cniVersion":"0.3.1","ips":[{"version":"4","address":"10.1.0.500/24"}]}`), podArgs("x"), types.ErrDecodingFailure},
		{"DEL 0.3.1 agent down", "DEL", conf("0.3.1", ``), podArgs("mesh"), 0},
		{"garbage version", "ADD", conf("one", `,"prevResult":`+prev10), podArgs("x"), types.ErrIncompatibleCNIVersion},
		{"future version", "ADD", conf("9.0.0", `,"prevResult":`+prev10), podArgs("x"), types.ErrIncompatibleCNIVersion},
		{"no prevResult", "ADD", conf("1.0.0", ``), podArgs("x"), types.ErrInvalidNetworkConfig},
		{"prevResult not an object", "ADD", conf("1.0.0", `,"prevResult":[1,2]`), podArgs("x"), types.ErrDecodingFailure},
		{"prevResult bad ip", "ADD", conf("1.0.0", `,"prevResult":{"cniVersion":"1.0.0","ips":[{"address":"10.1.0.500/24"}]}`), podArgs("x"), types.ErrDecodingFailure},
		{"prevResult bad interface index", "ADD", conf("1.0.0", `,"prevResult":{"cniVersion":"1.0.0","ips":[{"address":"10.1.0.5/24","interface":-7}]}`), podArgs("infra"), 0},
		{"bad agentTimeout", "ADD", conf("1.0.0", `,"agentTimeout":"soon","prevResult":`+prev10), podArgs("x"), types.ErrInvalidNetworkConfig},
		{"bad CNI_ARGS", "ADD", conf("1.0.0", `,"prevResult":`+prev10), "K8S_POD_NAME", types.ErrInvalidEnvironmentVariables},
		// Agent unreachable: every pod is refused (a pod may be enrolled
		// by its own label, or its namespace labelled while the agent was
		// away), except those of the namespaces the agent excludes.
		{"agent down, plain namespace", "ADD", conf("1.0.0", `,"prevResult":`+prev10), podArgs("plain"), types.ErrTryAgainLater},
		{"agent down, enrolled namespace", "ADD", conf("1.0.0", `,"prevResult":`+prev10), podArgs("mesh"), types.ErrTryAgainLater},
		{"agent down, excluded namespace", "ADD", conf("1.0.0", `,"prevResult":`+prev10), podArgs("kube-system"), 0},
		{"agent down, excluded per state file", "ADD", conf("1.0.0", `,"prevResult":`+prev10), podArgs("infra"), 0},
		{"agent down, not a pod", "ADD", conf("1.0.0", `,"prevResult":`+prev10), "", 0},
		{"agent down, 0.4.0", "ADD", conf("0.4.0", `,"prevResult":{"cniVersion":"0.4.0","ips":[{"version":"4","address":"10.1.0.5/24"}]}`), podArgs("plain"), types.ErrTryAgainLater},
		{"agent down, 0.4.0, excluded", "ADD", conf("0.4.0", `,"prevResult":{"cniVersion":"0.4.0","ips":[{"version":"4","address":"10.1.0.5/24"}]}`), podArgs("infra"), 0},
		{"agent down, 1.1.0", "ADD", conf("1.1.0", `,"prevResult":`+strings.Replace(prev10, "1.0.0", "1.1.0", 1)), podArgs("infra"), 0},
		{"DEL agent down", "DEL", conf("1.0.0", ``), podArgs("mesh"), 0},
		{"DEL malformed", "DEL", `nope`, podArgs("mesh"), types.ErrDecodingFailure},
		{"CHECK agent down enrolled", "CHECK", conf("1.0.0", `,"prevResult":`+prev10), podArgs("mesh"), types.ErrTryAgainLater},
		{"CHECK agent down plain", "CHECK", conf("1.0.0", `,"prevResult":`+prev10), podArgs("plain"), types.ErrTryAgainLater},
		{"CHECK agent down excluded per state file", "CHECK", conf("1.0.0", `,"prevResult":`+prev10), podArgs("infra"), 0},
		{"CHECK 0.3.1 not defined", "CHECK", conf("0.3.1", `,"prevResult":`+prev031), podArgs("mesh"), types.ErrIncompatibleCNIVersion},
		{"CHECK 0.3.0 not defined", "CHECK", conf("0.3.0", `,"prevResult":`+prev031), podArgs("mesh"), types.ErrIncompatibleCNIVersion},
		{"STATUS agent down", "STATUS", conf("1.1.0", ``), "", types.ErrPluginNotAvailable},
		{"unknown command", "FROB", conf("1.0.0", ``), "", types.ErrInvalidEnvironmentVariables},
	} {
		t.Run(tc.name, func(t *testing.T) {
			out, e := run(t, tc.command, tc.stdin, tc.args)
			switch {
			case tc.code == 0 && e != nil:
				t.Fatalf("want success, got %+v", e)
			case tc.code != 0 && e == nil:
				t.Fatalf("want code %d, got success: %s", tc.code, out)
			case tc.code != 0 && e.Code != tc.code:
				t.Fatalf("want code %d, got %+v", tc.code, e)
			}
			if tc.code == 0 && tc.command == "ADD" && !strings.Contains(out, "10.1.0.5") {
				t.Fatalf("ADD did not pass prevResult through: %s", out)
			}
		})
	}
	// The refusal says why, for kubectl describe.
	if _, e := run(t, "ADD", conf("1.0.0", `,"prevResult":`+prev10), podArgs("plain")); e == nil || !strings.Contains(e.Msg, "node agent unreachable") {
		t.Errorf("refusal message = %+v, want it to name the unreachable node agent", e)
	}

	// No state file (or an unreadable one): only the mesh's own system
	// namespace passes, so that the mesh can always come up. (This entry
	// excludes nothing itself.)
	noExcl := conf("1.0.0", `,"excludeNamespaces":[],"prevResult":`+prev10)
	for _, stateContent := range []string{"", "{not json"} {
		if stateContent == "" {
			if err := os.Remove(state); err != nil && !os.IsNotExist(err) {
				t.Fatal(err)
			}
		} else if err := os.WriteFile(state, []byte(stateContent), 0o644); err != nil {
			t.Fatal(err)
		}
		for ns, want := range map[string]uint{"plain": types.ErrTryAgainLater, "infra": types.ErrTryAgainLater,
			"kube-system": types.ErrTryAgainLater, agentapi.SystemNamespace: 0} {
			_, e := run(t, "ADD", noExcl, podArgs(ns))
			if (want == 0) != (e == nil) || (e != nil && e.Code != want) {
				t.Errorf("state %q: ADD in %s with agent down = %+v, want code %d", stateContent, ns, e, want)
			}
		}
	}
	// A state file of an older agent (no exclusion list) says nothing
	// either.
	if err := agentapi.WriteState(state, &agentapi.State{}); err != nil {
		t.Fatal(err)
	}
	if _, e := run(t, "ADD", noExcl, podArgs(agentapi.SystemNamespace)); e != nil {
		t.Errorf("old state file: ADD in %s = %+v, want success", agentapi.SystemNamespace, e)
	}
	if _, e := run(t, "ADD", noExcl, podArgs("kube-system")); e == nil || e.Code != types.ErrTryAgainLater {
		t.Errorf("old state file: ADD in kube-system = %+v, want code 11", e)
	}
}

// TestResultVersion: ADD prints prevResult in the configuration's own
// version, as the runtime (and the next plugin) expects it.
func TestResultVersion(t *testing.T) {
	dir := t.TempDir()
	withVersion := func(prev, from, to string) string {
		return strings.Replace(prev, `"cniVersion":"`+from+`"`, `"cniVersion":"`+to+`"`, 1)
	}
	for _, tc := range []struct{ v, prev string }{
		{"0.3.0", withVersion(prev031, "0.3.1", "0.3.0")},
		{"0.3.1", prev031},
		{"0.4.0", withVersion(prev031, "0.3.1", "0.4.0")},
		{"1.0.0", prev10},
		{"1.1.0", withVersion(prev10, "1.0.0", "1.1.0")},
	} {
		v, prev := tc.v, tc.prev
		t.Run(v, func(t *testing.T) {
			stdin := fmt.Sprintf(`{"cniVersion":%q,"name":"n","type":"amesh-cni","agentSocket":%q,"stateFile":%q,"prevResult":%s}`,
				v, filepath.Join(dir, "none.sock"), filepath.Join(dir, "none.json"), prev)
			out, e := run(t, "ADD", stdin, "K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME=p;K8S_POD_UID=u")
			if e != nil {
				t.Fatalf("ADD: %+v", e)
			}
			var res struct {
				CNIVersion string `json:"cniVersion"`
				IPs        []struct {
					Address string `json:"address"`
				} `json:"ips"`
			}
			if err := json.Unmarshal([]byte(out), &res); err != nil {
				t.Fatalf("result %q: %v", out, err)
			}
			if res.CNIVersion != v || len(res.IPs) != 1 || res.IPs[0].Address != "10.1.0.5/24" {
				t.Fatalf("result = %s, want version %s with 10.1.0.5/24", out, v)
			}
		})
	}
}

func TestVersion(t *testing.T) {
	out, e := run(t, "VERSION", `{"cniVersion":"1.0.0"}`, "")
	if e != nil {
		t.Fatal(e)
	}
	for _, v := range SupportedVersions() {
		if !strings.Contains(out, v) {
			t.Errorf("VERSION lacks %s: %s", v, out)
		}
	}
}

// FuzzParse: no input makes the plugin panic; every failure is a CNI error.
func FuzzParse(f *testing.F) {
	f.Add([]byte(`{"cniVersion":"1.0.0","name":"n","type":"amesh-cni","prevResult":`+prev10+`}`), "K8S_POD_NAME=a;K8S_POD_NAMESPACE=b")
	f.Add([]byte(`{"cniVersion":"0.4.0","prevResult":{"ips":[{"version":"4","address":"10.0.0.1/8","gateway":"10.0.0.254"}],"routes":[{"dst":"0.0.0.0/0"}],"dns":{}}}`), "")
	f.Add([]byte(`{"cniVersion":"1.1.0","prevResult":{"cniVersion":"0.4.0"}}`), "IgnoreUnknown=1")
	f.Add([]byte(`{"cniVersion":"0.3.1","name":"kindnet","type":"amesh-cni","prevResult":`+prev031+`}`), "K8S_POD_NAME=a;K8S_POD_NAMESPACE=b")
	f.Add([]byte(`{"cniVersion":"1.0.0","prevResult":{"interfaces":[{"name":"x","mac":"zz"}],"ips":[{"address":"1.2.3.4/33","interface":99}]}}`), "a=b=c")
	f.Fuzz(func(t *testing.T, stdin []byte, args string) {
		conf, err := parseConfig(stdin)
		if err != nil {
			if _, ok := err.(*types.Error); !ok {
				t.Fatalf("non-CNI error %T: %v", err, err)
			}
			return
		}
		_ = conf.podIPs()
		if _, err := parseArgs(args); err != nil {
			if _, ok := err.(*types.Error); !ok {
				t.Fatalf("non-CNI error %T: %v", err, err)
			}
		}
		// load (the whole ADD input path) must not panic either.
		_, _ = load(&skel.CmdArgs{StdinData: stdin, Args: args, ContainerID: "c", Netns: "/nonexistent"})
	})
}

// silentAgent listens on a unix socket and takes every request without
// answering: it holds the connection (hold) or closes it at once.
func silentAgent(t *testing.T, sock string, hold bool) {
	t.Helper()
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	var mu sync.Mutex
	var conns []net.Conn
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		for _, c := range conns {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			_, _ = c.Read(make([]byte, 4096)) // the request
			if !hold {
				c.Close()
				continue
			}
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
		}
	})
}

// TestAgentSilent: an agent that takes the request and never answers (it
// is stuck deciding, or dies mid-request) is not an absent agent. The
// plugin must not fall back on the state file — which knows only labelled
// namespaces, not pods enrolled by their own label — and let the pod
// start unprotected: ADD and CHECK fail with "try again later". DEL still
// succeeds.
func TestAgentSilent(t *testing.T) {
	for _, hold := range []bool{true, false} {
		t.Run(fmt.Sprintf("hold=%v", hold), func(t *testing.T) {
			dir := t.TempDir()
			sock := filepath.Join(dir, "agent.sock")
			state := filepath.Join(dir, "state.json")
			if err := agentapi.WriteState(state, &agentapi.State{ExcludedNamespaces: []string{"plain"}}); err != nil {
				t.Fatal(err)
			}
			silentAgent(t, sock, hold)
			conf := fmt.Sprintf(`{"cniVersion":"1.0.0","name":"n","type":"amesh-cni","agentSocket":%q,"stateFile":%q,"agentTimeout":"300ms","prevResult":%s}`,
				sock, state, prev10)
			args := "K8S_POD_NAMESPACE=plain;K8S_POD_NAME=p;K8S_POD_UID=u"
			for _, cmd := range []string{"ADD", "CHECK"} {
				if out, e := run(t, cmd, conf, args); e == nil || e.Code != types.ErrTryAgainLater {
					t.Errorf("%s with a silent agent = %+v (%s), want code 11", cmd, e, out)
				}
			}
			if _, e := run(t, "DEL", conf, args); e != nil {
				t.Errorf("DEL with a silent agent = %+v, want success", e)
			}
		})
	}
}

// TestCheckBefore040: CHECK is not part of the 0.3.x specs; the plugin
// itself refuses it with "incompatible version" (not only skel's dispatch).
func TestCheckBefore040(t *testing.T) {
	for _, v := range []string{"0.3.0", "0.3.1"} {
		err := Check(&skel.CmdArgs{ContainerID: "c", Netns: "/nonexistent", IfName: "eth0",
			Args:      "K8S_POD_NAMESPACE=mesh;K8S_POD_NAME=p",
			StdinData: []byte(`{"cniVersion":"` + v + `","name":"n","type":"amesh-cni","prevResult":` + strings.Replace(prev031, "0.3.1", v, 1) + `}`)})
		var e *types.Error
		if !errors.As(err, &e) || e.Code != types.ErrIncompatibleCNIVersion {
			t.Errorf("CHECK %s = %v, want code %d", v, err, types.ErrIncompatibleCNIVersion)
		}
	}
}
