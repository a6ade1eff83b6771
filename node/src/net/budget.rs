//! Byte budgets for inbound frames: one shared by every peer, and a share of it per peer, so
//! that one peer sending large frames slowly cannot hold the whole budget and make every
//! other peer's large requests busy.
//!
//! request-response gives its codec no peer: the behaviour clones its codec once for each
//! connection's handler, and the handler clones that copy for each stream. [`Budgeted`] wraps
//! the behaviour and names the peer of the connection being set up just before that first
//! clone, which picks the peer's budget; clones of a connection's codec share it.

use libp2p::core::transport::PortUse;
use libp2p::core::Endpoint;
use libp2p::request_response;
use libp2p::swarm::{
    ConnectionDenied, ConnectionId, FromSwarm, NetworkBehaviour, THandler, THandlerInEvent,
    THandlerOutEvent, ToSwarm,
};
use libp2p::{Multiaddr, PeerId};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Bytes of large inbound frames being read at once, in all: what peers sending large
/// frames slowly (or never finishing them) can make this peer hold.
pub const INBOUND_BUDGET: usize = 128 << 20;
/// Of [`INBOUND_BUDGET`], what one peer may hold over all its connections and streams: room
/// for a full window of the largest blocks, and a quarter of the whole.
pub const PEER_BUDGET: usize = 32 << 20;
/// Budgets are counted in units of this many bytes.
pub(super) const BUDGET_UNIT: usize = 1 << 10;

/// The budgets inbound frames draw on: the shared one, and each peer's share, kept while a
/// connection of the peer uses it.
#[derive(Clone)]
pub struct InboundBudget {
    shared: Arc<Semaphore>,
    per_peer: usize,
    peers: Arc<Mutex<Peers>>,
}

#[derive(Default)]
struct Peers {
    /// The peer whose connection's codec is cloned next (set by [`Budgeted`]).
    next: Option<PeerId>,
    budgets: HashMap<PeerId, Weak<Semaphore>>,
    /// Entries of peers whose connections all closed are swept once the map reaches this.
    sweep_at: usize,
}

impl std::fmt::Debug for InboundBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InboundBudget")
            .field(
                "shared_free",
                &(self.shared.available_permits() * BUDGET_UNIT),
            )
            .field("per_peer", &(self.per_peer * BUDGET_UNIT))
            .finish()
    }
}

impl Default for InboundBudget {
    fn default() -> Self {
        Self::new(INBOUND_BUDGET, PEER_BUDGET)
    }
}

impl InboundBudget {
    /// Budgets of `total` bytes shared, of which each peer may hold `per_peer`.
    pub fn new(total: usize, per_peer: usize) -> Self {
        Self {
            shared: Arc::new(Semaphore::new(total / BUDGET_UNIT)),
            per_peer: per_peer / BUDGET_UNIT,
            peers: Arc::default(),
        }
    }

    /// Says whose connection is set up next.
    fn next_connection_from(&self, peer: PeerId) {
        self.lock().next = Some(peer);
    }

    /// The budget of the peer named by [`Self::next_connection_from`], or one of its own for a
    /// connection nobody named (a codec used without [`Budgeted`]).
    pub(super) fn for_new_connection(&self) -> Arc<Semaphore> {
        let mut peers = self.lock();
        let Some(peer) = peers.next.take() else {
            return Arc::new(Semaphore::new(self.per_peer));
        };
        if let Some(budget) = peers.budgets.get(&peer).and_then(Weak::upgrade) {
            return budget;
        }
        let budget = Arc::new(Semaphore::new(self.per_peer));
        peers.budgets.insert(peer, Arc::downgrade(&budget));
        if peers.budgets.len() >= peers.sweep_at {
            peers.budgets.retain(|_, b| b.strong_count() > 0);
            peers.sweep_at = (2 * peers.budgets.len()).max(64);
        }
        budget
    }

    /// Takes `units` from the peer's budget and the shared one, or from neither.
    pub(super) fn take(&self, peer: &Arc<Semaphore>, units: u32) -> Option<Permits> {
        let own = peer.clone().try_acquire_many_owned(units).ok()?;
        let shared = self.shared.clone().try_acquire_many_owned(units).ok()?;
        Some(Permits(own, shared))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Peers> {
        // The map holds no invariant a panic could break half way.
        self.peers.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Bytes held from a peer's budget and the shared one, given back when dropped.
pub(super) struct Permits(OwnedSemaphorePermit, OwnedSemaphorePermit);

impl Permits {
    /// Adds `more` to what is held.
    pub(super) fn merge(&mut self, more: Permits) {
        self.0.merge(more.0);
        self.1.merge(more.1);
    }
}

/// A request-response behaviour whose codec, cloned for each new connection, learns the
/// connection's peer (see the module's comment). Derefs to the behaviour.
pub(super) struct Budgeted<C>
where
    C: request_response::Codec + Clone + Send + 'static,
{
    inner: request_response::Behaviour<C>,
    budget: InboundBudget,
}

impl<C> Budgeted<C>
where
    C: request_response::Codec + Clone + Send + 'static,
{
    /// Wraps `inner`, whose codec draws on `budget`.
    pub(super) fn new(inner: request_response::Behaviour<C>, budget: InboundBudget) -> Self {
        Self { inner, budget }
    }
}

impl<C> std::ops::Deref for Budgeted<C>
where
    C: request_response::Codec + Clone + Send + 'static,
{
    type Target = request_response::Behaviour<C>;
    fn deref(&self) -> &Self::Target {
        &self.inner
    }
}

impl<C> std::ops::DerefMut for Budgeted<C>
where
    C: request_response::Codec + Clone + Send + 'static,
{
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.inner
    }
}

impl<C> NetworkBehaviour for Budgeted<C>
where
    C: request_response::Codec + Clone + Send + 'static,
{
    type ConnectionHandler =
        <request_response::Behaviour<C> as NetworkBehaviour>::ConnectionHandler;
    type ToSwarm = <request_response::Behaviour<C> as NetworkBehaviour>::ToSwarm;

    fn handle_pending_inbound_connection(
        &mut self,
        id: ConnectionId,
        local: &Multiaddr,
        remote: &Multiaddr,
    ) -> Result<(), ConnectionDenied> {
        self.inner
            .handle_pending_inbound_connection(id, local, remote)
    }

    fn handle_established_inbound_connection(
        &mut self,
        id: ConnectionId,
        peer: PeerId,
        local: &Multiaddr,
        remote: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.budget.next_connection_from(peer);
        self.inner
            .handle_established_inbound_connection(id, peer, local, remote)
    }

    fn handle_pending_outbound_connection(
        &mut self,
        id: ConnectionId,
        peer: Option<PeerId>,
        addresses: &[Multiaddr],
        role: Endpoint,
    ) -> Result<Vec<Multiaddr>, ConnectionDenied> {
        self.inner
            .handle_pending_outbound_connection(id, peer, addresses, role)
    }

    fn handle_established_outbound_connection(
        &mut self,
        id: ConnectionId,
        peer: PeerId,
        addr: &Multiaddr,
        role: Endpoint,
        port_use: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.budget.next_connection_from(peer);
        self.inner
            .handle_established_outbound_connection(id, peer, addr, role, port_use)
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        self.inner.on_swarm_event(event)
    }

    fn on_connection_handler_event(
        &mut self,
        peer: PeerId,
        id: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        self.inner.on_connection_handler_event(peer, id, event)
    }

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        self.inner.poll(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_holds_at_most_its_share_and_its_connections_share_it() {
        let budget = InboundBudget::new(8 * BUDGET_UNIT, 3 * BUDGET_UNIT);
        let (a, b) = (PeerId::random(), PeerId::random());
        budget.next_connection_from(a);
        let a1 = budget.for_new_connection();
        budget.next_connection_from(a);
        let a2 = budget.for_new_connection();
        assert!(
            Arc::ptr_eq(&a1, &a2),
            "two connections of a peer, two budgets"
        );
        let held = budget.take(&a1, 2).expect("within the share");
        assert!(
            budget.take(&a2, 2).is_none(),
            "past the share on another connection"
        );
        // Another peer's share is its own, and a refusal took nothing from the shared one.
        budget.next_connection_from(b);
        let b1 = budget.for_new_connection();
        let mut more = budget.take(&b1, 2).expect("b's own share");
        more.merge(budget.take(&b1, 1).expect("the rest of it"));
        let last = budget.take(&a1, 1).expect("a's last unit");
        assert_eq!(budget.shared.available_permits(), 2);
        drop((held, more, last));
        assert_eq!(budget.shared.available_permits(), 8);
        // Once a peer's connections are gone its entry goes, in time.
        drop((a1, a2));
        budget.next_connection_from(a);
        assert_eq!(budget.for_new_connection().available_permits(), 3);
    }

    #[test]
    fn the_shared_budget_bounds_all_peers_together() {
        let budget = InboundBudget::new(4 * BUDGET_UNIT, 3 * BUDGET_UNIT);
        let shares: Vec<_> = (0..2)
            .map(|_| {
                budget.next_connection_from(PeerId::random());
                budget.for_new_connection()
            })
            .collect();
        let _first = budget.take(&shares[0], 3).unwrap();
        assert!(budget.take(&shares[1], 2).is_none());
        assert_eq!(shares[1].available_permits(), 3, "a refusal holds nothing");
        let _second = budget.take(&shares[1], 1).unwrap();
    }
}
