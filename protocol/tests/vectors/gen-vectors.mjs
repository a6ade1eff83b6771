// Generates protocol/tests/vectors/unixfs.tsv with an independent UnixFS implementation
// (ipfs-unixfs-importer, the JS importer that is interop-tested against kubo), configured as
// `ipfs add --cid-version=1`: raw leaves, CIDv1, sha2-256, fixed-size chunks, balanced layout.
//
// Not run by CI (it needs npm packages); run by hand when vectors are added:
//   cd protocol/tests/vectors && npm install ipfs-unixfs-importer blockstore-core && node gen-vectors.mjs > unixfs.tsv
// The byte content of every vector is a pure function of (pattern, size), mirrored in the Rust test.
import { importer } from 'ipfs-unixfs-importer'
import { fixedSize } from 'ipfs-unixfs-importer/chunker'
import { balanced } from 'ipfs-unixfs-importer/layout'

// A blockstore that keeps nothing: we only want CIDs, and the largest vector is 7.4 GiB.
const blackhole = { put: async (cid) => cid, get: async () => { throw new Error('unused') }, has: async () => false }

// pattern "zero": all zero bytes. pattern "mix": b[i] = (7*i + floor(i/2048) + 13*floor(i/262144)) mod 256,
// so neighbouring chunks differ and any mistake in link order changes the root.
function* content (pattern, size) {
  const step = 1 << 20
  const zeros = new Uint8Array(step)
  for (let off = 0; off < size; off += step) {
    const n = Math.min(step, size - off)
    if (pattern === 'zero') { yield zeros.subarray(0, n); continue }
    const buf = new Uint8Array(n)
    for (let j = 0; j < n; j++) {
      const i = off + j
      buf[j] = (7 * i + Math.floor(i / 2048) + 13 * Math.floor(i / 262144)) & 255
    }
    yield buf
  }
}

const C = 262144
const cases = [
  // [pattern, size, chunk, maxLinks]
  ['mix', 0, C, 174], ['mix', 1, C, 174], ['mix', C - 1, C, 174], ['mix', C, C, 174], ['mix', C + 1, C, 174],
  ['mix', 2 * C, C, 174], ['mix', 10 * C + 12345, C, 174],
  ['mix', 174 * C, C, 174], ['mix', 174 * C + 1, C, 174], ['mix', 175 * C, C, 174], ['mix', 348 * C + 7, C, 174],
  // small chunks reach two and three levels cheaply
  ['mix', 174 * 174 * 64, 64, 174], ['mix', 174 * 174 * 64 + 1, 64, 174], ['mix', 174 * 174 * 64 + 175 * 64, 64, 174],
  ['mix', 1000, 10, 3], ['mix', 27 * 10, 10, 3], ['mix', 27 * 10 + 1, 10, 3], ['mix', 82 * 10, 10, 3],
  // the real thing: more than 174x174 chunks of 256 KiB (7.4 GiB of zeros)
  ['zero', 174 * 174 * C + 1, C, 174],
]
console.log('# pattern\tsize\tchunk\tmax_links\tcid')
for (const [pattern, size, chunk, maxLinks] of cases) {
  let root
  for await (const entry of importer([{ content: content(pattern, size) }], blackhole, {
    cidVersion: 1, rawLeaves: true, reduceSingleLeafToSelf: true,
    chunker: fixedSize({ chunkSize: chunk }), layout: balanced({ maxChildrenPerNode: maxLinks }),
  })) root = entry.cid
  console.log(`${pattern}\t${size}\t${chunk}\t${maxLinks}\t${root.toString()}`)
}
