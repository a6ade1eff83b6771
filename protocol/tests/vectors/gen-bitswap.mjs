// Generates protocol/tests/vectors/bitswap.tsv: Bitswap 1.2.0 messages encoded by
// @helia/bitswap (its protons codec of boxo's message.proto), each with the values the Rust
// decoder must find in it, and the same message framed as on the wire (an unsigned varint
// length, then the message).
//
// Not run by CI; run by hand when vectors are added, with interop's packages installed and
// resolved from there (the codec is not among the package's exports, so it is imported by path):
//   cd interop && npm ci && node --input-type=module < ../protocol/tests/vectors/gen-bitswap.mjs > ../protocol/tests/vectors/bitswap.tsv
import { BitswapMessage, WantType, BlockPresenceType } from './node_modules/@helia/bitswap/dist/src/pb/message.js'
import { CID } from 'multiformats/cid'
import * as raw from 'multiformats/codecs/raw'
import { sha256 } from 'multiformats/hashes/sha2'
import * as varint from 'uint8-varint'

const hex = (b) => Buffer.from(b).toString('hex')
const rawCid = async (text) => CID.createV1(raw.code, await sha256.digest(new TextEncoder().encode(text)))
const prefix = (cid) => Uint8Array.from([...varint.encode(cid.version), ...varint.encode(cid.code), ...varint.encode(cid.multihash.code), ...varint.encode(cid.multihash.size)])
const v0 = CID.parse('QmdfTbBqBPQ7VNxZEYEj14VmRuZBkqFbiwReogJgS1zR1n')
const hello = await rawCid('hello')
const world = await rawCid('world')

const vectors = [
  ['empty', {}, 'no wantlist, no blocks, no presences'],
  ['wants', {
    wantlist: {
      full: true,
      entries: [
        { cid: hello.bytes, priority: 1, wantType: WantType.WantHave, sendDontHave: true },
        { cid: world.bytes, priority: 2147483647, wantType: WantType.WantBlock, sendDontHave: false },
        { cid: v0.bytes, priority: -5 }
      ]
    }
  }, `full; want-have ${hello} 1 dont-have; want-block ${world} 2147483647; want-block ${v0} -5`],
  ['cancel', {
    wantlist: { entries: [{ cid: hello.bytes, priority: 0, cancel: true }] }
  }, `not full; cancel ${hello}`],
  ['blocks', {
    blocks: [
      { prefix: prefix(hello), data: new TextEncoder().encode('hello') },
      { prefix: prefix(v0), data: new Uint8Array([0x0a, 0x02, 0x08, 0x01]) }
    ]
  }, `block ${hello}; block with a CIDv0 prefix`],
  ['presences', {
    blockPresences: [
      { cid: hello.bytes, type: BlockPresenceType.HaveBlock },
      { cid: world.bytes, type: BlockPresenceType.DoNotHaveBlock }
    ],
    pendingBytes: 262144
  }, `have ${hello}; dont-have ${world}; pending 262144`]
]
console.log('# name\tmessage hex\tframed hex\twhat it holds')
for (const [name, msg, what] of vectors) {
  const bytes = BitswapMessage.encode(msg)
  const framed = Uint8Array.from([...varint.encode(bytes.length), ...bytes])
  console.log(`${name}\t${hex(bytes)}\t${hex(framed)}\t${what}`)
}
