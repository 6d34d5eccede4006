package mesh

import (
	"bytes"
	"context"
	"fmt"
	"regexp"
	"strconv"
	"sync"
	"time"

	"github.com/amesh-dev/amesh/e2e/internal/kube"
	"github.com/amesh-dev/amesh/e2e/internal/wire"
)

// Capture is a tcpdump running on a node's network (a host-network tool
// pod), writing pcap that Stop decodes.
type Capture struct {
	c        *kube.Client
	ns, pod  string
	pid      int
	file     string
	mu       sync.Mutex
	out      bytes.Buffer
	errOut   *watchWriter
	done     chan error
	cancel   context.CancelFunc
	stopOnce sync.Once
	stopErr  error
	segments []wire.Segment
}

// CaptureNode creates (once per namespace and node) the host-network tool
// pod used for captures on node and waits until it runs.
func CaptureNode(ctx context.Context, c *kube.Client, ns, node string) (string, error) {
	name := "capture-" + node
	p, err := ToolPod(ns, name, node, true, false)
	if err != nil {
		return "", err
	}
	if err := c.Apply(ctx, p); err != nil {
		return "", err
	}
	if _, err := c.WaitPods(ctx, ns, "app="+name, 1, 2*time.Minute); err != nil {
		return "", err
	}
	return name, nil
}

var (
	pidRE       = regexp.MustCompile(`capture-pid (\d+)`)
	listeningRE = regexp.MustCompile(`listening on`)
	droppedRE   = regexp.MustCompile(`(\d+) packets dropped by kernel`)
)

// StartCapture starts tcpdump on every interface of the tool pod's node
// with a BPF filter, and returns once it listens. It stops by itself after
// max.
func StartCapture(ctx context.Context, c *kube.Client, ns, toolPod, filter string, max time.Duration) (*Capture, error) {
	cctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	cp := &Capture{c: c, ns: ns, pod: toolPod, errOut: newWatchWriter(), done: make(chan error, 1), cancel: cancel}
	// The shell reports its PID (exec keeps it for timeout, which passes
	// SIGINT on to tcpdump), so that Stop signals exactly this capture.
	// tcpdump writes to a file in the tool pod (streaming through exec
	// is too slow for bursts: the kernel would drop packets), read by Stop.
	cp.file = "/tmp/amesh-capture-" + strconv.FormatInt(time.Now().UnixNano(), 36) + ".pcap"
	script := fmt.Sprintf("echo capture-pid $$ >&2; exec timeout -s INT %d tcpdump -i any -y LINUX_SLL -B 32768 -nn -s 0 -w %s %s",
		int(max.Seconds()), cp.file, shellQuote(filter))
	go func() {
		cp.done <- c.ExecStream(cctx, ns, toolPod, "", []string{"sh", "-c", script}, lockedWriter{&cp.mu, &cp.out}, cp.errOut)
	}()
	select {
	case <-cp.errOut.ready:
	case err := <-cp.done:
		cancel()
		return nil, fmt.Errorf("tcpdump on %s/%s ended before listening: %v: %s", ns, toolPod, err, cp.errOut.String())
	case <-time.After(30 * time.Second):
		cancel()
		return nil, fmt.Errorf("tcpdump on %s/%s not listening after 30s: %s", ns, toolPod, cp.errOut.String())
	}
	m := pidRE.FindStringSubmatch(cp.errOut.String())
	if m == nil {
		cancel()
		return nil, fmt.Errorf("tcpdump on %s/%s: no pid in %q", ns, toolPod, cp.errOut.String())
	}
	cp.pid, _ = strconv.Atoi(m[1])
	return cp, nil
}

// Stop ends the capture and returns its TCP segments.
func (cp *Capture) Stop(ctx context.Context) ([]wire.Segment, error) {
	cp.stopOnce.Do(func() {
		defer cp.cancel()
		// libpcap hands packets over in blocks retired after at most 1s
		// (no immediate mode: one packet per block would overflow the ring
		// whenever tcpdump is scheduled late): wait for the last block.
		time.Sleep(1500 * time.Millisecond)
		if _, err := cp.c.Exec(ctx, cp.ns, cp.pod, "", []string{"kill", "-INT", strconv.Itoa(cp.pid)}, nil); err != nil {
			cp.stopErr = fmt.Errorf("stop tcpdump: %w", err)
			return
		}
		select {
		case <-cp.done:
		case <-time.After(15 * time.Second):
			cp.stopErr = fmt.Errorf("tcpdump on %s/%s did not stop", cp.ns, cp.pod)
			return
		}
		if m := droppedRE.FindStringSubmatch(cp.errOut.String()); m == nil || m[1] != "0" {
			cp.stopErr = fmt.Errorf("tcpdump lost packets (the capture would be incomplete): %s", cp.errOut.String())
			return
		}
		raw, err := cp.c.Exec(ctx, cp.ns, cp.pod, "", []string{"sh", "-c", "cat " + cp.file + " && rm -f " + cp.file}, nil)
		if err != nil {
			cp.stopErr = fmt.Errorf("read the capture: %w", err)
			return
		}
		cp.mu.Lock()
		defer cp.mu.Unlock()
		cp.out.Reset()
		cp.out.WriteString(raw)
		cp.segments, cp.stopErr = wire.Read(bytes.NewReader(cp.out.Bytes()))
	})
	return cp.segments, cp.stopErr
}

// Pcap is the raw capture (after Stop).
func (cp *Capture) Pcap() []byte {
	cp.mu.Lock()
	defer cp.mu.Unlock()
	return bytes.Clone(cp.out.Bytes())
}

// Stderr is what tcpdump said.
func (cp *Capture) Stderr() string { return cp.errOut.String() }

func shellQuote(s string) string {
	return "'" + string(bytes.ReplaceAll([]byte(s), []byte("'"), []byte(`'\''`))) + "'"
}

type lockedWriter struct {
	mu *sync.Mutex
	w  *bytes.Buffer
}

func (l lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}

// watchWriter keeps stderr and closes ready when tcpdump says it listens.
type watchWriter struct {
	mu    sync.Mutex
	buf   bytes.Buffer
	ready chan struct{}
	once  sync.Once
}

func newWatchWriter() *watchWriter { return &watchWriter{ready: make(chan struct{})} }

func (w *watchWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.buf.Write(p)
	if listeningRE.Match(w.buf.Bytes()) && pidRE.Match(w.buf.Bytes()) {
		w.once.Do(func() { close(w.ready) })
	}
	return len(p), nil
}

func (w *watchWriter) String() string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.buf.String()
}
