// What the Helia scripts share: Node 22's Promise.withResolvers, which Helia's stack expects,
// installed on import (so before the scripts load Helia with dynamic imports), and a router
// that finds nothing (Helia waits on every router; with no answering one it never settles).
Promise.withResolvers ??= function () {
  let resolve, reject
  const promise = new this((res, rej) => { resolve = res; reject = rej })
  return { promise, resolve, reject }
}

export const nowhere = {
  name: 'nowhere',
  async provide () {},
  async cancelReprovide () {},
  async * findProviders () {},
  async put () {},
  async get () { throw new Error('not found') },
  async findPeer () { throw new Error('not found') },
  async * getClosestPeers () {},
}

// A started Helia node for the Bitswap checks: js-libp2p over TCP with Noise and Yamux,
// Bitswap its only block broker, loopback only (no bootstrap, DHT or mDNS; the gater lets it
// dial 127.0.0.1). `listen`: the addresses it listens on (none for a node that only dials).
export async function bitswapNode (listen = []) {
  const { createHeliaLight } = await import('helia')
  const { withLibp2pLight } = await import('@helia/libp2p')
  const { withBitswap } = await import('@helia/bitswap')
  const { tcp } = await import('@libp2p/tcp')
  const { noise } = await import('@libp2p/noise')
  const { yamux } = await import('@libp2p/yamux')
  const { identify } = await import('@libp2p/identify')
  let helia = createHeliaLight({ routers: [nowhere] })
  helia = withLibp2pLight(helia, {
    addresses: { listen },
    transports: [tcp()],
    connectionEncrypters: [noise()],
    streamMuxers: [yamux()],
    services: { identify: identify() },
    connectionGater: { denyDialMultiaddr: () => false },
  })
  helia = withBitswap(helia)
  await helia.start()
  return helia
}
