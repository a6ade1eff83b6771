// @helia/verified-fetch with a p2pmr daemon's gateway as its only source: a file p2pmr added
// must come back bit-exact, every block checked against its CID; an unknown CID must fail.
//
//   node verified-fetch.mjs http://127.0.0.1:5001 FILE CID
import { readFile } from 'node:fs/promises'
import { nowhere } from './helia-env.mjs'
const { createHeliaLight } = await import('helia')
const { trustlessGatewayBlockBroker } = await import('@helia/trustless-gateway-client')
const { fallbackRouter } = await import('@helia/fallback-router')
const { createVerifiedFetchWithHelia } = await import('@helia/verified-fetch')

const [url, file, cid] = process.argv.slice(2)
const helia = createHeliaLight({
  blockBrokers: [trustlessGatewayBlockBroker({ allowInsecure: true, allowLocal: true })],
  routers: [fallbackRouter({ gateways: [url], shuffle: false }), nowhere],
})
await helia.start()
const fetch = await createVerifiedFetchWithHelia(helia)
// AbortSignal.timeout's timer does not keep Node running, so a fetch waiting on nothing else
// would end the process instead of timing out.
const timers = []
const deadline = (ms) => {
  const c = new AbortController()
  timers.push(setTimeout(() => c.abort(new Error(`timed out after ${ms} ms`)), ms))
  return c.signal
}
const check = (ok, what) => { if (!ok) throw new Error(`verified-fetch: ${what}`) }
try {
  const want = await readFile(file)
  const started = Date.now()
  const r = await fetch(`ipfs://${cid}`, { signal: deadline(60_000) })
  check(r.status === 200, `status ${r.status} for ${cid}`)
  const got = Buffer.from(await r.arrayBuffer())
  check(Buffer.compare(got, want) === 0, `${got.length} bytes that differ from the ${want.length} added`)
  const ms = Date.now() - started
  const unknown = 'bafkreigh2akiscaildcqabsyg3dfr6chu3fgpregiymsck7e7aqa4s52zy'
  let refused = false
  try {
    const r2 = await fetch(`ipfs://${unknown}`, { signal: deadline(3_000) })
    refused = r2.status >= 400
  } catch { refused = true }
  check(refused, `the unknown ${unknown} was answered`)
  console.log(JSON.stringify({ cid, bytes: got.length, ms, unknown: 'refused' }))
} finally {
  timers.forEach(clearTimeout)
  await fetch.stop?.()
  await helia.stop()
}
