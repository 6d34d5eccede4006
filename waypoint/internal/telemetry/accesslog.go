package telemetry

import (
	"io"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

// AccessLogBuffer and AccessLogFlush bound how much and how long access-log
// entries wait before they are written (as Envoy's file access log, which
// flushes every second): one write per request would cost a system call
// per request.
const (
	AccessLogBuffer = 64 << 10
	AccessLogFlush  = time.Second
)

// NewAccessLog returns the access-log stream writing JSON entries to w,
// buffered; stop flushes what is buffered and ends the flushing goroutine
// (call it once no more requests are logged).
func NewAccessLog(w io.Writer) (log *zap.Logger, stop func() error) {
	ws := &zapcore.BufferedWriteSyncer{WS: zapcore.AddSync(w), Size: AccessLogBuffer, FlushInterval: AccessLogFlush}
	core := zapcore.NewCore(zapcore.NewJSONEncoder(zap.NewProductionEncoderConfig()), ws, zap.InfoLevel)
	return zap.New(core).Named("access"), ws.Stop
}
