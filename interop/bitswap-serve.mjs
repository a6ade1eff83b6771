// A Helia node (js-libp2p over TCP with Noise and Yamux, Bitswap as its only block broker)
// that adds files with kubo's settings (256 KiB chunks, raw leaves, CIDv1, balanced DAG of
// 174 links per node: the CIDs `p2pmr add -n` prints) and serves them over Bitswap to whoever
// dials it, until its standard input closes.
//
//   node bitswap-serve.mjs FILE [FILE...]
// prints one JSON line: {"addr": "/ip4/127.0.0.1/tcp/P/p2p/ID", "cids": [...], "add_ms": N}
import { createReadStream } from 'node:fs'
import { bitswapNode } from './helia-env.mjs'
const { unixfs } = await import('@helia/unixfs')
const { fixedSize } = await import('ipfs-unixfs-importer/chunker')
const { balanced } = await import('ipfs-unixfs-importer/layout')

const files = process.argv.slice(2)
const helia = await bitswapNode(['/ip4/127.0.0.1/tcp/0'])

const kubo = {
  cidVersion: 1,
  rawLeaves: true,
  chunker: fixedSize({ chunkSize: 262144 }),
  layout: balanced({ maxChildrenPerNode: 174 }),
  reduceSingleLeafToSelf: true,
}
const started = Date.now()
const cids = []
for (const file of files) {
  const cid = await unixfs(helia).addByteStream(createReadStream(file), kubo)
  cids.push(cid.toString())
}
const addr = helia.libp2p.getMultiaddrs().find(a => a.toString().includes('/tcp/'))
console.log(JSON.stringify({ addr: addr.toString(), cids, add_ms: Date.now() - started }))

// Serve until told to stop (stdin closes when the test is done with this node).
process.stdin.resume()
await new Promise(resolve => process.stdin.on('end', resolve))
await helia.stop()
