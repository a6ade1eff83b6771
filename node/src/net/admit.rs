//! Admission of daemons: a peer whose identify lists the block protocol is counted as a daemon
//! only once it has kept a few random bytes it was given and proved it holds them, answering
//! `SHA-256(nonce || bytes)` for a fresh nonce. Listing a protocol costs nothing; this costs a
//! working store-and-prove path, and a peer that answers wrongly is banned.

use super::{Command, NetError};
use libp2p::PeerId;
use p2pmr_protocol::wire::{probe_cid, proof, BlockRequest, BlockResponse};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// Peers being admitted at once; others listing the block protocol wait for their next
/// identify.
pub(super) const MAX_ADMITTING: usize = 64;
/// How long an admission may take in all (its requests retry while the peer is busy).
pub const ADMISSION_TIMEOUT: Duration = Duration::from_secs(20);
/// Random bytes in a probe.
const PROBE_BYTES: usize = 32;
/// Tries while the peer answers `busy`.
const TRIES: u32 = 4;

/// How an admission ended.
#[derive(Debug)]
pub(super) enum Outcome {
    /// It kept the probe and proved it: a daemon.
    Admitted,
    /// It answered, wrongly: it does not keep what it says it keeps.
    Failed(String),
    /// It did not answer in time (or was busy throughout); it may be tried again later.
    NoAnswer(String),
}

/// Challenges `peer` over the event loop's own command queue (held weakly, so the loop still
/// stops when every outside handle is gone).
pub(super) async fn admit(commands: mpsc::WeakSender<Command>, peer: PeerId) -> Outcome {
    let attempt = async {
        let mut pause = Duration::from_millis(100);
        for _ in 0..TRIES {
            match challenge(&commands, peer).await {
                Err(Busy) => {
                    tokio::time::sleep(pause).await;
                    pause *= 2;
                }
                Ok(outcome) => return outcome,
            }
        }
        Outcome::NoAnswer("busy at every try".into())
    };
    tokio::time::timeout(ADMISSION_TIMEOUT, attempt)
        .await
        .unwrap_or_else(|_| Outcome::NoAnswer("no answer in time".into()))
}

struct Busy;

async fn challenge(commands: &mpsc::WeakSender<Command>, peer: PeerId) -> Result<Outcome, Busy> {
    let data = random_bytes::<PROBE_BYTES>().to_vec();
    let cid = probe_cid(&data);
    match request(commands, peer, BlockRequest::Probe(data.clone())).await {
        Ok(BlockResponse::Stored) => {}
        Ok(r) if r.is_busy() => return Err(Busy),
        Ok(other) => return Ok(Outcome::Failed(format!("answered a probe with {other:?}"))),
        Err(e) => return Ok(Outcome::NoAnswer(e.to_string())),
    }
    let nonce = random_bytes::<32>();
    match request(commands, peer, BlockRequest::Prove { cid, nonce }).await {
        Ok(BlockResponse::Proof(p)) if p == proof(&nonce, &data) => Ok(Outcome::Admitted),
        Ok(BlockResponse::Proof(_)) => Ok(Outcome::Failed("a wrong proof".into())),
        Ok(r) if r.is_busy() => Err(Busy),
        Ok(BlockResponse::NotFound) => Ok(Outcome::Failed(
            "it said it kept a probe, then did not have it".into(),
        )),
        Ok(other) => Ok(Outcome::Failed(format!(
            "answered a proof request with {other:?}"
        ))),
        Err(e) => Ok(Outcome::NoAnswer(e.to_string())),
    }
}

async fn request(
    commands: &mpsc::WeakSender<Command>,
    peer: PeerId,
    request: BlockRequest,
) -> Result<BlockResponse, NetError> {
    let commands = commands.upgrade().ok_or(NetError::Stopped)?;
    let (reply, rx) = oneshot::channel();
    commands
        .send(Command::Request {
            peer,
            request,
            reply,
        })
        .await
        .map_err(|_| NetError::Stopped)?;
    drop(commands);
    rx.await.map_err(|_| NetError::Stopped)?
}

/// Random bytes from the operating system (the clock's nanoseconds, spread, if it has none):
/// the peer's one source, for probes, nonces, add sessions and random picks.
pub(crate) fn random_bytes<const N: usize>() -> [u8; N] {
    let mut bytes = [0; N];
    if getrandom::fill(&mut bytes).is_err() {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
        let seed = now.map_or(0, |d| d.as_nanos());
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = (seed >> ((i % 16) * 8)) as u8 ^ i as u8;
        }
    }
    bytes
}
