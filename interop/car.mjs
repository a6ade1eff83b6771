// CAR interop with @ipld/car, an independent implementation (the one js-ipfs and Helia use).
//
//   node car.mjs check FILE.car   reads FILE.car block by block, checks every block's sha2-256
//                                 against its CID, prints {"version","roots","blocks","bytes"}
//   node car.mjs write OUT.car FILE
//                                 writes FILE's 256 KiB pieces as raw blocks, each a root, into
//                                 a CARv1; prints the roots, one per line
import { CarBlockIterator, CarWriter } from '@ipld/car'
import { CID } from 'multiformats/cid'
import { sha256 } from 'multiformats/hashes/sha2'
import * as raw from 'multiformats/codecs/raw'
import { createReadStream, createWriteStream } from 'node:fs'
import { readFile } from 'node:fs/promises'
import { pipeline } from 'node:stream/promises'
import { Readable } from 'node:stream'

const [mode, ...args] = process.argv.slice(2)

async function check (file) {
  const blocks = await CarBlockIterator.fromIterable(createReadStream(file))
  const roots = (await blocks.getRoots()).map(String)
  let count = 0
  let bytes = 0
  for await (const { cid, bytes: data } of blocks) {
    if (cid.multihash.code !== sha256.code) throw new Error(`${cid}: not sha2-256`)
    const digest = await sha256.digest(data)
    if (!equal(digest.bytes, cid.multihash.bytes)) throw new Error(`${cid}: bytes do not match`)
    count++
    bytes += data.length
  }
  console.log(JSON.stringify({ version: blocks.version, roots, blocks: count, bytes }))
}

async function write (out, file) {
  const content = await readFile(file)
  const blocks = []
  for (let at = 0; at === 0 || at < content.length; at += 262144) {
    const bytes = content.subarray(at, at + 262144)
    blocks.push({ cid: CID.create(1, raw.code, await sha256.digest(bytes)), bytes })
  }
  const { writer, out: car } = await CarWriter.create(blocks.map(b => b.cid))
  const written = pipeline(Readable.from(car), createWriteStream(out))
  for (const b of blocks) await writer.put(b)
  await writer.close()
  await written
  for (const b of blocks) console.log(String(b.cid))
}

function equal (a, b) {
  return a.length === b.length && a.every((x, i) => x === b[i])
}

if (mode === 'check' && args.length === 1) await check(args[0])
else if (mode === 'write' && args.length === 2) await write(args[0], args[1])
else {
  console.error('usage: node car.mjs check FILE.car | node car.mjs write OUT.car FILE')
  process.exit(2)
}
