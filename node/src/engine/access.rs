//! Who may run jobs on a daemon: anyone who reaches it (the default), or only the peers it was
//! told to allow (`--allow-jobs`), itself and the other daemons of its swarm. Refusals are
//! remembered (the latest few) so a dashboard can show who was turned away.

use libp2p::PeerId;
use p2pmr_protocol::engine::{JobRequest, Refusal};
use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex};

/// Refusals remembered for [`JobAccess::refusals`].
const REMEMBERED: usize = 16;

/// What a peer not allowed to run jobs is told.
pub const NOT_ALLOWED: &str = "not allowed to run jobs on this network";

/// A daemon's job access policy (cheap to clone; the refusal log is shared).
#[derive(Debug, Clone, Default)]
pub struct JobAccess {
    allowed: Option<Arc<HashSet<PeerId>>>,
    refused: Arc<Mutex<VecDeque<Refusal>>>,
}

impl JobAccess {
    /// Anyone who can reach the daemon may run jobs.
    pub fn anyone() -> Self {
        Self::default()
    }

    /// Only `peers` (and the daemon itself and its fellow daemons) may run jobs.
    pub fn only(peers: impl IntoIterator<Item = PeerId>) -> Self {
        Self {
            allowed: Some(Arc::new(peers.into_iter().collect())),
            refused: Arc::default(),
        }
    }

    /// Whether `request` from `peer` may go on; `is_daemon` says whether `peer` is this
    /// daemon or one of its swarm. Starting and stopping jobs is guarded, and so are the
    /// task requests only coordinators (daemons) send, which would otherwise run wasm here
    /// past the list; following and listing jobs is not.
    pub fn admits(&self, peer: &PeerId, is_daemon: bool, request: &JobRequest) -> bool {
        let task = matches!(
            request,
            JobRequest::Map(_)
                | JobRequest::Reduce(_)
                | JobRequest::Abort { .. }
                | JobRequest::AbortTask { .. }
                | JobRequest::SplitTask { .. }
                | JobRequest::Finished { .. }
        );
        let guarded = task
            || matches!(
                request,
                JobRequest::Submit { .. } | JobRequest::Cancel { .. } | JobRequest::Pin { .. }
            );
        let allowed = match &self.allowed {
            None => true,
            Some(_) if task => is_daemon,
            Some(peers) => is_daemon || peers.contains(peer),
        };
        if guarded && !allowed {
            let mut refused = self.refused.lock().expect("poisoned");
            if refused.len() == REMEMBERED {
                refused.pop_front();
            }
            refused.push_back(Refusal {
                peer: peer.to_string(),
                at_ms: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64),
                what: match request {
                    JobRequest::Submit { .. } => "submit".into(),
                    JobRequest::Cancel { .. } => "cancel".into(),
                    _ => "run tasks of".into(),
                },
            });
        }
        !guarded || allowed
    }

    /// The latest refusals, oldest first.
    pub fn refusals(&self) -> Vec<Refusal> {
        self.refused
            .lock()
            .expect("poisoned")
            .iter()
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use p2pmr_protocol::Block;

    #[test]
    fn only_the_allowed_daemons_and_followers_get_through() {
        let (friend, stranger, daemon) = (PeerId::random(), PeerId::random(), PeerId::random());
        let job = *Block::raw(b"job".to_vec()).cid();
        let submit = JobRequest::Submit { spec: vec![1] };
        let cancel = JobRequest::Cancel { job };
        let watch = JobRequest::Watch { job, from: 0 };
        let open = JobAccess::anyone();
        assert!(open.admits(&stranger, false, &submit) && open.admits(&stranger, false, &cancel));
        let closed = JobAccess::only([friend]);
        for (peer, is_daemon, request, want) in [
            (friend, false, &submit, true),
            (friend, false, &cancel, true),
            (daemon, true, &submit, true),
            (stranger, false, &submit, false),
            (stranger, false, &cancel, false),
            (stranger, false, &watch, true),
            (stranger, false, &JobRequest::List, true),
            // Tasks come from coordinators, which are daemons: not even a friend sends them.
            (friend, false, &JobRequest::Abort { job }, false),
            (daemon, true, &JobRequest::Abort { job }, true),
        ] {
            assert_eq!(
                closed.admits(&peer, is_daemon, request),
                want,
                "{peer} {request:?}"
            );
        }
        let refused = closed.refusals();
        assert_eq!(refused.len(), 3);
        assert_eq!(refused[0].peer, stranger.to_string());
        assert_eq!(
            (refused[0].what.as_str(), refused[1].what.as_str()),
            ("submit", "cancel")
        );
        for _ in 0..40 {
            closed.admits(&stranger, false, &submit);
        }
        assert_eq!(closed.refusals().len(), REMEMBERED);
    }
}
