// Chunk boundaries of boxo's buzhash chunker (kubo's `--chunker=buzhash`) for inputs the Rust
// test rebuilds byte for byte: buzhash.go is boxo's chunker/buzhash.go (commit 8df89a78,
// v0.42.0) with only its package line changed. Writes buzhash.tsv: name, size, the chunk
// lengths.
//
//	go run . > ../buzhash.tsv
package main

import (
	"bytes"
	"fmt"
	"io"
	"strings"
)

// A xorshift64* generator, the same in the Rust test.
type rng struct{ s uint64 }

func (r *rng) next() uint64 {
	r.s ^= r.s >> 12
	r.s ^= r.s << 25
	r.s ^= r.s >> 27
	return r.s * 0x2545F4914F6CDD1D
}

func random(seed uint64, n int) []byte {
	r := rng{seed}
	out := make([]byte, n)
	for i := range out {
		out[i] = byte(r.next() >> 56)
	}
	return out
}

// Words drawn from a short list, spaces and newlines between them.
func text(seed uint64, n int) []byte {
	words := strings.Fields("the of and a to in is was that for on with as by at from his her it " +
		"history river mountain quietly remember language between afternoon")
	r := rng{seed}
	var b bytes.Buffer
	for b.Len() < n {
		v := r.next()
		b.WriteString(words[v%uint64(len(words))])
		if v>>60 == 0 {
			b.WriteByte('\n')
		} else {
			b.WriteByte(' ')
		}
	}
	return b.Bytes()[:n]
}

func main() {
	const kib, mib = 1 << 10, 1 << 20
	zeroRun := random(9, 3*mib)
	for i := mib; i < 2*mib+12345; i++ {
		zeroRun[i] = 0
	}
	inputs := []struct {
		name string
		data []byte
	}{
		{"empty", nil},
		{"one", []byte{42}},
		{"small", random(1, 1000)},
		{"min-1", random(2, 128*kib-1)},
		{"min", random(3, 128*kib)},
		{"min+1", random(4, 128*kib+1)},
		{"max", random(5, 512*kib)},
		{"max+1", random(6, 512*kib+1)},
		{"random-5MiB", random(7, 5*mib)},
		{"random-3MiB+777", random(8, 3*mib+777)},
		{"zeros-2MiB", make([]byte, 2*mib)},
		{"zero-run", zeroRun},
		{"text-4MiB", text(10, 4*mib)},
	}
	for _, in := range inputs {
		c := NewBuzhash(bytes.NewReader(in.data))
		var lens []string
		for {
			chunk, err := c.NextBytes()
			if err == io.EOF {
				break
			}
			if err != nil {
				panic(err)
			}
			lens = append(lens, fmt.Sprint(len(chunk)))
		}
		fmt.Printf("%s\t%d\t%s\n", in.name, len(in.data), strings.Join(lens, ","))
	}
}
