//! [`Node`]: the one handle to a p2pmr peer, used alike by the CLI, the demo, the benchmarks and
//! the tests: `node.blocks()` to add and read files, `node.jobs()` to publish modules and run
//! jobs, `node.peers()` to see the daemons.
//!
//! A node is a client peer (started on first network use, see [`Link`]) or a daemon's own view
//! of itself ([`Daemon::node`](crate::Daemon::node)). Clones share the network, the repository
//! and one [`Fetcher`], so the peers' latency scores and bans persist across calls.

use crate::bitswap::Bitswap;
use crate::blocks::keeper::Keeper;
use crate::blocks::{self, Fetched, Fetcher, FileStat, RemoteError, DISCOVERY};
use crate::engine::client::{self, Follower};
use crate::error::Error;
use crate::net::{ClientConfig, Link, NetClient, PeerInfo, SwarmKey};
use crate::repo::files::{self, Added};
use crate::repo::store::{BlockStore, StoreError};
use crate::Repo;
use futures::Stream;
use libp2p::{Multiaddr, PeerId};
use p2pmr_protocol::block::DAG_PB;
use p2pmr_protocol::car::{self, CarError, CarEvent, CarReader};
use p2pmr_protocol::dagpb::PbNode;
use p2pmr_protocol::engine::{DaemonStatus, Event, JobSummary};
use p2pmr_protocol::job::JobSpec;
use p2pmr_protocol::tar;
use p2pmr_protocol::unixfs::{directory_entries, FileReader, Layout, UnixFsError, MAX_DEPTH};
use p2pmr_protocol::{Block, Cid};
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::io::{self, Read};
use std::num::NonZeroUsize;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

/// A p2pmr peer. Cheap to clone.
///
/// ```no_run
/// # async fn demo() -> Result<(), p2pmr_node::Error> {
/// use p2pmr_node::{Node, Replicas};
/// let node = Node::builder().peers(vec!["/ip4/127.0.0.1/tcp/4001".parse().unwrap()]).build();
/// let added = node.blocks().add(&b"hello world\n"[..], Replicas::network(2)).await?;
/// let mut text = Vec::new();
/// node.blocks().cat(added.root, 0, |b| { text.extend_from_slice(b); Ok(()) }).await?;
/// node.shutdown().await;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Node {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    link: Arc<Link>,
    repo: Option<Repo>,
    fetcher: Fetcher,
    /// A daemon's own node: it holds one of every stored block's copies itself.
    serving: bool,
    /// A daemon's keeper, which watches the copies the daemon places.
    keeper: Option<Keeper>,
}

/// How to build a client [`Node`].
#[derive(Debug, Clone)]
pub struct NodeBuilder {
    repo: Option<Repo>,
    config: ClientConfig,
    offline: bool,
}

impl Default for NodeBuilder {
    fn default() -> Self {
        Self {
            repo: None,
            config: ClientConfig {
                peers: Vec::new(),
                mdns: true,
                discovery: DISCOVERY,
                swarm_key: None,
                identity: None,
                mesh: crate::net::DEFAULT_MESH,
            },
            offline: false,
        }
    }
}

impl NodeBuilder {
    /// Reads (and with [`Replicas::Local`], writes) this repository first.
    pub fn repo(mut self, repo: Repo) -> Self {
        self.repo = Some(repo);
        self
    }

    /// Daemons to dial (each may end in `/p2p/<peer id>`).
    pub fn peers(mut self, peers: Vec<Multiaddr>) -> Self {
        self.config.peers = peers;
        self
    }

    /// LAN discovery with mDNS (on by default).
    pub fn mdns(mut self, on: bool) -> Self {
        self.config.mdns = on;
        self
    }

    /// How long to look for daemons before using what was found.
    pub fn discovery(mut self, window: Duration) -> Self {
        self.config.discovery = window;
        self
    }

    /// The private swarm's key: the node reaches only daemons that hold it.
    pub fn swarm_key(mut self, key: Option<SwarmKey>) -> Self {
        self.config.swarm_key = key;
        self
    }

    /// The peer identity to connect with (by default a fresh one each time the node starts
    /// its network): what daemons started with `--allow-jobs` recognise.
    pub fn identity(mut self, keypair: libp2p::identity::Keypair) -> Self {
        self.config.identity = Some(keypair);
        self
    }

    /// Most daemons the node connects to as it discovers them (by default
    /// [`DEFAULT_MESH`](crate::DEFAULT_MESH)); past it, it finds the daemons each
    /// placement group needs with Kademlia lookups.
    pub fn mesh(mut self, daemons: usize) -> Self {
        self.config.mesh = daemons;
        self
    }

    /// No network at all: only the repository is reachable.
    pub fn offline(mut self) -> Self {
        self.offline = true;
        self
    }

    /// The node. Its network starts on first use.
    pub fn build(self) -> Node {
        let link = if self.offline {
            Link::offline()
        } else {
            Link::lazy(self.config)
        };
        Node::with_link(link, self.repo, None)
    }
}

impl Node {
    /// How to build a client node.
    pub fn builder() -> NodeBuilder {
        NodeBuilder::default()
    }

    /// A daemon's view of itself: its running network and repository, and the IPFS nodes it
    /// can fetch from.
    pub(crate) fn serving(
        net: NetClient,
        (repo, keeper): (Repo, Keeper),
        bitswap: Bitswap,
    ) -> Self {
        Self::with_link(Link::given(net), Some(repo), Some((bitswap, keeper)))
    }

    /// A node over `link`; a daemon's own node also has its Bitswap client and its keeper.
    fn with_link(link: Link, repo: Option<Repo>, daemon: Option<(Bitswap, Keeper)>) -> Self {
        let link = Arc::new(link);
        let serving = daemon.is_some();
        let fetcher = Fetcher::over(link.clone(), repo.as_ref().map(|r| r.blocks().clone()));
        let (fetcher, keeper) = match daemon {
            Some((bitswap, keeper)) => (fetcher.with_bitswap(bitswap), Some(keeper)),
            None => (fetcher, None),
        };
        Self {
            inner: Arc::new(Inner {
                link,
                repo,
                fetcher,
                serving,
                keeper,
            }),
        }
    }

    /// Has a daemon's keeper watch the copies of blocks it placed ([`Keeper::keep_own_copies`]).
    async fn keep_own_copies(&self, blocks: Vec<(Cid, Option<Cid>)>, target: usize) {
        if let Some(keeper) = &self.inner.keeper {
            keeper.keep_own_copies(blocks, target).await;
        }
    }

    /// The repository, if this node has one.
    pub fn repo(&self) -> Option<&Repo> {
        self.inner.repo.as_ref()
    }

    /// The fetcher every read of this node goes through.
    pub fn fetcher(&self) -> &Fetcher {
        &self.inner.fetcher
    }

    /// The network, started if need be, once `want` daemons are connected or discovery is over.
    pub async fn net(&self, want: usize) -> Result<&NetClient, Error> {
        self.inner.link.ready(want).await?.ok_or(Error::Offline)
    }

    /// Like [`Node::net`], without waiting for LAN discovery to settle once `want` daemons
    /// are found: for what any daemon can start (submitting a job, publishing its module).
    pub async fn net_soon(&self, want: usize) -> Result<&NetClient, Error> {
        self.inner
            .link
            .ready_soon(want)
            .await?
            .ok_or(Error::Offline)
    }

    /// This peer's id and the addresses it listens on (starting the network if need be).
    pub async fn identity(&self) -> Result<(PeerId, Vec<Multiaddr>), Error> {
        let net = self.net(0).await?;
        Ok((net.local_peer_id(), net.listen_addrs()))
    }

    /// The daemons.
    pub fn peers(&self) -> Peers<'_> {
        Peers(self)
    }

    /// Files and blocks.
    pub fn blocks(&self) -> Blocks<'_> {
        Blocks(self)
    }

    /// Jobs.
    pub fn jobs(&self) -> Jobs<'_> {
        Jobs(self)
    }

    /// Closes the client peer this node started, if any (a daemon's network keeps running
    /// until the daemon stops).
    pub async fn shutdown(&self) {
        self.inner.link.close().await;
    }
}

/// The daemons a [`Node`] can reach.
#[derive(Debug, Clone, Copy)]
pub struct Peers<'a>(&'a Node);

impl Peers<'_> {
    /// Every daemon found within the discovery window.
    pub async fn list(&self) -> Result<BTreeMap<PeerId, PeerInfo>, Error> {
        self.wait_for(usize::MAX).await
    }

    /// The daemons, once `n` are connected or discovery is over.
    pub async fn wait_for(&self, n: usize) -> Result<BTreeMap<PeerId, PeerInfo>, Error> {
        Ok(self.0.net(n).await?.daemons())
    }

    /// Every daemon's slots, running tasks and holdings, asked of all at once (this one too,
    /// if it is a daemon); a daemon that does not answer within `limit` has an error instead.
    pub async fn status(&self, limit: Duration) -> Result<Vec<DaemonView>, Error> {
        let net = self.0.net(usize::MAX).await?;
        let known = net.daemons();
        let asks = net.job_peers().into_iter().map(|peer| {
            let info = match known.get(&peer) {
                Some(info) => info.clone(),
                None => PeerInfo {
                    addrs: net.listen_addrs(),
                    agent: crate::net::AGENT.to_string(),
                },
            };
            async move {
                let status = client::status(net, peer, limit).await;
                DaemonView {
                    peer,
                    info,
                    me: peer == net.local_peer_id(),
                    status,
                }
            }
        });
        Ok(futures::future::join_all(asks).await)
    }
}

/// A daemon as [`Peers::status`] sees it.
#[derive(Debug)]
pub struct DaemonView {
    /// Its peer id.
    pub peer: PeerId,
    /// Its addresses and agent.
    pub info: PeerInfo,
    /// Whether it is the daemon asking.
    pub me: bool,
    /// Its slots, running tasks and holdings, or why it did not say.
    pub status: Result<DaemonStatus, Error>,
}

/// Where [`Blocks::add`] stores a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replicas {
    /// Nowhere: only compute the CID.
    OnlyHash,
    /// In the node's repository only.
    Local,
    /// Durably on this many distinct daemons.
    Network(NonZeroUsize),
}

impl Replicas {
    /// [`Replicas::Network`] with `n` copies (at least one).
    pub fn network(n: usize) -> Self {
        Self::Network(NonZeroUsize::new(n).unwrap_or(NonZeroUsize::MIN))
    }
}

/// Files and blocks, local and on the network.
#[derive(Debug, Clone, Copy)]
pub struct Blocks<'a>(&'a Node);

impl Blocks<'_> {
    /// Adds `source` (kubo's layout and CIDs) and returns once it is stored as asked.
    pub async fn add(
        &self,
        source: impl Read + Send + 'static,
        replicas: Replicas,
    ) -> Result<Added, Error> {
        self.add_as(source, replicas, Layout::KUBO).await
    }

    /// [`Blocks::add`] in `layout` (e.g. kubo's with `--chunker=buzhash`).
    pub async fn add_as(
        &self,
        source: impl Read + Send + 'static,
        replicas: Replicas,
        layout: Layout,
    ) -> Result<Added, Error> {
        match replicas {
            Replicas::OnlyHash => blocking(move || files::import(source, None, layout)).await,
            Replicas::Local => {
                let repo = self.0.repo().ok_or(Error::NoRepo)?.blocks().clone();
                blocking(move || files::import(source, Some(&repo), layout)).await
            }
            // A daemon holds one of the copies itself (see `commit`).
            Replicas::Network(_) if self.0.inner.serving => {
                self.add_whole_as(source, replicas, layout).await
            }
            Replicas::Network(n) => {
                let net = self.0.net(n.get()).await?;
                Ok(blocks::add(net, source, n.get(), layout).await?)
            }
        }
    }

    /// Streams the file at `root` from byte `offset` into `sink`; returns the bytes written.
    pub async fn cat(
        &self,
        root: Cid,
        offset: u64,
        sink: impl FnMut(&[u8]) -> io::Result<()>,
    ) -> Result<u64, Error> {
        Ok(self.0.fetcher().cat(root, offset, sink).await?)
    }

    /// Streams a file, or every file of a directory in name order (a job's output: its
    /// partitions in order), into `sink`.
    pub async fn cat_tree<F>(&self, root: Cid, sink: &mut F) -> Result<u64, Error>
    where
        F: FnMut(&[u8]) -> io::Result<()>,
    {
        Ok(self.0.fetcher().cat_tree(root, sink).await?)
    }

    /// Writes the file or directory at `root` to `path`, which must not exist.
    pub async fn get(&self, root: Cid, path: &Path) -> Result<u64, Error> {
        Ok(self.0.fetcher().get(root, path).await?)
    }

    /// Like [`Blocks::get`], telling `progress` of each piece of bytes written.
    pub async fn get_with(
        &self,
        root: Cid,
        path: &Path,
        progress: &mut (dyn FnMut(u64) + Send),
    ) -> Result<u64, Error> {
        Ok(self.0.fetcher().get_with(root, path, progress).await?)
    }

    /// The size in bytes of the file at `root`, from its root block; `None` for a directory.
    pub async fn size(&self, root: Cid) -> Result<Option<u64>, Error> {
        let block = self.0.fetcher().fetch(root).await?;
        if directory_entries(&block)
            .map_err(RemoteError::from)?
            .is_some()
        {
            return Ok(None);
        }
        let mut reader = FileReader::new(root);
        reader.feed(&block).map_err(RemoteError::from)?;
        Ok(reader.file_size())
    }

    /// Size, block count and who holds which blocks.
    pub async fn stat(&self, root: Cid) -> Result<FileStat, Error> {
        Ok(blocks::stat(self.0.fetcher(), root).await?)
    }

    /// Writes the DAG at `root` as a CARv1 into `out`: the header naming `root`, then every
    /// block once, depth-first in link order (as kubo's `dag export` does). Returns the bytes
    /// written.
    pub async fn export_car(
        &self,
        root: Cid,
        out: &mut (impl AsyncWrite + Unpin),
    ) -> Result<u64, Error> {
        let header = car::header_v1(&[root]);
        write(out, &header).await?;
        let mut written = header.len() as u64;
        let mut seen = HashSet::new();
        let mut stack = vec![(root, 0usize)];
        while let Some((cid, depth)) = stack.pop() {
            if !seen.insert(cid) {
                continue;
            }
            if depth > MAX_DEPTH {
                return Err(RemoteError::from(UnixFsError::TooDeep { cid }).into());
            }
            let block = self.0.fetcher().fetch(cid).await?;
            written += write_section(out, &block).await?;
            stack.extend(links(&block)?.into_iter().rev().map(|l| (l, depth + 1)));
        }
        Ok(written)
    }

    /// Writes as a CARv1 only the blocks that prove bytes `first..=last` of the file at
    /// `root` (the trustless gateway's `entity-bytes`): the root, the inner nodes over the
    /// range and its leaves, depth-first. Returns the bytes written.
    pub async fn export_car_range(
        &self,
        root: Cid,
        first: u64,
        last: u64,
        out: &mut (impl AsyncWrite + Unpin),
    ) -> Result<u64, Error> {
        let header = car::header_v1(&[root]);
        write(out, &header).await?;
        let mut written = header.len() as u64;
        let mut reader = FileReader::starting_at(root, first);
        while let Some(&cid) = reader.next_needed() {
            if reader.next_offset().is_some_and(|start| start > last) {
                break;
            }
            let block = self.0.fetcher().fetch(cid).await?;
            reader.feed(&block).map_err(RemoteError::from)?;
            written += write_section(out, &block).await?;
        }
        Ok(written)
    }

    /// Writes the file or directory at `root` into `out` as a tar stream named `name` (kubo's
    /// `get`): directories as directory entries, files with their bytes, in name order.
    pub async fn export_tar(
        &self,
        root: Cid,
        name: &str,
        out: &mut (impl AsyncWrite + Unpin),
    ) -> Result<u64, Error> {
        let mut written = 0;
        let mut stack = vec![(root, name.to_owned(), 0usize)];
        while let Some((cid, path, depth)) = stack.pop() {
            if depth > MAX_DEPTH {
                return Err(RemoteError::from(UnixFsError::TooDeep { cid }).into());
            }
            let block = self.0.fetcher().fetch(cid).await?;
            let entries = directory_entries(&block).map_err(RemoteError::from)?;
            let kind = match &entries {
                Some(_) => tar::Kind::Directory,
                None => {
                    let mut reader = FileReader::new(cid);
                    reader.feed(&block).map_err(RemoteError::from)?;
                    tar::Kind::File(reader.file_size().unwrap_or(0))
                }
            };
            let header = tar::header(&path, kind).map_err(|e| bad_entry(cid, e.to_string()))?;
            write(out, &header).await?;
            written += header.len() as u64;
            match (entries, kind) {
                (Some(entries), _) => {
                    for e in entries.into_iter().rev() {
                        // A name that would climb out of the tree, or into another, is refused.
                        if e.name.is_empty()
                            || e.name == "."
                            || e.name == ".."
                            || e.name.contains('/')
                        {
                            return Err(bad_entry(cid, format!("unsafe name {:?}", e.name)));
                        }
                        stack.push((e.cid, format!("{path}/{}", e.name), depth + 1));
                    }
                }
                (None, tar::Kind::File(size)) => {
                    let (tx, mut rx) = mpsc::channel(4);
                    let fetcher = self.0.fetcher().clone();
                    let producer = tokio::spawn(async move { fetcher.stream(cid, 0, tx).await });
                    while let Some(chunk) = rx.recv().await {
                        write(out, &chunk.bytes).await?;
                    }
                    let sent = producer.await.expect("reader task panicked")?;
                    if sent != size {
                        return Err(bad_entry(
                            cid,
                            format!("{sent} bytes where {size} were declared"),
                        ));
                    }
                    write(out, &vec![0; tar::padding(size)]).await?;
                    written += size + tar::padding(size) as u64;
                }
                (None, tar::Kind::Directory) => unreachable!("a directory has entries"),
            }
        }
        write(out, &tar::trailer()).await?;
        Ok(written + 2 * tar::BLOCK as u64)
    }

    /// Imports a CAR (v1 or v2) from `source`: every block is verified as it streams in and
    /// staged on disk; once the whole DAG under each root is known to be there, the blocks are
    /// stored as `replicas` says. A corrupt CAR or a missing block keeps nothing. Returns the
    /// roots.
    pub async fn import_car(
        &self,
        source: impl Read + Send + 'static,
        replicas: Replicas,
    ) -> Result<Vec<Cid>, Error> {
        let staging = self.staging()?;
        let store = staging.store.clone();
        let (roots, cids) = tokio::task::spawn_blocking(move || stage_car(source, &store))
            .await
            .expect("import task panicked")?;
        self.commit(staging, &roots, cids, replicas).await?;
        Ok(roots)
    }

    /// Adds `source` so that a failure keeps nothing: its blocks are staged on disk while it is
    /// read, and stored as `replicas` says only once the whole file is in (an upload cut off
    /// half way leaves no blocks behind). Returns the file's root, size and block count.
    pub async fn add_whole(
        &self,
        source: impl Read + Send + 'static,
        replicas: Replicas,
    ) -> Result<Added, Error> {
        self.add_whole_as(source, replicas, Layout::KUBO).await
    }

    /// [`Blocks::add_whole`] in `layout`.
    pub async fn add_whole_as(
        &self,
        source: impl Read + Send + 'static,
        replicas: Replicas,
        layout: Layout,
    ) -> Result<Added, Error> {
        if replicas == Replicas::OnlyHash {
            return blocking(move || files::import(source, None, layout)).await;
        }
        let staging = self.staging()?;
        let store = staging.store.clone();
        let (added, cids) = blocking(move || -> Result<_, Error> {
            let added = files::import(source, Some(&store), layout)?;
            let cids = store.list().collect::<Result<Vec<Cid>, _>>()?;
            Ok((added, cids))
        })
        .await?;
        self.commit(staging, &[added.root], cids, replicas).await?;
        Ok(added)
    }

    /// Copies the staged blocks `cids` into the repository, durably.
    async fn keep(&self, staged: BlockStore, cids: Vec<Cid>) -> Result<(), Error> {
        let repo = self.0.repo().ok_or(Error::NoRepo)?.blocks().clone();
        blocking(move || -> Result<(), StoreError> {
            for cid in &cids {
                repo.adopt(&staged, cid)?;
            }
            repo.sync(cids.iter())
        })
        .await
    }

    /// Stores one block as `replicas` says (durably before it returns).
    pub async fn put_block(&self, block: Block, replicas: Replicas) -> Result<(), Error> {
        match replicas {
            Replicas::OnlyHash => Ok(()),
            Replicas::Local => {
                let repo = self.0.repo().ok_or(Error::NoRepo)?.blocks().clone();
                blocking(move || -> Result<(), StoreError> {
                    repo.put(&block)?;
                    repo.sync([block.cid()])
                })
                .await
            }
            Replicas::Network(n) if self.0.inner.serving => {
                let repo = self.0.repo().ok_or(Error::NoRepo)?.blocks().clone();
                let cid = *block.cid();
                let local = repo.clone();
                blocking(move || -> Result<(), StoreError> {
                    local.put(&block)?;
                    local.sync([block.cid()])
                })
                .await?;
                let net = self.0.net(n.get()).await?;
                let own = HashMap::new();
                blocks::replicate(net, &repo, &[cid], n.get() - 1, &[], &own).await?;
                self.0.keep_own_copies(vec![(cid, None)], n.get()).await;
                Ok(())
            }
            Replicas::Network(n) => {
                let net = self.0.net(n.get()).await?;
                let (tx, rx) = mpsc::channel(1);
                tx.send((block, None)).await.expect("the receiver is here");
                drop(tx);
                Ok(blocks::push_all(net, rx, n.get()).await?)
            }
        }
    }

    /// A temporary block store beside the repository (or in the system's temporary directory).
    fn staging(&self) -> Result<Staging, Error> {
        let dir = match self.0.repo() {
            Some(repo) => tempfile::tempdir_in(repo.home()),
            None => tempfile::tempdir(),
        }
        .map_err(Error::TempDir)?;
        let store = BlockStore::open(dir.path())?;
        Ok(Staging { store, _dir: dir })
    }

    /// Stores the staged blocks `cids` (of the DAGs at `roots`) as `replicas` says, placed by
    /// group; the staging goes away either way.
    async fn commit(
        &self,
        staging: Staging,
        roots: &[Cid],
        cids: Vec<Cid>,
        replicas: Replicas,
    ) -> Result<(), Error> {
        let staged = staging.store.clone();
        let groups = || {
            let (staged, roots) = (staged.clone(), roots.to_vec());
            blocking(move || Ok::<_, Error>(blocks::placement_groups(&staged, &roots)))
        };
        match replicas {
            Replicas::OnlyHash => {}
            Replicas::Local => self.keep(staged, cids).await?,
            Replicas::Network(n) if self.0.inner.serving => {
                // A daemon keeps a copy and places the others, as it does a job's output.
                let groups = groups().await?;
                self.keep(staged, cids.clone()).await?;
                let repo = self.0.repo().ok_or(Error::NoRepo)?.blocks().clone();
                let net = self.0.net(n.get()).await?;
                blocks::replicate(net, &repo, &cids, n.get() - 1, &[], &groups).await?;
                let notes = cids.iter().map(|c| (*c, groups.get(c).copied()));
                self.0.keep_own_copies(notes.collect(), n.get()).await;
            }
            Replicas::Network(n) => {
                let groups = groups().await?;
                let net = self.0.net(n.get()).await?;
                let (tx, rx) = mpsc::channel(blocks::WINDOW);
                let reader = tokio::task::spawn_blocking(move || {
                    for cid in &cids {
                        let block = staged.get(cid)?;
                        let group = groups.get(cid).copied();
                        if tx.blocking_send((block, group)).is_err() {
                            break; // the upload failed; it says why
                        }
                    }
                    Ok::<_, StoreError>(())
                });
                let pushed = blocks::push_all(net, rx, n.get()).await;
                reader.await.expect("staging reader panicked")?;
                pushed?;
            }
        }
        drop(staging);
        Ok(())
    }

    /// Has a daemon (`daemon`, else the one `root` ranks first) fetch the DAG at `root` from
    /// wherever it is, IPFS nodes included, and keep it on `replicas` daemons; the handle
    /// follows its progress like a job's (`Fetching` events, then `Completed` with `root`).
    pub async fn pin(
        &self,
        root: Cid,
        replicas: u32,
        daemon: Option<PeerId>,
    ) -> Result<JobHandle, Error> {
        let net = self.0.net(replicas as usize).await?;
        let coordinator = client::coordinator_for(net, &root, daemon)?;
        let id = client::pin(net, coordinator, root, replicas).await?;
        Ok(JobHandle {
            node: self.0.clone(),
            id,
            coordinator,
            spec: None,
        })
    }

    /// Fetches the DAG at `root` from wherever it is (this repository, daemons, or, for a
    /// daemon's own node, IPFS nodes over Bitswap) and stores it as `replicas` says, placed by
    /// group like an add; `progress` sees each block as it comes. Nothing is kept if a block
    /// cannot be had.
    pub(crate) async fn fetch_and_keep(
        &self,
        root: Cid,
        replicas: Replicas,
        progress: impl FnMut(&Fetched),
    ) -> Result<Fetched, Error> {
        let staging = self.staging()?;
        let (cids, fetched) = self
            .0
            .fetcher()
            .fetch_dag(root, &staging.store, progress)
            .await?;
        self.commit(staging, &[root], cids, replicas).await?;
        Ok(fetched)
    }

    /// Copies every block of the DAG at `root` into `store`.
    pub async fn copy_into(&self, root: Cid, store: &BlockStore) -> Result<u64, Error> {
        Ok(self.0.fetcher().copy_into(root, store).await?)
    }
}

/// Jobs: publish modules, submit specs, follow, list and cancel.
#[derive(Debug, Clone, Copy)]
pub struct Jobs<'a>(&'a Node);

impl Jobs<'_> {
    /// Publishes a wasm module to every daemon; returns its CID.
    pub async fn publish(&self, wasm: Vec<u8>) -> Result<Cid, Error> {
        // Refused here rather than by every worker after it was copied to all of them.
        if !wasm.starts_with(b"\0asm") {
            return Err(Error::NotWasm);
        }
        if self.0.inner.serving {
            return Ok(self.everywhere(wasm).await?.root);
        }
        let net = self.0.net_soon(1).await?;
        Ok(client::publish_module(net, wasm, usize::MAX).await?)
    }

    /// Stores `bytes` on this daemon and every daemon it knows: a job's module and spec, which
    /// every worker needs and which must outlive any one daemon.
    async fn everywhere(&self, bytes: Vec<u8>) -> Result<Added, Error> {
        let net = self.0.net(1).await?;
        let everyone = Replicas::network(net.job_peers().len());
        self.0
            .blocks()
            .add_whole(io::Cursor::new(bytes), everyone)
            .await
    }

    /// Publishes `spec` (so whoever follows the job can hand it to another coordinator) and
    /// hands it to `coordinator`, by default the daemon the job id ranks first.
    pub async fn submit(
        &self,
        spec: JobSpec,
        coordinator: Option<PeerId>,
    ) -> Result<JobHandle, Error> {
        let net = self.0.net_soon(1).await?;
        let coordinator = client::coordinator_for(net, &spec.id(), coordinator)?;
        if self.0.inner.serving {
            self.everywhere(spec.encode()).await?;
        } else {
            client::publish_spec(net, &spec, usize::MAX).await?;
        }
        let id = client::submit(net, coordinator, &spec).await?;
        Ok(JobHandle {
            node: self.0.clone(),
            id,
            coordinator,
            spec: Some(spec),
        })
    }

    /// A handle to the existing job `id`, on `coordinator` or whichever daemon lists it.
    pub async fn attach(&self, id: Cid, coordinator: Option<PeerId>) -> Result<JobHandle, Error> {
        let net = self.0.net(1).await?;
        let coordinator = client::locate(net, &id, coordinator).await?;
        Ok(JobHandle {
            node: self.0.clone(),
            id,
            coordinator,
            spec: None,
        })
    }

    /// Every reachable daemon's jobs.
    pub async fn list(&self) -> Result<Vec<(PeerId, Result<Vec<JobSummary>, Error>)>, Error> {
        let net = self.0.net(usize::MAX).await?;
        let listed = client::list(net).await;
        Ok(listed
            .into_iter()
            .map(|(peer, r)| (peer, r.map_err(Error::from)))
            .collect())
    }

    /// Stops the job `id` everywhere.
    pub async fn cancel(&self, id: Cid, coordinator: Option<PeerId>) -> Result<(), Error> {
        let net = self.0.net(1).await?;
        let coordinator = client::locate(net, &id, coordinator).await?;
        Ok(client::cancel(net, coordinator, id).await?)
    }
}

/// Blocks held aside until a whole upload is in; the directory goes with the value.
#[derive(Debug)]
struct Staging {
    store: BlockStore,
    _dir: tempfile::TempDir,
}

/// A submitted or attached job.
#[derive(Debug, Clone)]
pub struct JobHandle {
    node: Node,
    id: Cid,
    coordinator: PeerId,
    spec: Option<JobSpec>,
}

impl JobHandle {
    /// The job id (the CID of its spec).
    pub fn id(&self) -> Cid {
        self.id
    }

    /// The daemon the job was handed to.
    pub fn coordinator(&self) -> PeerId {
        self.coordinator
    }

    /// Follows the job's events from the first (see [`Follower`]).
    pub async fn follower(&self) -> Result<Follower, Error> {
        let net = self.node.net_soon(1).await?.clone();
        Ok(Follower::new(
            net,
            self.coordinator,
            self.id,
            self.spec.clone(),
        ))
    }

    /// Follows the job to its end, handing each event to `on_event`; the output CID if it
    /// succeeded.
    pub async fn wait(&self, mut on_event: impl FnMut(&Event)) -> Result<Cid, Error> {
        let mut follower = self.follower().await?;
        while let Some(events) = follower.next_batch().await? {
            for e in &events {
                on_event(e);
            }
            if follower.is_done() {
                return match events.into_iter().last() {
                    Some(Event::Completed { output, .. }) => Ok(output),
                    Some(Event::Failed { reason }) => Err(Error::JobFailed {
                        job: self.id,
                        reason,
                    }),
                    _ => Err(Error::JobCancelled { job: self.id }),
                };
            }
        }
        Err(Error::JobCancelled { job: self.id })
    }

    /// The job's events from the first to the final one, as a stream.
    pub fn events(&self) -> impl Stream<Item = Result<Event, Error>> + Send + 'static {
        use futures::StreamExt;
        self.stamped_events().map(|e| e.map(|(_, event)| event))
    }

    /// As [`JobHandle::events`], each event with the time its coordinator recorded it (Unix
    /// milliseconds, by the coordinator's clock).
    pub fn stamped_events(
        &self,
    ) -> impl Stream<Item = Result<(u64, Event), Error>> + Send + 'static {
        let handle = self.clone();
        let state = (None::<Follower>, VecDeque::new(), Some(handle));
        futures::stream::unfold(state, |(mut follower, mut queue, mut handle)| async move {
            loop {
                if let Some(e) = queue.pop_front() {
                    return Some((Ok(e), (follower, queue, handle)));
                }
                if follower.is_none() {
                    let h = handle.take()?;
                    match h.follower().await {
                        Ok(f) => follower = Some(f),
                        Err(e) => return Some((Err(e), (None, queue, None))),
                    }
                }
                let f = follower.as_mut().expect("set above");
                match f.next_stamped().await {
                    Ok(Some(events)) => queue.extend(events),
                    Ok(None) => return None,
                    Err(e) => return Some((Err(e.into()), (None, queue, None))),
                }
            }
        })
    }
}

/// Writes `block` as a CAR section; returns the bytes written.
async fn write_section(out: &mut (impl AsyncWrite + Unpin), block: &Block) -> Result<u64, Error> {
    let prefix = car::section_prefix(block.cid(), block.len());
    write(out, &prefix).await?;
    write(out, block.data()).await?;
    Ok((prefix.len() + block.len()) as u64)
}

/// The blocks a block links to (dag-pb links; none for raw and other codecs).
fn links(block: &Block) -> Result<Vec<Cid>, Error> {
    if block.cid().codec() != DAG_PB {
        return Ok(Vec::new());
    }
    let node = PbNode::decode(block.data()).map_err(|e| RemoteError::from(UnixFsError::from(e)))?;
    Ok(node.links.iter().map(|l| l.hash).collect())
}

/// Reads a CAR from `source` into `store` (verifying every block), then checks that the DAG
/// under every root is complete there. Returns the roots and the CIDs stored, in CAR order.
fn stage_car(mut source: impl Read, store: &BlockStore) -> Result<(Vec<Cid>, Vec<Cid>), Error> {
    let mut reader = CarReader::new();
    let mut buf = vec![0; 256 << 10];
    let (mut roots, mut cids) = (None, Vec::new());
    loop {
        let n = match source.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(files::FileError::Input(e).into()),
        };
        reader.feed(&buf[..n]);
        while let Some(event) = reader.next_event()? {
            match event {
                CarEvent::Header { roots: r, .. } => roots = Some(r),
                CarEvent::Block(block) => {
                    store.put(&block)?;
                    cids.push(*block.cid());
                }
            }
        }
    }
    reader.end()?;
    let roots = roots.ok_or(CarError::Truncated)?;
    for &root in &roots {
        let mut stack = vec![(root, 0usize)];
        let mut seen = HashSet::new();
        while let Some((cid, depth)) = stack.pop() {
            if depth > MAX_DEPTH || !seen.insert(cid) {
                continue;
            }
            let block = match store.get(&cid) {
                Ok(block) => block,
                Err(StoreError::NotFound(_)) => return Err(Error::MissingBlock { cid, root }),
                Err(e) => return Err(e.into()),
            };
            stack.extend(links(&block)?.into_iter().map(|l| (l, depth + 1)));
        }
    }
    Ok((roots, cids))
}

/// A DAG entry that cannot be written as it is.
fn bad_entry(cid: Cid, what: String) -> Error {
    Error::Unwritable { cid, what }
}

async fn write(out: &mut (impl AsyncWrite + Unpin), bytes: &[u8]) -> Result<(), Error> {
    out.write_all(bytes)
        .await
        .map_err(|e| files::FileError::Output(e).into())
}

/// Runs blocking file work off the async threads.
async fn blocking<T: Send + 'static, E: Into<Error> + Send + 'static>(
    work: impl FnOnce() -> Result<T, E> + Send + 'static,
) -> Result<T, Error> {
    tokio::task::spawn_blocking(work)
        .await
        .expect("file task panicked")
        .map_err(Into::into)
}
