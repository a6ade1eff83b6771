//! The job protocol's server side: routes each inbound request to the role it is for (a
//! client's `Submit`, `Watch`, `List` and `Cancel` to the coordinator; a coordinator's `Map`,
//! `Reduce`, `Abort`, `AbortTask`, `Slots` and `Finished` to the worker), each in its own task
//! (a task request is answered when the task has run, a watch when there are events), at most
//! [`MAX_JOB_HANDLERS`] at once; past that the request is answered `busy` at once.

use crate::engine::coordinator::{Coordinator, Requester};
use crate::engine::worker::Worker;
use crate::net::{JobInbound, NetClient};
use crate::tasks::Tasks;
use p2pmr_protocol::engine::{JobRequest, JobResponse};
use std::sync::Arc;
use tokio::sync::{mpsc, Semaphore};

/// Job requests (tasks, watches) handled at once; each may wait for a task or for events.
pub(crate) const MAX_JOB_HANDLERS: usize = 256;

/// Whether `request` is a client's, for the coordinator (else a coordinator's, for the worker).
fn for_coordinator(request: &JobRequest) -> bool {
    matches!(
        request,
        JobRequest::Submit { .. }
            | JobRequest::Watch { .. }
            | JobRequest::List
            | JobRequest::Cancel { .. }
    )
}

/// Answers job-protocol requests until the network stops or the daemon does.
pub(crate) async fn serve(
    coordinator: Coordinator,
    worker: Worker,
    net: NetClient,
    mut inbound: mpsc::Receiver<JobInbound>,
    tasks: Tasks,
) {
    let permits = Arc::new(Semaphore::new(MAX_JOB_HANDLERS));
    let access = worker.access().clone();
    while let Some(JobInbound {
        peer,
        request,
        channel,
    }) = inbound.recv().await
    {
        let is_daemon = peer == net.local_peer_id() || net.is_daemon(&peer);
        if !access.admits(&peer, is_daemon, &request) {
            let refusal = JobResponse::Failed(crate::engine::access::NOT_ALLOWED.into());
            net.respond_job(channel, refusal).await;
            continue;
        }
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            net.respond_job(channel, JobResponse::busy()).await;
            continue;
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
            drop(permit);
        });
    }
}
