module buzhashvectors

go 1.19

require github.com/libp2p/go-buffer-pool v0.0.0

replace github.com/libp2p/go-buffer-pool => ./pool
