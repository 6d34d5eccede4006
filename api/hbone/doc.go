// Package hbone implements HBONE, the mesh's tunnel: HTTP/2 CONNECT over
// mutual TLS 1.3 between SPIFFE identities (package identity). A Client dials
// a target ip:port through an HBONE address as a source identity, expecting
// given server identities, over pooled HTTP/2 connections; a Server accepts
// CONNECT streams, lets a Handler decide (401/400/503 or 200) and hands the
// stream over as a net.Conn. Splice joins a stream with a TCP connection.
//
// # HTTP/2 implementation
//
// The HTTP/2 framing and HPACK come from golang.org/x/net/http2 (Framer,
// hpack); the stream multiplexer on top of them is this package's own. The
// net/http (and x/net/http2 Server/Transport, now deprecated in its favour)
// implementations cannot serve a tunnel: their server cannot half-close (a
// handler's END_STREAM is only sent when it returns, followed by a reset of
// the request side), their stream deadlines are terminal rather than
// net.Conn deadlines, and an idle CONNECT stream holds up to 512 KiB of
// request-body scratch buffer on the client. Here:
//
//   - every stream is a net.Conn: CloseWrite sends END_STREAM and reading
//     continues; Close sends END_STREAM (if not yet sent) and, if the peer
//     has not finished, RST_STREAM(NO_ERROR) after it; Reset sends
//     RST_STREAM(CONNECT_ERROR) (RFC 9113 §8.5); deadlines behave as on a
//     TCP socket (extendable, os.ErrDeadlineExceeded).
//   - memory: received data sits in 16 KiB chunks taken from a pool and
//     returned as soon as they are read; writes are copied straight from
//     the caller's buffer into the connection's single write batch; so an
//     idle stream holds no data buffer at all. WriteTo/ReadFrom (used by
//     Splice) move data without an intermediate buffer and, for a TCP
//     source, wait for readability before taking a buffer from the pool.
//   - tuning: stream window 4 MiB, connection window 16 MiB, 16 KiB frames,
//     PING after 10 s without a frame and close after 20 s without its ACK.
//     Large DATA frames end on 16 KiB TLS record boundaries (crypto/tls
//     writes each record with its own syscall), and Splice reads four such
//     frames' worth from a TCP socket at once.
//   - one reader and one writer goroutine per connection; the reader never
//     blocks on the socket's write side (control frames are queued), so a
//     peer that stops reading cannot deadlock the connection.
//   - few goroutine handoffs (latency and CPU): a Write on an idle
//     connection frames and writes its data from the caller's goroutine
//     instead of waking the writer goroutine and waiting for it (not for a
//     stream with a write deadline: a socket write cannot be interrupted);
//     the writer takes over when other streams queue data, so streams are
//     still served in turn. The reader writes DATA straight into the TCP
//     socket of a WriteTo (Splice) that waits with nothing buffered, with
//     a non-blocking write; what the socket does not take is buffered for
//     WriteTo. A request/response through a spliced tunnel thus wakes no
//     goroutine beyond the ones the sockets wake.
//
// Deviations from the API sketch: Dial returns net.Conn whose concrete type
// is *Stream (CloseWrite, Reset, Peer); ServerConfig and ClientConfig have
// extra tuning fields with defaults.
package hbone
