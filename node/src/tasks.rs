//! The lifetime of a daemon's tasks: each is started through [`Tasks`], so stopping the daemon
//! cancels them all and waits until none is left running (mini-redis passes its shutdown in
//! the same way).

use std::future::Future;
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Where a daemon's tasks are started, cancelled and waited for. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub(crate) struct Tasks {
    tracker: TaskTracker,
    cancel: CancellationToken,
}

impl Tasks {
    /// Runs `work` until it ends (its output) or the tasks are stopped (`None`), whichever
    /// comes first.
    pub(crate) fn spawn<T: Send + 'static>(
        &self,
        work: impl Future<Output = T> + Send + 'static,
    ) -> JoinHandle<Option<T>> {
        let cancel = self.cancel.clone();
        self.tracker.spawn(async move {
            tokio::select! {
                _ = cancel.cancelled() => None,
                out = work => Some(out),
            }
        })
    }

    /// Runs `work` to its end (it is not cancelled, but [`stop`](Self::stop) waits for it):
    /// for handlers whose caller is owed an answer.
    pub(crate) fn spawn_to_end<T: Send + 'static>(
        &self,
        work: impl Future<Output = T> + Send + 'static,
    ) -> JoinHandle<T> {
        self.tracker.spawn(work)
    }

    /// Cancels every task and waits up to `within` for all of them to end; says whether they
    /// did.
    pub(crate) async fn stop(&self, within: Duration) -> bool {
        self.cancel.cancel();
        self.tracker.close();
        tokio::time::timeout(within, self.tracker.wait())
            .await
            .is_ok()
    }

    /// Cancels every task without waiting (a crash, for tests).
    pub(crate) fn abort(&self) {
        self.cancel.cancel();
        self.tracker.close();
    }

    /// Tasks still running.
    pub(crate) fn running(&self) -> usize {
        self.tracker.len()
    }
}
