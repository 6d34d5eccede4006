package netns_test

import (
	"context"
	"net/netip"
	"testing"

	"github.com/amesh-dev/amesh/ztunnel/internal/netns"
	"github.com/amesh-dev/amesh/ztunnel/internal/testnet"
)

// BenchmarkDial measures a TCP connect to a listener on loopback inside a
// namespace: "current" dials in the caller's own namespace (the baseline:
// a listener there too), "namespace" through Namespace.Dial, which opens
// the socket on a thread that entered the namespace.
func BenchmarkDial(b *testing.B) {
	testnet.RequireRoot(b)
	ns := testnet.NewNS(b, "ztn-bd")
	h := ns.Open(b)
	ctx := context.Background()
	for _, tc := range []struct {
		name string
		in   *netns.Namespace
	}{{"current", nil}, {"namespace", h}} {
		b.Run(tc.name, func(b *testing.B) {
			ln, err := tc.in.Listen(ctx, "tcp", "127.0.0.1:0", netns.SockOpts{})
			if err != nil {
				b.Fatal(err)
			}
			defer ln.Close()
			go func() {
				for {
					c, err := ln.Accept()
					if err != nil {
						return
					}
					c.Close()
				}
			}()
			addr := ln.Addr().String()
			b.ResetTimer()
			for range b.N {
				c, err := tc.in.Dial(ctx, "tcp", addr, netip.Addr{}, netns.SockOpts{Mark: mark})
				if err != nil {
					b.Fatal(err)
				}
				c.Close()
			}
		})
	}
}

func BenchmarkDo(b *testing.B) {
	testnet.RequireRoot(b)
	ns := testnet.NewNS(b, "ztn-bd")
	h := ns.Open(b)
	for range b.N {
		_ = h.Do(func() error { return nil })
	}
}
