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

func build(cfg Config) *ruleset {
	t := table()
	v4, v6, ports := cfg.normalized()

	// Set IDs are chosen here: google/nftables would otherwise allocate
	// them from a package-level counter shared by all connections.
	src4 := &nftables.Set{Table: t, ID: 1, Name: setProbeSrc4, KeyType: nftables.TypeIPAddr}
	src6 := &nftables.Set{Table: t, ID: 2, Name: setProbeSrc6, KeyType: nftables.TypeIP6Addr}
	pset := &nftables.Set{Table: t, ID: 3, Name: setProbePorts, KeyType: nftables.TypeInetService}
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
	// Only a connection's opening packet is redirected: a SYN without
	// ACK. Conntrack starts in the pod's netns with this table, so the
	// next packet of a connection opened before (by the pod or toward
	// it) is seen as NEW too and would otherwise be sent, mid-stream, to
	// a ztunnel port that resets it. The nat chains see only the first
	// packet of each conntrack entry; a non-SYN first packet gets no
	// translation and the flow keeps its path until it closes.
	syn := []expr.Any{
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 13, Len: 1},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 1, Mask: []byte{tcpSYN | tcpACK}, Xor: []byte{0}},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{tcpSYN}},
	}
	redirect := func(port uint16) []expr.Any {
		return slices.Concat(tcp, syn, []expr.Any{
			&expr.Immediate{Register: 1, Data: binaryutil.BigEndian.PutUint16(port)},
			// As the kernel stores it: max = min, NF_NAT_RANGE_PROTO_SPECIFIED.
			&expr.Redir{RegisterProtoMin: 1, RegisterProtoMax: 1, Flags: unix.NF_NAT_RANGE_PROTO_SPECIFIED},
		})
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

	return &ruleset{
		table: t,
		sets:  []setSpec{{src4, e4}, {src6, e6}, {pset, ep}},
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
				// meta l4proto tcp tcp flags & (syn | ack) == syn redirect to :15006
				redirect(InboundPlaintextPort),
			}},
			{outbound, [][]expr.Any{
				// oifname "lo" return
				lo(expr.MetaKeyOIFNAME),
				// meta mark 0x539 return
				cat(mark(expr.MetaKeyMARK, Mark), []expr.Any{ret}),
				// meta l4proto tcp tcp flags & (syn | ack) == syn redirect to :15001
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
}

func newConn() (*nftables.Conn, error) {
	c, err := nftables.New()
	if err != nil {
		return nil, fmt.Errorf("netlink: %w", err)
	}
	return c, nil
}

// installTable replaces TableName with the ruleset for cfg in one
// transaction: add (no-op if present), delete, then create everything.
// Either the whole batch applies or none of it.
func installTable(cfg Config) error {
	rs := build(cfg)
	c, err := newConn()
	if err != nil {
		return err
	}
	c.AddTable(rs.table)
	c.DelTable(rs.table)
	c.AddTable(rs.table)
	for _, s := range rs.sets {
		if err := c.AddSet(s.set, s.elems); err != nil {
			return fmt.Errorf("set %s: %w", s.set.Name, err)
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

func checkTable(cfg Config) error {
	c, err := newConn()
	if err != nil {
		return err
	}
	rs := build(cfg)
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
