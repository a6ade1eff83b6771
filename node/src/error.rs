//! The one error type of the [`Node`](crate::Node) API: each layer keeps its own typed error,
//! and this wraps them so a caller of "add a file, then run a job" handles one type.

use crate::blocks::RemoteError;
use crate::daemon::DaemonError;
use crate::engine::client::ClientError;
use crate::engine::runtime::JobError;
use crate::net::NetError;
use crate::repo::files::FileError;
use crate::repo::store::StoreError;
use p2pmr_protocol::job::JobSpecError;
use p2pmr_protocol::Cid;
use thiserror::Error;

/// Errors of the [`Node`](crate::Node) API.
#[derive(Debug, Error)]
pub enum Error {
    /// The local block store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Reading or writing a file failed.
    #[error(transparent)]
    File(#[from] FileError),
    /// Moving blocks over the network failed.
    #[error(transparent)]
    Blocks(#[from] RemoteError),
    /// A job request failed.
    #[error(transparent)]
    Jobs(#[from] ClientError),
    /// The network failed.
    #[error(transparent)]
    Net(#[from] NetError),
    /// A wasm module could not be loaded or run.
    #[error(transparent)]
    Runtime(#[from] JobError),
    /// A job spec is not valid.
    #[error(transparent)]
    Spec(#[from] JobSpecError),
    /// Starting or stopping a daemon failed.
    #[error(transparent)]
    Daemon(#[from] DaemonError),
    /// A CAR file is malformed or holds a corrupt block.
    #[error(transparent)]
    Car(#[from] p2pmr_protocol::car::CarError),
    /// A block of a CAR's DAG is not in the CAR.
    #[error("the CAR lacks block {cid} of the DAG under {root}; nothing was imported")]
    MissingBlock {
        /// The missing block.
        cid: Cid,
        /// The root it is under.
        root: Cid,
    },
    /// A DAG entry cannot be written out as asked (a name that is not safe on disk, a size
    /// that does not match).
    #[error("cannot write out {cid}: {what}")]
    Unwritable {
        /// The block.
        cid: Cid,
        /// Why.
        what: String,
    },
    /// The job ended in failure.
    #[error("job {job} failed: {reason}")]
    JobFailed {
        /// The job id.
        job: Cid,
        /// Why, naming the task, peer and record.
        reason: String,
    },
    /// The job was cancelled.
    #[error("job {job} was cancelled")]
    JobCancelled {
        /// The job id.
        job: Cid,
    },
    /// The operation needs a repository and this node has none.
    #[error("this needs a repository (pass --home or set $P2PMR_HOME)")]
    NoRepo,
    /// Something did not happen in time.
    #[error("{0} did not happen in time")]
    TimedOut(&'static str),
    /// Creating a temporary repository failed.
    #[error("cannot create a temporary directory")]
    TempDir(#[source] std::io::Error),
    /// A module to publish is not WebAssembly.
    #[error("not a WebAssembly module (it does not start with \\0asm)")]
    NotWasm,
    /// The operation needs the network and this node is offline.
    #[error("this needs the network and the node was built offline")]
    Offline,
}

/// Shows an error with its causes, `outer: inner: ...`, where only one line is written (an
/// HTTP answer, a log line): each error's own message says what failed, and its source why.
pub(crate) struct Chain<'a>(pub(crate) &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(cause) = source {
            write!(f, ": {cause}")?;
            source = cause.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_os_error_is_named_once() {
        let e = Error::TempDir(std::io::Error::from_raw_os_error(28));
        let shown = Chain(&e).to_string();
        assert!(
            shown.starts_with("cannot create a temporary directory: "),
            "{shown}"
        );
        assert_eq!(shown.matches("os error 28").count(), 1, "{shown}");
    }
}
