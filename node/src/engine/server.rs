//! The job protocol's server side: routes each inbound request to the role it is for (a
//! client's `Submit`, `Watch`, `List` and `Cancel` to the coordinator; a coordinator's `Map`,
//! `Reduce`, `Abort`, `AbortTask`, `Slots` and `Finished` to the worker), each in its own task
//! (a task request is answered when the task has run, a watch when there are events), at most
//! [`MAX_JOB_HANDLERS`] at once; past that the request is answered `busy` at once. Watches
//! from clients, which wait for events, have handlers of their own ([`MAX_CLIENT_WATCHES`],
//! [`MAX_WATCHES_PER_PEER`] per peer), so a flood of them cannot take the handlers that
//! coordinators' tasks and other clients' submissions need.

use crate::engine::coordinator::{Coordinator, Requester};
use crate::engine::worker::Worker;
use crate::net::{JobInbound, NetClient};
use crate::tasks::Tasks;
use libp2p::PeerId;
use p2pmr_protocol::engine::{JobRequest, JobResponse};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

/// Job requests (tasks, watches) handled at once; each may wait for a task or for events.
pub(crate) const MAX_JOB_HANDLERS: usize = 256;
/// Watches from client peers (not daemons) open at once, in all.
pub(crate) const MAX_CLIENT_WATCHES: usize = 128;
/// Watches one client peer may have open at once (a `p2pmr run` or `watch` has one).
pub(crate) const MAX_WATCHES_PER_PEER: usize = 8;

/// Client watches open now, per peer; an entry goes when its last watch ends.
#[derive(Debug, Default, Clone)]
struct Watching(Arc<Mutex<HashMap<PeerId, usize>>>);

/// One open watch of a peer, counted until dropped.
struct WatchSlot {
    watching: Watching,
    peer: PeerId,
    _permit: OwnedSemaphorePermit,
}

impl Watching {
    /// A slot for one more watch of `peer`, unless it has its share open already.
    fn open(&self, peer: PeerId, permit: OwnedSemaphorePermit) -> Option<WatchSlot> {
        let mut open = self.0.lock().expect("poisoned");
        let n = open.entry(peer).or_default();
        if *n >= MAX_WATCHES_PER_PEER {
            return None;
        }
        *n += 1;
        Some(WatchSlot {
            watching: self.clone(),
            peer,
            _permit: permit,
        })
    }
}

impl Drop for WatchSlot {
    fn drop(&mut self) {
        let mut open = self.watching.0.lock().expect("poisoned");
        if let Some(n) = open.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.peer);
            }
        }
    }
}

/// Whether `request` is a client's, for the coordinator (else a coordinator's, for the worker).
fn for_coordinator(request: &JobRequest) -> bool {
    matches!(
        request,
        JobRequest::Submit { .. }
            | JobRequest::Watch { .. }
            | JobRequest::List
            | JobRequest::Cancel { .. }
            | JobRequest::Pin { .. }
    )
}

/// Requests waiting for their peer's admission to end that are queued to be handled.
const MAX_SETTLING: usize = 64;

/// Answers job-protocol requests until the network stops or the daemon does.
pub(crate) async fn serve(
    coordinator: Coordinator,
    worker: Worker,
    net: NetClient,
    mut inbound: mpsc::Receiver<JobInbound>,
    tasks: Tasks,
) {
    let permits = Arc::new(Semaphore::new(MAX_JOB_HANDLERS));
    let watch_permits = Arc::new(Semaphore::new(MAX_CLIENT_WATCHES));
    let watching = Watching::default();
    let access = worker.access().clone();
    // Requests from peers still being admitted as daemons come back here once they are.
    let (settled_tx, mut settled) = mpsc::channel::<(JobInbound, bool)>(MAX_SETTLING);
    loop {
        let (next, known) = tokio::select! {
            next = inbound.recv() => match next {
                Some(next) => (next, None),
                None => break,
            },
            Some((next, is_daemon)) = settled.recv() => (next, Some(is_daemon)),
        };
        let peer = next.peer;
        let is_daemon = match known {
            Some(is_daemon) => is_daemon,
            None if peer == net.local_peer_id() || net.is_daemon(&peer) => true,
            None if net.is_being_admitted(&peer) => {
                let (net, settled_tx) = (net.clone(), settled_tx.clone());
                tasks.spawn(async move {
                    let is_daemon = net.is_daemon_admitted(&peer).await;
                    if let Err(e) = settled_tx.try_send((next, is_daemon)) {
                        let (next, _) = e.into_inner();
                        net.respond_job(next.channel, JobResponse::busy()).await;
                    }
                });
                continue;
            }
            None => false,
        };
        let JobInbound {
            peer,
            request,
            channel,
        } = next;
        if !access.admits(&peer, is_daemon, &request) {
            let refusal = JobResponse::Failed(crate::engine::access::NOT_ALLOWED.into());
            net.respond_job(channel, refusal).await;
            continue;
        }
        let client_watch = !is_daemon && matches!(request, JobRequest::Watch { .. });
        let pool = if client_watch {
            &watch_permits
        } else {
            &permits
        };
        let Ok(permit) = pool.clone().try_acquire_owned() else {
            net.respond_job(channel, JobResponse::busy()).await;
            continue;
        };
        // Held while the request is handled: a general handler, or a client's watch slot.
        let held = if client_watch {
            let Some(slot) = watching.open(peer, permit) else {
                let refusal = format!(
                    "too many watches at once from this peer (at most {MAX_WATCHES_PER_PEER})"
                );
                net.respond_job(channel, JobResponse::Failed(refusal)).await;
                continue;
            };
            (None, Some(slot))
        } else {
            (Some(permit), None)
        };
        let (coordinator, worker, net) = (coordinator.clone(), worker.clone(), net.clone());
        // Cancelled when the daemon stops: a task or a watch may wait long for its answer.
        tasks.spawn(async move {
            let response = if for_coordinator(&request) {
                coordinator
                    .handle(Requester { peer, is_daemon }, request)
                    .await
            } else {
                worker.handle(request).await
            };
            net.respond_job(channel, response).await;
            drop(held);
        });
    }
}
