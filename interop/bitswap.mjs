// A Helia node (js-libp2p over TCP with Noise and Yamux, Bitswap as its only block broker)
// dials a p2pmr daemon and reads files p2pmr added, over Bitswap; each must be bit-exact.
//
//   node bitswap.mjs DAEMON_MULTIADDR FILE CID [FILE CID...]
import { setMaxListeners } from 'node:events'
import { readFile } from 'node:fs/promises'
import { bitswapNode } from './helia-env.mjs'
const { unixfs } = await import('@helia/unixfs')
const { multiaddr } = await import('@multiformats/multiaddr')
const { CID } = await import('multiformats/cid')

const [addr, ...pairs] = process.argv.slice(2)
const helia = await bitswapNode()
await helia.libp2p.dial(multiaddr(addr))
const results = []
for (let i = 0; i < pairs.length; i += 2) {
  const [file, cid] = [pairs[i], pairs[i + 1]]
  const started = Date.now()
  const want = await readFile(file)
  const got = Buffer.alloc(want.length)
  let at = 0
  const signal = AbortSignal.timeout(120_000)
  setMaxListeners(Infinity, signal) // one per block read; not a leak
  const timer = setTimeout(() => {}, 120_000) // keeps Node up while the read waits
  try {
    for await (const chunk of unixfs(helia).cat(CID.parse(cid), { signal })) {
      if (at + chunk.length > want.length) throw new Error('more bytes than the file has')
      got.set(chunk, at)
      at += chunk.length
    }
  } finally {
    clearTimeout(timer)
  }
  if (at !== want.length || !got.equals(want)) {
    throw new Error(`${cid}: read ${at} bytes, not the file's ${want.length} bytes`)
  }
  const ms = Date.now() - started
  results.push({ cid, bytes: at, ms, mib_per_s: +(at / 1048576 / (ms / 1000)).toFixed(1) })
}
console.log(JSON.stringify(results))
await helia.stop()
