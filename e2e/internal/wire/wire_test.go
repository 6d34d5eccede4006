package wire

import (
	"bytes"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/google/gopacket"
	"github.com/google/gopacket/layers"
	"github.com/google/gopacket/pcapgo"
)

func record(typ byte, n int) []byte {
	return append([]byte{typ, 3, 3, byte(n >> 8), byte(n)}, bytes.Repeat([]byte{0xab}, n)...)
}

func cat(parts ...[]byte) []byte { return bytes.Join(parts, nil) }

func TestTLSRecords(t *testing.T) {
	hs, data := record(22, 300), record(23, 1000)
	tests := []struct {
		name    string
		in      []byte
		want    int
		wantErr string
	}{
		{"empty", nil, 0, ""},
		{"handshake then data", cat(hs, record(20, 1), data, data), 4, ""},
		{"cut at the end", cat(hs, data[:200]), 1, ""},
		{"plaintext HTTP", []byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n"), 0, "not a TLS record header"},
		{"plaintext after TLS", cat(hs, []byte("HTTP/1.1 200 OK\r\n\r\n")), 1, "offset 305"},
		{"starts with data", cat(data, hs), 0, "want a handshake"},
		{"bad version", cat(hs, []byte{23, 2, 0, 0, 5, 1, 2, 3, 4, 5}), 1, "not a TLS record header"},
		{"oversized", cat(hs, []byte{23, 3, 3, 0xff, 0xff}), 1, "not a TLS record header"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			n, err := TLSRecords(tc.in)
			if n != tc.want || (err == nil) != (tc.wantErr == "") || (err != nil && !strings.Contains(err.Error(), tc.wantErr)) {
				t.Errorf("TLSRecords = %d, %v; want %d, error containing %q", n, err, tc.want, tc.wantErr)
			}
		})
	}
}

func TestTLSRecordsMidstream(t *testing.T) {
	data := record(23, 1000)
	stream := cat(data, data, data)
	// A capture that begins inside a record resynchronises.
	if n, err := TLSRecordsMidstream(stream[123:]); err != nil || n != 2 {
		t.Errorf("mid-record start: %d, %v; want 2 records", n, err)
	}
	if n, err := TLSRecordsMidstream(stream); err != nil || n != 3 {
		t.Errorf("aligned start: %d, %v; want 3", n, err)
	}
	// Plaintext never passes, wherever it starts.
	plain := []byte(strings.Repeat("GET /echo?amesh-marker HTTP/1.1\r\nHost: server:9080\r\n\r\n", 50))
	if n, err := TLSRecordsMidstream(plain); err == nil {
		t.Errorf("plaintext accepted as %d records", n)
	}
	// TLS followed by plaintext fails too.
	if _, err := TLSRecordsMidstream(cat(stream[10:], plain)); err == nil {
		t.Error("TLS then plaintext accepted")
	}
}

// seg builds a segment a → b.
func seg(a, b string, seq uint32, syn, ack bool, payload string) Segment {
	return Segment{Src: netip.MustParseAddrPort(a), Dst: netip.MustParseAddrPort(b), Seq: seq, SYN: syn, ACK: ack, Payload: []byte(payload)}
}

func TestConns(t *testing.T) {
	const c, s = "10.0.1.5:40000", "10.0.2.7:15008"
	segs := []Segment{
		seg(c, s, 999, true, false, ""),
		seg(s, c, 4999, true, true, ""),
		seg(c, s, 1000, false, true, "hello "),
		seg(c, s, 1000, false, true, "hello "), // the same on another interface
		seg(c, s, 1012, false, true, "there"),  // out of order
		seg(c, s, 1006, false, true, "world "),
		seg(c, s, 1003, false, true, "lo wor"), // overlapping retransmission
		seg(s, c, 5000, false, true, "ok"),
		seg("10.0.1.5:40001", "10.0.2.7:9080", 7, false, true, "GET"), // another connection, no SYN
	}
	conns := Conns(segs)
	if len(conns) != 2 {
		t.Fatalf("%d connections, want 2", len(conns))
	}
	a := conns[0]
	if a.Client.String() != c || a.Server.String() != s || !a.Handshake || a.Gaps {
		t.Errorf("first connection %s → %s handshake %t gaps %t", a.Client, a.Server, a.Handshake, a.Gaps)
	}
	if string(a.Up) != "hello world there" || string(a.Down) != "ok" {
		t.Errorf("streams %q / %q", a.Up, a.Down)
	}
	if a.Segments != 7 {
		t.Errorf("%d distinct segments, want 7", a.Segments)
	}
	b := conns[1]
	if b.Server.Port() != 9080 || b.Handshake || string(b.Up) != "GET" {
		t.Errorf("second connection %s → %s handshake %t up %q", b.Client, b.Server, b.Handshake, b.Up)
	}
	// A hole is reported.
	gap := Conns([]Segment{seg(c, s, 999, true, false, ""), seg(c, s, 1000, false, true, "ab"), seg(c, s, 1010, false, true, "cd")})
	if !gap[0].Gaps {
		t.Error("missing bytes not reported as a gap")
	}
}

// writePcap writes IPv4/TCP packets in a Linux cooked (v1) capture, as
// `tcpdump -i any -y LINUX_SLL -w` does.
func writePcap(t testing.TB, segs []Segment) []byte {
	t.Helper()
	var buf bytes.Buffer
	w := pcapgo.NewWriter(&buf)
	if err := w.WriteFileHeader(65536, layers.LinkTypeLinuxSLL); err != nil {
		t.Fatal(err)
	}
	for _, s := range segs {
		// Linux cooked v1 header: packet type, ARPHRD_ETHER, address
		// length, address (8 bytes, padded), protocol (IPv4).
		sll := []byte{0, 0, 0, 1, 0, 6, 1, 2, 3, 4, 5, 6, 0, 0, 0x08, 0x00}
		ip := &layers.IPv4{Version: 4, TTL: 64, Protocol: layers.IPProtocolTCP,
			SrcIP: s.Src.Addr().AsSlice(), DstIP: s.Dst.Addr().AsSlice()}
		tcp := &layers.TCP{SrcPort: layers.TCPPort(s.Src.Port()), DstPort: layers.TCPPort(s.Dst.Port()),
			Seq: s.Seq, SYN: s.SYN, ACK: s.ACK, Window: 1000}
		if err := tcp.SetNetworkLayerForChecksum(ip); err != nil {
			t.Fatal(err)
		}
		sb := gopacket.NewSerializeBuffer()
		if err := gopacket.SerializeLayers(sb, gopacket.SerializeOptions{FixLengths: true, ComputeChecksums: true},
			ip, tcp, gopacket.Payload(s.Payload)); err != nil {
			t.Fatal(err)
		}
		b := append(sll, sb.Bytes()...)
		ci := gopacket.CaptureInfo{Timestamp: time.Unix(1, 0), CaptureLength: len(b), Length: len(b)}
		if err := w.WritePacket(ci, b); err != nil {
			t.Fatal(err)
		}
	}
	return buf.Bytes()
}

func TestRead(t *testing.T) {
	in := []Segment{
		seg("10.0.1.5:40000", "10.0.2.7:15008", 1, true, false, ""),
		seg("10.0.2.7:15008", "10.0.1.5:40000", 9, true, true, ""),
		seg("10.0.1.5:40000", "10.0.2.7:15008", 2, false, true, string(record(22, 20))),
	}
	raw := writePcap(t, in)
	got, err := Read(bytes.NewReader(raw))
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != len(in) {
		t.Fatalf("%d segments, want %d", len(got), len(in))
	}
	for i := range in {
		g, w := got[i], in[i]
		if g.Src != w.Src || g.Dst != w.Dst || g.Seq != w.Seq || g.SYN != w.SYN || g.ACK != w.ACK || !bytes.Equal(g.Payload, w.Payload) {
			t.Errorf("segment %d = %+v, want %+v", i, g, w)
		}
	}
	// A capture cut in the middle of a packet keeps what came before.
	got, err = Read(bytes.NewReader(raw[:len(raw)-10]))
	if err != nil || len(got) != 2 {
		t.Errorf("truncated capture: %d segments, %v; want 2, nil", len(got), err)
	}
	if _, err := Read(strings.NewReader("not a pcap file at all")); err == nil {
		t.Error("garbage accepted as pcap")
	}
}

func FuzzTLSRecords(f *testing.F) {
	f.Add(cat(record(22, 10), record(23, 40)))
	f.Add([]byte("GET / HTTP/1.1\r\n\r\n"))
	f.Fuzz(func(t *testing.T, b []byte) {
		n, err := TLSRecords(b)
		if n < 0 {
			t.Fatalf("TLSRecords(%x) = %d", b, n)
		}
		// A chain from the first byte is a chain mid-stream too.
		if err == nil && n > 0 {
			if m, err := TLSRecordsMidstream(b); err != nil || m != n {
				t.Fatalf("TLSRecords(%x) = %d records, TLSRecordsMidstream = %d, %v", b, n, m, err)
			}
		}
	})
}

func FuzzRead(f *testing.F) {
	f.Add(writePcap(f, []Segment{seg("10.0.1.5:1", "10.0.2.7:2", 1, true, false, "x")}))
	f.Fuzz(func(t *testing.T, b []byte) {
		segs, _ := Read(bytes.NewReader(b))
		Conns(segs) // must not panic
	})
}
