package mesh

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"sort"
	"strings"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/amesh-dev/amesh/e2e/internal/kube"
)

// Metrics are the Prometheus metric families one pod exports.
type Metrics map[string]*dto.MetricFamily

// ScrapeMetrics reads a pod's /metrics on port (PortMetrics for ztunnel
// and waypoints) through the apiserver's pod proxy.
func ScrapeMetrics(ctx context.Context, c *kube.Client, ns, pod string, port int) (Metrics, error) {
	b, err := c.ProxyGet(ctx, ns, pod, port, "/metrics")
	if err != nil {
		return nil, err
	}
	return ParseMetrics(b)
}

// ParseMetrics parses the Prometheus text format.
func ParseMetrics(b []byte) (Metrics, error) {
	p := expfmt.NewTextParser(model.UTF8Validation)
	mf, err := p.TextToMetricFamilies(bytes.NewReader(b))
	if err != nil {
		return nil, fmt.Errorf("parse metrics: %w", err)
	}
	return Metrics(mf), nil
}

// Sample is one series: its labels and value.
type Sample struct {
	Labels map[string]string
	Value  float64
}

// Series returns the series of a counter or gauge whose labels include
// every label in match.
func (m Metrics) Series(name string, match map[string]string) []Sample {
	mf := m[name]
	if mf == nil {
		return nil
	}
	var out []Sample
	for _, s := range mf.GetMetric() {
		ls := make(map[string]string, len(s.GetLabel()))
		for _, l := range s.GetLabel() {
			ls[l.GetName()] = l.GetValue()
		}
		ok := true
		for k, v := range match {
			if ls[k] != v {
				ok = false
				break
			}
		}
		if !ok {
			continue
		}
		var v float64
		switch {
		case s.Counter != nil:
			v = s.GetCounter().GetValue()
		case s.Gauge != nil:
			v = s.GetGauge().GetValue()
		case s.Untyped != nil:
			v = s.GetUntyped().GetValue()
		case s.Histogram != nil:
			v = float64(s.GetHistogram().GetSampleCount())
		}
		out = append(out, Sample{Labels: ls, Value: v})
	}
	return out
}

// Sum adds the values of the matching series.
func (m Metrics) Sum(name string, match map[string]string) float64 {
	var t float64
	for _, s := range m.Series(name, match) {
		t += s.Value
	}
	return t
}

// ScrapeAll scrapes every pod matching selector and returns the metrics
// per pod name.
func ScrapeAll(ctx context.Context, c *kube.Client, ns, selector string, port int) (map[string]Metrics, error) {
	pods, err := c.Pods(ctx, ns, selector)
	if err != nil {
		return nil, err
	}
	out := make(map[string]Metrics, len(pods))
	for _, p := range pods {
		if !kube.Ready(&p) {
			continue
		}
		m, err := ScrapeMetrics(ctx, c, ns, p.Name, port)
		if err != nil {
			return nil, err
		}
		out[p.Name] = m
	}
	return out, nil
}

// SumAll adds a metric over several pods.
func SumAll(ms map[string]Metrics, name string, match map[string]string) float64 {
	var t float64
	for _, m := range ms {
		t += m.Sum(name, match)
	}
	return t
}

// AccessLog is one ztunnel access-log record (logger "access").
type AccessLog struct {
	Time        time.Time
	Direction   string `json:"direction"`
	Listener    string `json:"listener"`
	SrcAddr     string `json:"src.addr"`
	DstAddr     string `json:"dst.addr"`
	Protocol    string `json:"protocol"`
	Flags       string `json:"flags"`
	SrcIdentity string `json:"src.identity"`
	DstIdentity string `json:"dst.identity"`
	SrcWorkload string `json:"src.workload"`
	DstWorkload string `json:"dst.workload"`
	DstService  string `json:"dst.service"`
	DstUpstream string `json:"dst.upstream"`
	Error       string `json:"error"`
	// Raw is the whole record.
	Raw map[string]any `json:"-"`
}

// ParseAccessLogs picks the access records out of a component's log
// stream (JSON lines; other lines are skipped).
func ParseAccessLogs(logs string) []AccessLog {
	var out []AccessLog
	sc := bufio.NewScanner(strings.NewReader(logs))
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Bytes()
		if !bytes.Contains(line, []byte(`"logger":"access`)) {
			continue
		}
		var raw map[string]any
		if json.Unmarshal(line, &raw) != nil {
			continue
		}
		var a AccessLog
		if json.Unmarshal(line, &a) != nil {
			continue
		}
		if ts, ok := raw["ts"].(float64); ok {
			a.Time = time.Unix(0, int64(ts*1e9))
		}
		a.Raw = raw
		out = append(out, a)
	}
	return out
}

// ZtunnelAccessLogs returns the access records of every ztunnel since the
// given time span.
func ZtunnelAccessLogs(ctx context.Context, c *kube.Client, since time.Duration) ([]AccessLog, error) {
	pods, err := c.Pods(ctx, SystemNamespace, "app=ztunnel")
	if err != nil {
		return nil, err
	}
	var out []AccessLog
	for _, p := range pods {
		logs, err := c.Logs(ctx, SystemNamespace, p.Name, "", since)
		if err != nil {
			return nil, err
		}
		out = append(out, ParseAccessLogs(logs)...)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Time.Before(out[j].Time) })
	return out, nil
}
