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
