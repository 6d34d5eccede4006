// Package wire reads packet captures (pcap, as `tcpdump -w -` writes them)
// and answers what the end-to-end suite asks of the bytes on the wire:
// which TCP connections there were, what each side sent once the stream is
// reassembled, and whether that stream is nothing but TLS records.
package wire

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"sort"

	"github.com/google/gopacket"
	"github.com/google/gopacket/layers"
	"github.com/google/gopacket/pcapgo"
)

// Segment is one captured TCP segment.
type Segment struct {
	Src, Dst netip.AddrPort
	Seq      uint32
	SYN, ACK bool
	FIN, RST bool
	Payload  []byte
}

// Read decodes every TCP segment of a pcap stream (Ethernet, Linux cooked
// v1 or raw IP link types; IPv4 and IPv6). A capture cut short by the end
// of tcpdump is fine: the segments read so far are returned.
func Read(r io.Reader) ([]Segment, error) {
	pr, err := pcapgo.NewReader(r)
	if err != nil {
		return nil, fmt.Errorf("pcap: %w", err)
	}
	var out []Segment
	for {
		data, _, err := pr.ReadPacketData()
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			return out, nil
		}
		if err != nil {
			return out, fmt.Errorf("pcap: %w", err)
		}
		pkt := gopacket.NewPacket(data, pr.LinkType(), gopacket.DecodeOptions{Lazy: true, NoCopy: true})
		var src, dst netip.Addr
		switch ip := pkt.NetworkLayer().(type) {
		case *layers.IPv4:
			src, _ = netip.AddrFromSlice(ip.SrcIP.To4())
			dst, _ = netip.AddrFromSlice(ip.DstIP.To4())
		case *layers.IPv6:
			src, _ = netip.AddrFromSlice(ip.SrcIP)
			dst, _ = netip.AddrFromSlice(ip.DstIP)
		default:
			continue
		}
		tcp, ok := pkt.TransportLayer().(*layers.TCP)
		if !ok {
			continue
		}
		out = append(out, Segment{
			Src: netip.AddrPortFrom(src, uint16(tcp.SrcPort)),
			Dst: netip.AddrPortFrom(dst, uint16(tcp.DstPort)),
			Seq: tcp.Seq, SYN: tcp.SYN, ACK: tcp.ACK, FIN: tcp.FIN, RST: tcp.RST,
			Payload: bytes.Clone(tcp.Payload),
		})
	}
}

// Conn is one TCP connection seen in a capture, its two byte streams
// reassembled (duplicates, as seen on several interfaces, counted once).
type Conn struct {
	// Client sent the first SYN (or, without one, the first segment).
	Client, Server netip.AddrPort
	// Up is what the client sent, Down what the server sent.
	Up, Down []byte
	// Gaps is set when a stream has holes (bytes not captured).
	Gaps bool
	// Segments counts the distinct segments.
	Segments int
	// Handshake is set when the capture saw the connection's SYN.
	Handshake bool
}

type connKey struct{ a, b netip.AddrPort }

func keyOf(s Segment) connKey {
	if s.Src.Compare(s.Dst) < 0 {
		return connKey{s.Src, s.Dst}
	}
	return connKey{s.Dst, s.Src}
}

// Conns groups segments into connections in order of first appearance.
func Conns(segs []Segment) []*Conn {
	type half struct {
		isn   uint32
		known bool
		parts map[uint32][]byte
	}
	type state struct {
		c       *Conn
		up, dwn half
		seen    map[string]bool
	}
	byKey := map[connKey]*state{}
	var order []*state
	for _, s := range segs {
		k := keyOf(s)
		st := byKey[k]
		if st == nil {
			// The client sent the SYN; without one (the capture began
			// mid-connection) it is the side with the higher port.
			c := &Conn{Client: s.Src, Server: s.Dst}
			if (s.SYN && s.ACK) || (!s.SYN && s.Src.Port() < s.Dst.Port()) {
				c.Client, c.Server = s.Dst, s.Src
			}
			st = &state{c: c, seen: map[string]bool{}}
			st.up.parts, st.dwn.parts = map[uint32][]byte{}, map[uint32][]byte{}
			byKey[k] = st
			order = append(order, st)
		}
		id := fmt.Sprintf("%s>%s/%d/%d/%t%t%t", s.Src, s.Dst, s.Seq, len(s.Payload), s.SYN, s.FIN, s.RST)
		if st.seen[id] {
			continue
		}
		st.seen[id] = true
		st.c.Segments++
		h := &st.up
		if s.Src != st.c.Client {
			h = &st.dwn
		}
		if s.SYN {
			h.isn, h.known = s.Seq+1, true
			st.c.Handshake = true
		}
		if len(s.Payload) > 0 {
			if old, ok := h.parts[s.Seq]; !ok || len(old) < len(s.Payload) {
				h.parts[s.Seq] = s.Payload
			}
		}
	}
	out := make([]*Conn, 0, len(order))
	for _, st := range order {
		var gap1, gap2 bool
		st.c.Up, gap1 = assemble(st.up.parts, st.up.isn, st.up.known)
		st.c.Down, gap2 = assemble(st.dwn.parts, st.dwn.isn, st.dwn.known)
		st.c.Gaps = gap1 || gap2
		out = append(out, st.c)
	}
	return out
}

// assemble orders the parts by sequence number (relative to isn when the
// SYN was seen, else to the lowest) and joins them, trimming overlaps.
func assemble(parts map[uint32][]byte, isn uint32, known bool) ([]byte, bool) {
	if len(parts) == 0 {
		return nil, false
	}
	seqs := make([]uint32, 0, len(parts))
	for s := range parts {
		seqs = append(seqs, s)
	}
	base := isn
	if !known {
		// Without the SYN, start from the segment after which the others
		// follow within 1 GiB (sequence numbers wrap).
		base = seqs[0]
		for _, s := range seqs {
			if base-s < 1<<30 {
				base = s
			}
		}
	}
	sort.Slice(seqs, func(i, j int) bool { return seqs[i]-base < seqs[j]-base })
	var out []byte
	next := uint32(0)
	gaps := false
	for _, s := range seqs {
		off := s - base
		p := parts[s]
		switch {
		case off > next:
			gaps = true
			out = append(out, p...)
			next = off + uint32(len(p))
		case off+uint32(len(p)) > next:
			out = append(out, p[next-off:]...)
			next = off + uint32(len(p))
		}
	}
	return out, gaps
}

// TLS record content types (RFC 8446 §5.1).
const (
	recChangeCipherSpec = 20
	recAlert            = 21
	recHandshake        = 22
	recApplicationData  = 23
	maxRecord           = 1<<14 + 2048
)

// TLSRecords walks a byte stream captured from its first byte as a
// sequence of TLS records and returns how many complete records it holds.
// It fails at the first byte that cannot start a record; a record cut off
// at the end of the stream is not an error (the capture ended). The first
// record must be a handshake.
func TLSRecords(stream []byte) (int, error) { return tlsRecords(stream, true) }

// TLSRecordsMidstream is TLSRecords for a stream whose beginning was not
// captured (the connection predates the capture): it looks for the first
// offset, within one maximal record, from which the rest of the stream
// is an unbroken chain of records, and counts them from there.
func TLSRecordsMidstream(stream []byte) (int, error) {
	var first error
	for off := 0; off < len(stream) && off <= maxRecord+5; off++ {
		n, err := tlsRecords(stream[off:], false)
		if err == nil && n > 0 {
			return n, nil
		}
		if first == nil {
			first = err
		}
	}
	if len(stream) == 0 {
		return 0, nil
	}
	return 0, fmt.Errorf("no offset from which the stream is a chain of TLS records (at 0: %v)", first)
}

// TLSConn checks a Conn's stream as TLSRecords does, or as
// TLSRecordsMidstream when the capture missed the connection's start.
func TLSConn(c *Conn, stream []byte) (int, error) {
	if c.Handshake {
		return TLSRecords(stream)
	}
	return TLSRecordsMidstream(stream)
}

func tlsRecords(stream []byte, fromStart bool) (int, error) {
	n := 0
	for off := 0; off < len(stream); {
		if len(stream)-off < 5 {
			return n, nil
		}
		typ, major := stream[off], stream[off+1]
		length := int(stream[off+3])<<8 | int(stream[off+4])
		if typ < recChangeCipherSpec || typ > recApplicationData || major != 3 || stream[off+2] > 4 || length == 0 || length > maxRecord {
			return n, fmt.Errorf("offset %d: % x… is not a TLS record header", off, stream[off:min(off+8, len(stream))])
		}
		if fromStart && n == 0 && typ != recHandshake {
			return n, fmt.Errorf("stream starts with TLS record type %d, want a handshake", typ)
		}
		if off+5+length > len(stream) {
			return n, nil // cut off by the end of the capture
		}
		n++
		off += 5 + length
	}
	return n, nil
}
