package capture

import (
	"bytes"
	"errors"
	"fmt"
	"net/netip"
	"slices"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"
)

// Names of the sets and chains inside TableName.
const (
	setProbeSrc4  = "probe_src4"
	setProbeSrc6  = "probe_src6"
	setProbePorts = "probe_ports"
	setOpen4      = "open4"    // IPv4 connections open before the first Install
	setOpen6      = "open6"    // IPv6 connections open before the first Install
	chainInbound  = "inbound"  // nat prerouting
	chainOutbound = "outbound" // nat output
	chainReply    = "reply"    // route output
)

// TCP header flags (byte 13 of the header).
const (
	tcpSYN = 0x02
	tcpACK = 0x10
)

// ruleset is the desired content of TableName for one Config.
type ruleset struct {
	table  *nftables.Table
	sets   []setSpec
	chains []chainSpec
}

type setSpec struct {
	set   *nftables.Set
	elems []nftables.SetElement
	// dynamic sets (the open connections) are not derived from a Config:
	// Check verifies that they exist, not what they hold.
	dynamic bool
}

// openFlows are the keys of the open4 and open6 sets: one per TCP
// connection of the pod that was open before its first Install, as
// "pod address . pod port . peer address . peer port" (each field
// padded to 4 bytes, as nftables lays out concatenations).
type openFlows struct {
	v4, v6 []nftables.SetElement
}

var (
	open4Type = nftables.MustConcatSetType(nftables.TypeIPAddr, nftables.TypeInetService, nftables.TypeIPAddr, nftables.TypeInetService)
	open6Type = nftables.MustConcatSetType(nftables.TypeIP6Addr, nftables.TypeInetService, nftables.TypeIP6Addr, nftables.TypeInetService)
)

// flowKey is the open-set key of a connection between the pod's local
// address and port and a peer's.
func flowKey(local netip.AddrPort, peer netip.AddrPort) []byte {
	port := func(p uint16) []byte { return []byte{byte(p >> 8), byte(p), 0, 0} }
	return slices.Concat(local.Addr().AsSlice(), port(local.Port()), peer.Addr().AsSlice(), port(peer.Port()))
}

type chainSpec struct {
	chain *nftables.Chain
	rules [][]expr.Any
}

func table() *nftables.Table {
	return &nftables.Table{Name: TableName, Family: nftables.TableFamilyINet}
}

// ifname is an interface name as nftables compares it (NUL padded).
func ifname(n string) []byte {
	b := make([]byte, unix.IFNAMSIZ)
	copy(b, n)
	return b
}

// build returns the ruleset for cfg. The draining form (Drain) captures
// no new connection: an opening SYN returns before the redirects.
func build(cfg Config, open openFlows, draining bool) *ruleset {
	t := table()
	v4, v6, ports := cfg.normalized()

	// Set IDs are chosen here: google/nftables would otherwise allocate
	// them from a package-level counter shared by all connections.
	src4 := &nftables.Set{Table: t, ID: 1, Name: setProbeSrc4, KeyType: nftables.TypeIPAddr}
	src6 := &nftables.Set{Table: t, ID: 2, Name: setProbeSrc6, KeyType: nftables.TypeIP6Addr}
	pset := &nftables.Set{Table: t, ID: 3, Name: setProbePorts, KeyType: nftables.TypeInetService}
	open4 := &nftables.Set{Table: t, ID: 4, Name: setOpen4, KeyType: open4Type, Concatenation: true}
	open6 := &nftables.Set{Table: t, ID: 5, Name: setOpen6, KeyType: open6Type, Concatenation: true}
	var e4, e6, ep []nftables.SetElement
	for _, a := range v4 {
		e4 = append(e4, nftables.SetElement{Key: a.AsSlice()})
	}
	for _, a := range v6 {
		e6 = append(e6, nftables.SetElement{Key: a.AsSlice()})
	}
	for _, p := range ports {
		ep = append(ep, nftables.SetElement{Key: binaryutil.BigEndian.PutUint16(p)})
	}

	accept := nftables.ChainPolicyAccept
	inbound := &nftables.Chain{Name: chainInbound, Table: t, Type: nftables.ChainTypeNAT,
		Hooknum: nftables.ChainHookPrerouting, Priority: nftables.ChainPriorityNATDest, Policy: &accept}
	outbound := &nftables.Chain{Name: chainOutbound, Table: t, Type: nftables.ChainTypeNAT,
		Hooknum: nftables.ChainHookOutput, Priority: nftables.ChainPriorityNATDest, Policy: &accept}
	reply := &nftables.Chain{Name: chainReply, Table: t, Type: nftables.ChainTypeRoute,
		Hooknum: nftables.ChainHookOutput, Priority: nftables.ChainPriorityMangle, Policy: &accept}

	ret := &expr.Verdict{Kind: expr.VerdictReturn}
	tcp := []expr.Any{
		&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{unix.IPPROTO_TCP}},
	}
	dport := func(port uint16) []expr.Any {
		return []expr.Any{
			&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 2, Len: 2},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binaryutil.BigEndian.PutUint16(port)},
		}
	}
	probe := func(nfproto byte, offset, length uint32, src *nftables.Set) []expr.Any {
		r := []expr.Any{
			&expr.Meta{Key: expr.MetaKeyNFPROTO, Register: 1},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{nfproto}},
		}
		r = append(r, tcp...)
		return append(r,
			&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: offset, Len: length},
			&expr.Lookup{SourceRegister: 1, SetName: src.Name, SetID: src.ID},
			&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 2, Len: 2},
			&expr.Lookup{SourceRegister: 1, SetName: pset.Name, SetID: pset.ID},
			ret,
		)
	}
	// A connection the pod had open before its first Install keeps its
	// path: conntrack starts in the pod's netns with this table, so the
	// next packet of such a connection is NEW to it and would otherwise
	// be redirected, mid-stream, to a ztunnel port that resets it. Its
	// first packet (never an opening SYN) matches the open set and gets
	// no translation; conntrack keeps it that way until it closes.
	// Every other TCP packet that starts a conntrack entry is redirected,
	// mid-stream ones included: a captured connection whose entry was
	// lost (expired while half-closed, say) is reset by ztunnel's port
	// rather than sent on, in plaintext, to its original destination.
	notOpening := []expr.Any{
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 13, Len: 1},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 1, Mask: []byte{tcpSYN | tcpACK}, Xor: []byte{0}},
		&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: []byte{tcpSYN}},
	}
	// openConn matches a packet of an open connection. inbound packets come
	// from the peer (pod = destination), outbound ones from the pod.
	openConn := func(nfproto byte, inbound bool, set *nftables.Set) []expr.Any {
		saddr, daddr, alen := uint32(12), uint32(16), uint32(4) // IPv4 header
		if nfproto == unix.NFPROTO_IPV6 {
			saddr, daddr, alen = 8, 24, 16
		}
		local, peer, lport, pport := saddr, daddr, uint32(0), uint32(2)
		if inbound {
			local, peer, lport, pport = daddr, saddr, 2, 0
		}
		// Concatenated fields go to consecutive 32-bit registers
		// (NFT_REG32_00 + i), named as the kernel reports them: one that
		// starts a 16-byte register is NFT_REG_1 + i/4.
		i := uint32(0)
		load := func(base expr.PayloadBase, off, n uint32) *expr.Payload {
			r := unix.NFT_REG32_00 + i
			if i%4 == 0 {
				r = unix.NFT_REG_1 + i/4
			}
			i += (n + 3) / 4
			return &expr.Payload{DestRegister: r, Base: base, Offset: off, Len: n}
		}
		r := []expr.Any{
			&expr.Meta{Key: expr.MetaKeyNFPROTO, Register: 1},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{nfproto}},
		}
		r = slices.Concat(r, tcp, notOpening)
		return append(r,
			load(expr.PayloadBaseNetworkHeader, local, alen),
			load(expr.PayloadBaseTransportHeader, lport, 2),
			load(expr.PayloadBaseNetworkHeader, peer, alen),
			load(expr.PayloadBaseTransportHeader, pport, 2),
			&expr.Lookup{SourceRegister: 1, SetName: set.Name, SetID: set.ID},
			ret,
		)
	}
	opening := []expr.Any{
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 13, Len: 1},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 1, Mask: []byte{tcpSYN | tcpACK}, Xor: []byte{0}},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{tcpSYN}},
	}
	redirect := func(port uint16) []expr.Any {
		return append(slices.Clone(tcp),
			&expr.Immediate{Register: 1, Data: binaryutil.BigEndian.PutUint16(port)},
			// As the kernel stores it: max = min, NF_NAT_RANGE_PROTO_SPECIFIED.
			&expr.Redir{RegisterProtoMin: 1, RegisterProtoMax: 1, Flags: unix.NF_NAT_RANGE_PROTO_SPECIFIED},
		)
	}
	mark := func(key expr.MetaKey, v uint32) []expr.Any {
		return []expr.Any{
			&expr.Meta{Key: key, Register: 1},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binaryutil.NativeEndian.PutUint32(v)},
		}
	}
	ctMark := func(v uint32) []expr.Any {
		return []expr.Any{
			&expr.Ct{Key: expr.CtKeyMARK, Register: 1},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binaryutil.NativeEndian.PutUint32(v)},
		}
	}
	cat := func(parts ...[]expr.Any) []expr.Any { return slices.Concat(parts...) }
	lo := func(key expr.MetaKey) []expr.Any {
		return []expr.Any{
			&expr.Meta{Key: key, Register: 1},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: ifname("lo")},
			ret,
		}
	}

	rs := &ruleset{
		table: t,
		sets: []setSpec{{set: src4, elems: e4}, {set: src6, elems: e6}, {set: pset, elems: ep},
			{set: open4, elems: open.v4, dynamic: true}, {set: open6, elems: open.v6, dynamic: true}},
		chains: []chainSpec{
			{inbound, [][]expr.Any{
				// iifname "lo" return
				lo(expr.MetaKeyIIFNAME),
				// meta l4proto tcp tcp dport 15008 return
				cat(tcp, dport(InboundHBONEPort), []expr.Any{ret}),
				// ip saddr @probe_src4 tcp dport @probe_ports return
				probe(unix.NFPROTO_IPV4, 12, 4, src4),
				// ip6 saddr @probe_src6 tcp dport @probe_ports return
				probe(unix.NFPROTO_IPV6, 8, 16, src6),
				// meta nfproto ipv4 meta l4proto tcp tcp flags & (syn | ack) != syn
				//   ip daddr . tcp dport . ip saddr . tcp sport @open4 return
				openConn(unix.NFPROTO_IPV4, true, open4),
				// (the same for ip6 and @open6)
				openConn(unix.NFPROTO_IPV6, true, open6),
				// meta l4proto tcp redirect to :15006
				redirect(InboundPlaintextPort),
			}},
			{outbound, [][]expr.Any{
				// oifname "lo" return
				lo(expr.MetaKeyOIFNAME),
				// meta mark 0x539 return
				cat(mark(expr.MetaKeyMARK, Mark), []expr.Any{ret}),
				// meta nfproto ipv4 meta l4proto tcp tcp flags & (syn | ack) != syn
				//   ip saddr . tcp sport . ip daddr . tcp dport @open4 return
				openConn(unix.NFPROTO_IPV4, false, open4),
				// (the same for ip6 and @open6)
				openConn(unix.NFPROTO_IPV6, false, open6),
				// meta l4proto tcp redirect to :15001
				redirect(OutboundPort),
			}},
			{reply, [][]expr.Any{
				// meta mark 0x539 ct mark set 0x111 return
				cat(mark(expr.MetaKeyMARK, Mark), []expr.Any{
					&expr.Immediate{Register: 1, Data: binaryutil.NativeEndian.PutUint32(ReplyMark)},
					&expr.Ct{Key: expr.CtKeyMARK, Register: 1, SourceRegister: true},
					ret,
				}),
				// ct mark 0x111 meta mark set 0x111
				cat(ctMark(ReplyMark), []expr.Any{
					&expr.Immediate{Register: 1, Data: binaryutil.NativeEndian.PutUint32(ReplyMark)},
					&expr.Meta{Key: expr.MetaKeyMARK, Register: 1, SourceRegister: true},
				}),
			}},
		},
	}
	if draining {
		// meta l4proto tcp tcp flags & (syn | ack) == syn return, just
		// before each chain's redirect
		for k := range rs.chains[:2] { // inbound, outbound
			last := len(rs.chains[k].rules) - 1
			rs.chains[k].rules = slices.Insert(rs.chains[k].rules, last, cat(tcp, opening, []expr.Any{ret}))
		}
	}
	return rs
}

func newConn() (*nftables.Conn, error) {
	c, err := nftables.New()
	if err != nil {
		return nil, fmt.Errorf("netlink: %w", err)
	}
	return c, nil
}

// maxElemsPerMessage bounds the set elements sent in one netlink message.
const maxElemsPerMessage = 256

// installTable replaces TableName with the ruleset for cfg in one
// transaction: add (no-op if present), delete, then create everything.
// Either the whole batch applies or none of it. The open-connection sets
// are filled from the pod's sockets when the table is new, and carried
// over from the installed table otherwise: connections opened (and
// captured) since the first Install must never count as open before it.
func installTable(cfg Config) error {
	c, err := newConn()
	if err != nil {
		return err
	}
	open, installed, err := installedOpenFlows(c)
	if err != nil {
		return err
	}
	if !installed {
		if open, err = openConnections(); err != nil {
			return err
		}
	}
	return apply(c, build(cfg, open, false))
}

// apply replaces TableName with rs in one transaction.
func apply(c *nftables.Conn, rs *ruleset) error {
	c.AddTable(rs.table)
	c.DelTable(rs.table)
	c.AddTable(rs.table)
	for _, s := range rs.sets {
		first := s.elems[:min(len(s.elems), maxElemsPerMessage)]
		if err := c.AddSet(s.set, first); err != nil {
			return fmt.Errorf("set %s: %w", s.set.Name, err)
		}
		for rest := s.elems[len(first):]; len(rest) > 0; {
			n := min(len(rest), maxElemsPerMessage)
			if err := c.SetAddElements(s.set, rest[:n]); err != nil {
				return fmt.Errorf("set %s: %w", s.set.Name, err)
			}
			rest = rest[n:]
		}
	}
	for _, ch := range rs.chains {
		c.AddChain(ch.chain)
		for _, r := range ch.rules {
			c.AddRule(&nftables.Rule{Table: rs.table, Chain: ch.chain, Exprs: r})
		}
	}
	if err := c.Flush(); err != nil {
		return err
	}
	return nil
}

// installedOpenFlows reads the open-connection sets of the installed
// table; installed is false when there is no table. A table of an earlier
// version without the sets exempted nothing: its sets are empty.
func installedOpenFlows(c *nftables.Conn) (open openFlows, installed bool, err error) {
	if _, err := c.ListTableOfFamily(TableName, nftables.TableFamilyINet); err != nil {
		if errors.Is(err, unix.ENOENT) {
			return openFlows{}, false, nil
		}
		return openFlows{}, false, fmt.Errorf("list table: %w", err)
	}
	sets, err := c.GetSets(table())
	if err != nil {
		return openFlows{}, true, fmt.Errorf("list sets: %w", err)
	}
	for _, s := range sets {
		var dst *[]nftables.SetElement
		switch s.Name {
		case setOpen4:
			dst = &open.v4
		case setOpen6:
			dst = &open.v6
		default:
			continue
		}
		elems, err := c.GetSetElements(s)
		if err != nil {
			return openFlows{}, true, fmt.Errorf("list set %s: %w", s.Name, err)
		}
		for _, e := range elems {
			*dst = append(*dst, nftables.SetElement{Key: e.Key})
		}
	}
	return open, true, nil
}

// drainTable replaces an installed TableName with its draining form,
// keeping its open-connection sets; installed is false (and nothing is
// done) when there is no table.
func drainTable() (installed bool, err error) {
	c, err := newConn()
	if err != nil {
		return false, err
	}
	open, installed, err := installedOpenFlows(c)
	if err != nil || !installed {
		return false, err
	}
	return true, apply(c, build(Config{}, open, true))
}

func removeTable() error {
	c, err := newConn()
	if err != nil {
		return err
	}
	t := table()
	c.AddTable(t)
	c.DelTable(t)
	return c.Flush()
}

// checkTable compares the installed TableName with rs (built with no
// open connections: the open sets are only checked for presence).
func checkTable(rs *ruleset) error {
	c, err := newConn()
	if err != nil {
		return err
	}
	if _, err := c.ListTableOfFamily(TableName, nftables.TableFamilyINet); err != nil {
		if errors.Is(err, unix.ENOENT) {
			return fmt.Errorf("%w: table inet %s absent", ErrNotInstalled, TableName)
		}
		return fmt.Errorf("capture: list table: %w", err)
	}
	chains, err := c.ListChainsOfTableFamily(nftables.TableFamilyINet)
	if err != nil {
		return fmt.Errorf("capture: list chains: %w", err)
	}
	n := 0
	for _, ch := range chains {
		if ch.Table.Name == TableName {
			n++
		}
	}
	if n != len(rs.chains) {
		return fmt.Errorf("%w: %d chains, want %d", ErrMismatch, n, len(rs.chains))
	}
	for _, want := range rs.chains {
		i := slices.IndexFunc(chains, func(ch *nftables.Chain) bool {
			return ch.Table.Name == TableName && ch.Name == want.chain.Name
		})
		if i < 0 {
			return fmt.Errorf("%w: chain %s absent", ErrMismatch, want.chain.Name)
		}
		got := chains[i]
		if got.Type != want.chain.Type || !eqPtr(got.Hooknum, want.chain.Hooknum) ||
			!eqPtr(got.Priority, want.chain.Priority) || !eqPtr(got.Policy, want.chain.Policy) {
			return fmt.Errorf("%w: chain %s has type %s hook %v priority %v", ErrMismatch,
				got.Name, got.Type, deref(got.Hooknum), deref(got.Priority))
		}
		rules, err := c.GetRules(rs.table, want.chain)
		if err != nil {
			return fmt.Errorf("capture: list rules of %s: %w", want.chain.Name, err)
		}
		if len(rules) != len(want.rules) {
			return fmt.Errorf("%w: chain %s has %d rules, want %d", ErrMismatch, want.chain.Name, len(rules), len(want.rules))
		}
		for j, r := range rules {
			if !sameExprs(r.Exprs, want.rules[j]) {
				return fmt.Errorf("%w: chain %s rule %d differs", ErrMismatch, want.chain.Name, j)
			}
		}
	}
	sets, err := c.GetSets(rs.table)
	if err != nil {
		return fmt.Errorf("capture: list sets: %w", err)
	}
	if len(sets) != len(rs.sets) {
		return fmt.Errorf("%w: %d sets, want %d", ErrMismatch, len(sets), len(rs.sets))
	}
	for _, want := range rs.sets {
		i := slices.IndexFunc(sets, func(s *nftables.Set) bool { return s.Name == want.set.Name })
		if i < 0 {
			return fmt.Errorf("%w: set %s absent", ErrMismatch, want.set.Name)
		}
		if want.dynamic {
			if got := sets[i].KeyType.Bytes; got != want.set.KeyType.Bytes {
				return fmt.Errorf("%w: set %s has %d-byte keys, want %d", ErrMismatch, want.set.Name, got, want.set.KeyType.Bytes)
			}
			continue
		}
		elems, err := c.GetSetElements(sets[i])
		if err != nil {
			return fmt.Errorf("capture: list set %s: %w", want.set.Name, err)
		}
		if !sameElems(elems, want.elems) {
			return fmt.Errorf("%w: set %s has %s, want %s", ErrMismatch, want.set.Name,
				showElems(elems), showElems(want.elems))
		}
	}
	return nil
}

func eqPtr[T comparable](a, b *T) bool {
	if a == nil || b == nil {
		return a == b
	}
	return *a == *b
}

func deref[T any](p *T) any {
	if p == nil {
		return nil
	}
	return *p
}

// sameExprs compares a rule read back from the kernel with the expected
// one by their netlink encoding, which is what the kernel executes.
func sameExprs(got, want []expr.Any) bool {
	if len(got) != len(want) {
		return false
	}
	for i := range got {
		// Lookups read back carry the set name but not the batch-local ID.
		if g, ok := got[i].(*expr.Lookup); ok {
			w, ok := want[i].(*expr.Lookup)
			if !ok || g.SetName != w.SetName || g.SourceRegister != w.SourceRegister || g.Invert != w.Invert {
				return false
			}
			continue
		}
		// google/nftables does not decode NFTA_CT_SREG: a "ct ... set"
		// reads back as a load with no register. Compare what it keeps.
		if w, ok := want[i].(*expr.Ct); ok && w.SourceRegister {
			g, ok := got[i].(*expr.Ct)
			if !ok || g.Key != w.Key || g.Direction != w.Direction || g.Register != 0 {
				return false
			}
			continue
		}
		gb, err1 := expr.Marshal(byte(nftables.TableFamilyINet), got[i])
		wb, err2 := expr.Marshal(byte(nftables.TableFamilyINet), want[i])
		if err1 != nil || err2 != nil || !bytes.Equal(gb, wb) {
			return false
		}
	}
	return true
}

func sameElems(got, want []nftables.SetElement) bool {
	key := func(e nftables.SetElement) string { return string(e.Key) }
	g := make([]string, 0, len(got))
	for _, e := range got {
		g = append(g, key(e))
	}
	w := make([]string, 0, len(want))
	for _, e := range want {
		w = append(w, key(e))
	}
	slices.Sort(g)
	slices.Sort(w)
	return slices.Equal(g, w)
}

func showElems(es []nftables.SetElement) string {
	var b []string
	for _, e := range es {
		switch len(e.Key) {
		case 2:
			b = append(b, fmt.Sprint(binaryutil.BigEndian.Uint16(e.Key)))
		default:
			if a, ok := netip.AddrFromSlice(e.Key); ok {
				b = append(b, a.String())
			} else {
				b = append(b, fmt.Sprintf("%x", e.Key))
			}
		}
	}
	return fmt.Sprint(b)
}
