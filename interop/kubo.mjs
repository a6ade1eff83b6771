// The npm package kubo-rpc-client against a p2pmr daemon's HTTP API, as a kubo user would use it:
// add a file, cat it back bit-exact, pin it, read and stat a block, export the DAG as a CAR,
// import a CAR, list peers, read the node's id.
//
//   node kubo.mjs http://127.0.0.1:5001 FILE CID   (CID: what `p2pmr add -n FILE` prints)
import { create } from 'kubo-rpc-client'
import { readFile } from 'node:fs/promises'

const [url, file, expected] = process.argv.slice(2)
const client = create({ url })
const content = await readFile(file)
const check = (ok, what) => { if (!ok) throw new Error(`kubo-rpc-client: ${what}`) }

const id = await client.id()
check(String(id.id).startsWith('12D3Koo'), `id: ${id.id}`)

const added = await client.add(content, { cidVersion: 1, rawLeaves: true })
const cid = added.cid
check(String(cid) === expected, `add gave ${cid}, p2pmr add -n ${expected}`)
const chunks = []
for await (const chunk of client.cat(cid)) chunks.push(chunk)
check(Buffer.compare(Buffer.concat(chunks), content) === 0, 'cat is not bit-exact')

const pinned = await client.pin.add(cid)
check(String(pinned) === String(cid), `pin/add answered ${pinned}`)

const block = await client.block.get(cid)
const stat = await client.block.stat(cid)
check(stat.size === block.length, `block/stat size ${stat.size} against ${block.length}`)

const car = []
for await (const chunk of client.dag.export(cid)) car.push(chunk)
const carBytes = Buffer.concat(car)
let imported = []
for await (const r of client.dag.import([carBytes])) imported.push(String(r.root.cid))
check(imported.length === 1 && imported[0] === String(cid), `dag/import roots ${imported}`)

const peers = await client.swarm.peers()
check(peers.length >= 1, `swarm/peers: ${peers.length}`)

console.log(JSON.stringify({ cid: String(cid), bytes: content.length, carBytes: carBytes.length, peers: peers.length }))
