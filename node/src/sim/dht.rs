//! Kademlia over virtual peers: each peer's routing table is a libp2p-kad `Behaviour` (the
//! daemons' own k-buckets and their answer to a closest-peers request), and lookups follow
//! libp2p-kad's closest-peers iterator one round trip at a time.

use libp2p::kad::{self, store::MemoryStore, KBucketDistance, KBucketKey};
use libp2p::swarm::NetworkBehaviour;
use libp2p::{Multiaddr, PeerId};
use std::collections::BTreeMap;
use std::task::Context;

/// Kademlia's `k`: the peers one bucket holds and one answer names (libp2p-kad's `K_VALUE`).
const K: usize = 20;
/// Requests a lookup keeps in flight while it still makes progress (libp2p-kad's default).
const ALPHA: usize = 3;

/// Every virtual peer's routing table.
pub(super) struct Dht {
    tables: Vec<kad::Behaviour<MemoryStore>>,
    keys: Vec<KBucketKey<PeerId>>,
    index: std::collections::HashMap<PeerId, usize>,
}

/// What one lookup found and what it cost.
pub(super) struct Lookup {
    /// The closest peers that answered, closest first.
    pub closest: Vec<usize>,
    /// Round trips one after another: the lookup's latency in units of one request's.
    pub hops: u32,
    /// Requests sent.
    pub messages: u32,
}

/// Where a lookup stands, as libp2p-kad's closest-peers iterator keeps it.
#[derive(Clone, Copy, PartialEq)]
enum Asked {
    No,
    Answered,
}

impl Dht {
    /// Routing tables for `peers` as a settled network has them: each bucket holds up to `k`
    /// of the peers in its range, met in an order drawn from `draw`. A table learns peers
    /// from its own lookups and from those that ask it; once the network has settled, a
    /// bucket is full wherever its range holds `k` peers, and which ones it keeps depends on
    /// who came first.
    pub(super) fn settled(peers: &[PeerId], mut draw: impl FnMut() -> u64) -> Self {
        let keys: Vec<KBucketKey<PeerId>> = peers.iter().map(|p| KBucketKey::from(*p)).collect();
        let n = peers.len();
        let order: Vec<usize> = {
            let mut order: Vec<usize> = (0..n).collect();
            for i in (1..n).rev() {
                order.swap(i, (draw() % (i as u64 + 1)) as usize);
            }
            order
        };
        let mut tables = Vec::with_capacity(n);
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        for (i, peer) in peers.iter().enumerate() {
            let mut config = kad::Config::new(crate::net::KAD_PROTOCOL);
            config.set_periodic_bootstrap_interval(None);
            let mut table = kad::Behaviour::with_config(*peer, MemoryStore::new(*peer), config);
            table.set_mode(Some(kad::Mode::Server));
            // Which bucket each other peer falls in, met from a different place in the
            // order for each peer; a bucket takes the first k.
            let mut count = [0u8; 256];
            let start = (draw() % n.max(1) as u64) as usize;
            for &j in order[start..].iter().chain(&order[..start]) {
                if j == i {
                    continue;
                }
                let Some(bucket) = keys[i].distance(&keys[j]).ilog2() else {
                    continue;
                };
                let bucket = bucket as usize;
                if (count[bucket] as usize) < K {
                    count[bucket] += 1;
                    let addr: Multiaddr = format!("/memory/{}", j + 1).parse().expect("address");
                    table.add_address(&peers[j], addr);
                }
            }
            // The table's routing events go nowhere: drain them so they are not kept.
            while table.poll(&mut cx).is_ready() {}
            tables.push(table);
        }
        let index = peers.iter().enumerate().map(|(i, p)| (*p, i)).collect();
        Self {
            tables,
            keys,
            index,
        }
    }

    /// The peers `from`'s routing table knows.
    pub(super) fn known(&mut self, from: usize) -> usize {
        self.tables[from].kbuckets().map(|b| b.num_entries()).sum()
    }

    /// `from` looks up the `want` peers closest to `key` as libp2p-kad's iterator does: it
    /// starts from the k closest in its own table and asks `ALPHA` at a time, the closest it
    /// has not asked yet, while answers bring peers closer than its `want`-th; after `ALPHA`
    /// answers without progress it asks all of its `want` closest it has not asked at once;
    /// it ends when its `want` closest have all answered. All requests take the same time, so
    /// a round of them is one hop.
    pub(super) fn lookup(&mut self, from: usize, key: &[u8], want: usize) -> Lookup {
        let target = KBucketKey::new(key.to_vec());
        let source = *self.keys[from].preimage();
        let mut closest: BTreeMap<KBucketDistance, (usize, Asked)> = self.tables[from]
            .get_closest_local_peers(&target)
            .take(K)
            .map(|k| (k.distance(&target), (self.index[k.preimage()], Asked::No)))
            .collect();
        let (mut hops, mut messages) = (0u32, 0u32);
        let mut stalled = false;
        let mut no_progress = 0;
        loop {
            let capacity = if stalled { want.max(ALPHA) } else { ALPHA };
            let mut batch = Vec::new();
            let mut answered = 0;
            for &(peer, asked) in closest.values() {
                match asked {
                    Asked::Answered => {
                        answered += 1;
                        if answered >= want {
                            break;
                        }
                    }
                    Asked::No if batch.len() < capacity => batch.push(peer),
                    Asked::No => break,
                }
            }
            if answered >= want || batch.is_empty() {
                break;
            }
            hops += 1;
            messages += batch.len() as u32;
            for peer in batch {
                let distance = self.keys[peer].distance(&target);
                if let Some(entry) = closest.get_mut(&distance) {
                    entry.1 = Asked::Answered;
                }
                let range = closest
                    .keys()
                    .nth(want - 1)
                    .or_else(|| closest.keys().last())
                    .copied()
                    .unwrap_or(distance);
                let mut progress = closest.len() < want;
                // What `find_closest_local_peers` answers a request from `source`, without
                // copying each entry's addresses.
                let answer: Vec<PeerId> = self.tables[peer]
                    .get_closest_local_peers(&target)
                    .map(|k| *k.preimage())
                    .filter(|p| *p != source)
                    .take(K)
                    .collect();
                for p in answer {
                    let Some(&i) = self.index.get(&p) else {
                        continue;
                    };
                    let d = self.keys[i].distance(&target);
                    let new = !closest.contains_key(&d);
                    if new {
                        closest.insert(d, (i, Asked::No));
                    }
                    progress |= new && d < range;
                }
                if stalled {
                    if progress {
                        stalled = false;
                        no_progress = 0;
                    }
                } else if progress {
                    no_progress = 0;
                } else {
                    no_progress += 1;
                    stalled = no_progress >= ALPHA;
                }
            }
        }
        let closest = closest
            .values()
            .filter(|(_, asked)| *asked == Asked::Answered)
            .map(|&(p, _)| p)
            .take(want)
            .collect();
        Lookup {
            closest,
            hops,
            messages,
        }
    }

    /// The `want` peers closest to `key`, from everyone's positions: what a lookup should find.
    pub(super) fn truly_closest(&self, key: &[u8], want: usize) -> Vec<usize> {
        let target = KBucketKey::new(key.to_vec());
        let mut all: Vec<(KBucketDistance, usize)> = self
            .keys
            .iter()
            .enumerate()
            .map(|(i, k)| (k.distance(&target), i))
            .collect();
        if want < all.len() {
            all.select_nth_unstable(want);
            all.truncate(want);
        }
        all.sort_unstable();
        all.into_iter().map(|(_, i)| i).collect()
    }
}
