//! Bitswap 1.2.0, IPFS's block exchange, beside our own block protocol (which stays the fast
//! path between daemons): the server answers IPFS nodes' wants from the store, the
//! [`Bitswap`] client fetches blocks that only IPFS nodes hold. Both read the same inbound
//! streams, as a peer's message may carry wants and answers together.

mod client;
mod server;

pub use client::{Bitswap, BitswapError, TIMEOUT};
pub(crate) use server::serve;

use futures::AsyncWriteExt;
use libp2p::{PeerId, Stream, StreamProtocol};
use p2pmr_protocol::bitswap::BITSWAP_PROTOCOL;
use std::time::{Duration, Instant};

/// An outbound stream unused for this long is replaced by a new one rather than written to:
/// Helia aborts an incoming stream that brings nothing for 10 s, and a write racing that
/// abort would be lost.
const REUSE: Duration = Duration::from_secs(4);

/// The stream of ours that messages to one peer go out on (answers from the server, wants
/// from the client): reused while it is busy, renewed when it has been idle or broke.
#[derive(Default)]
pub(crate) struct Outbound(Option<(Stream, Instant)>);

impl Outbound {
    /// Writes one framed message to `peer`.
    pub(crate) async fn send(
        &mut self,
        control: &libp2p_stream::Control,
        peer: PeerId,
        frame: &[u8],
    ) -> std::io::Result<()> {
        if let Some((mut stream, used)) = self.0.take() {
            if used.elapsed() < REUSE && write(&mut stream, frame).await.is_ok() {
                self.0 = Some((stream, Instant::now()));
                return Ok(());
            }
            let _ = stream.close().await;
        }
        let mut stream = control
            .clone()
            .open_stream(peer, StreamProtocol::new(BITSWAP_PROTOCOL))
            .await
            .map_err(std::io::Error::other)?;
        write(&mut stream, frame).await?;
        self.0 = Some((stream, Instant::now()));
        Ok(())
    }

    /// Closes the stream, if one is open.
    pub(crate) async fn close(&mut self) {
        if let Some((mut stream, _)) = self.0.take() {
            let _ = stream.close().await;
        }
    }
}

async fn write(stream: &mut Stream, frame: &[u8]) -> std::io::Result<()> {
    stream.write_all(frame).await?;
    stream.flush().await
}
