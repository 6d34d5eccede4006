package hbone

import (
	"bytes"
	"testing"
)

// TestRecvBuf queues frames of every size, reads them back in pieces of
// every size (and by pop, as WriteTo does), and checks the bytes come out
// in order and what the queue holds while they wait: a short message waits
// in a small chunk, data that piles up in full-size ones.
func TestRecvBuf(t *testing.T) {
	for _, tc := range []struct {
		name   string
		frames []int // sizes of the frames queued before reading
		read   int   // read size; 0: pop whole chunks
		held   int   // bytes of chunks held once every frame is queued
	}{
		{"one short message", []int{100}, 7, smallChunkSize},
		{"a message that fills a small chunk", []int{smallChunkSize}, 1000, smallChunkSize},
		{"a message just over a small chunk", []int{smallChunkSize + 1}, 1000, chunkSize},
		{"short messages piling up", []int{100, 100, 3000, 50}, 64, smallChunkSize + chunkSize},
		{"a full frame", []int{maxFrame}, 4096, chunkSize},
		{"a short message then full frames", []int{10, maxFrame, maxFrame}, 5000, smallChunkSize + 2*chunkSize},
		{"full frames popped", []int{maxFrame, maxFrame, 1}, 0, 3 * chunkSize},
		{"short messages popped", []int{1, 2, 3}, 0, smallChunkSize},
		{"empty", nil, 10, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var b recvBuf
			var want []byte
			for i, n := range tc.frames {
				p := bytes.Repeat([]byte{byte('a' + i)}, n)
				p[0] = byte(i) // frame boundaries show in the output
				want = append(want, p...)
				b.write(p)
			}
			if b.n != len(want) {
				t.Fatalf("n = %d, want %d", b.n, len(want))
			}
			held := 0
			for _, c := range b.chunks {
				held += len(*c)
			}
			if held != tc.held {
				t.Errorf("holds %d bytes of chunks for %v, want %d", held, tc.frames, tc.held)
			}
			var got []byte
			for b.n > 0 {
				if tc.read == 0 {
					c, data := b.pop()
					got = append(got, data...)
					putChunk(c)
					continue
				}
				p := make([]byte, tc.read)
				n := b.read(p)
				if n == 0 {
					t.Fatal("read nothing with data queued")
				}
				got = append(got, p[:n]...)
			}
			if !bytes.Equal(got, want) {
				t.Errorf("read %d bytes that differ from the %d queued", len(got), len(want))
			}
			if len(b.chunks) != 0 {
				t.Errorf("%d chunks held after everything was read", len(b.chunks))
			}
			// Reused after draining, and reset releases what it holds.
			b.write([]byte("again"))
			b.reset()
			if b.n != 0 || len(b.chunks) != 0 {
				t.Errorf("after reset: n = %d, %d chunks", b.n, len(b.chunks))
			}
		})
	}
}
