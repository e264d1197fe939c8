//! AppendEntries on a connection of its own per peer.
//!
//! A lone write crosses two AppendEntries hops (to a follower and back), and
//! on gRPC each hop passes through tonic's client buffer task, hyper's
//! connection task on both ends and a task hyper spawns per call. Like
//! etcd's peer streams, a leader's replication task instead writes each
//! request to a TLS connection it owns and reads the answer itself, and the
//! follower serves one connection's requests in order on one task. The
//! payloads and every check are those of the gRPC call
//! ([`crate::service::RaftService`] serves both), so only the framing
//! differs: a request is a 4-byte big-endian length and the JSON of an
//! `AppendEntriesRequest`; an answer is a length, a tag byte, and either the
//! JSON the gRPC call would return (tag 0) or its refusal (tag 1: a 4-byte
//! status code and the message).
//!
//! The node opens and accepts these connections (it finds a peer's support
//! in the TLS handshake, by ALPN); a peer that takes only gRPC, an older
//! node, gets gRPC.

use std::future::Future;

use roost_proto::cluster::RaftPayload;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tonic::{Code, Status};

use crate::consensus::MAX_MESSAGE_BYTES;

const OK: u8 = 0;
const REFUSED: u8 = 1;

/// How long the answer to a request may take to write: a peer that sends
/// but never reads is dropped after it.
const ANSWER_WRITE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// A connection a Raft stream runs on.
pub trait RaftIo: AsyncRead + AsyncWrite + Unpin + Send + Sync + 'static {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send + Sync + 'static> RaftIo for T {}

/// Why a call on a stream failed.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The connection failed or broke: the call may or may not have arrived.
    #[error("the Raft stream broke: {0}")]
    Io(#[from] std::io::Error),
    /// The other end sent something that is not an answer.
    #[error("the Raft stream sent a malformed answer: {0}")]
    Malformed(&'static str),
    /// The other end took the call and refused it, as gRPC would have.
    #[error("{0}")]
    Refused(Status),
}

/// A frame: the length of `parts` together, then `parts`.
fn frame(parts: &[&[u8]]) -> Result<Vec<u8>, StreamError> {
    let len: usize = parts.iter().map(|part| part.len()).sum();
    let len = u32::try_from(len).map_err(|_| StreamError::Malformed("frame too large"))?;
    let mut frame = Vec::with_capacity(4 + len as usize);
    frame.extend_from_slice(&len.to_be_bytes());
    for part in parts {
        frame.extend_from_slice(part);
    }
    Ok(frame)
}

/// Sends one request (`json`, an `AppendEntriesRequest`) and reads its answer.
pub async fn call(io: &mut (impl AsyncRead + AsyncWrite + Unpin), json: &[u8]) -> Result<Vec<u8>, StreamError> {
    io.write_all(&frame(&[json])?).await?;
    io.flush().await?;
    let answer = read_frame(io).await?.ok_or(StreamError::Malformed("closed before answering"))?;
    match answer.split_first() {
        Some((&OK, json)) => Ok(json.to_vec()),
        Some((&REFUSED, rest)) if rest.len() >= 4 => {
            let (code, message) = rest.split_at(4);
            let code = Code::from_i32(i32::from_be_bytes([code[0], code[1], code[2], code[3]]));
            Err(StreamError::Refused(Status::new(code, String::from_utf8_lossy(message))))
        }
        _ => Err(StreamError::Malformed("unknown answer")),
    }
}

/// Reads one frame; `None` if the connection closed cleanly before it.
async fn read_frame(io: &mut (impl AsyncRead + Unpin)) -> Result<Option<Vec<u8>>, StreamError> {
    let mut len = [0u8; 4];
    match io.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_be_bytes(len) as usize;
    // The answer's tag and status code come on top of a message.
    if len > MAX_MESSAGE_BYTES + 8 {
        return Err(StreamError::Malformed("frame larger than a Raft message may be"));
    }
    // Grown as bytes arrive, not reserved on the sender's word.
    let mut frame = Vec::with_capacity(len.min(1 << 16));
    (&mut *io).take(len as u64).read_to_end(&mut frame).await?;
    if frame.len() < len {
        return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
    }
    Ok(Some(frame))
}

/// Serves the requests of one connection in order until it closes or
/// fails. `handle` answers a request's JSON as the gRPC call would.
pub async fn serve<IO, H, F>(mut io: IO, mut handle: H) -> Result<(), StreamError>
where
    IO: AsyncRead + AsyncWrite + Unpin,
    H: FnMut(RaftPayload) -> F,
    F: Future<Output = Result<RaftPayload, Status>>,
{
    while let Some(json) = read_frame(&mut io).await? {
        let answer = match handle(RaftPayload { json }).await {
            Ok(payload) => frame(&[&[OK], &payload.json])?,
            Err(status) => frame(&[&[REFUSED], &(status.code() as i32).to_be_bytes(), status.message().as_bytes()])?,
        };
        let write = async {
            io.write_all(&answer).await?;
            io.flush().await
        };
        match tokio::time::timeout(ANSWER_WRITE_TIMEOUT, write).await {
            Ok(written) => written?,
            Err(_) => return Err(std::io::Error::from(std::io::ErrorKind::TimedOut).into()),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_call_gets_its_answer_or_its_refusal_and_a_frame_too_large_is_refused() {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let served = tokio::spawn(serve(server, |payload: RaftPayload| async move {
            match payload.json.as_slice() {
                b"refuse" => Err(Status::permission_denied("not you")),
                other => Ok(RaftPayload { json: [other, b"!"].concat() }),
            }
        }));
        assert_eq!(call(&mut client, b"hello").await.expect("answered"), b"hello!");
        match call(&mut client, b"refuse").await {
            Err(StreamError::Refused(status)) => {
                assert_eq!(status.code(), Code::PermissionDenied);
                assert_eq!(status.message(), "not you");
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        // Several in a row on one connection, in order.
        for i in 0..3u8 {
            assert_eq!(call(&mut client, &[i]).await.expect("answered"), [i, b'!']);
        }
        drop(client);
        served.await.expect("joined").expect("ended cleanly when the client closed");

        // A length beyond any Raft message ends the connection unread.
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let served = tokio::spawn(serve(server, |payload: RaftPayload| async move { Ok(payload) }));
        let too_large = u32::try_from(MAX_MESSAGE_BYTES + 9).expect("fits");
        client.write_all(&too_large.to_be_bytes()).await.expect("written");
        assert!(matches!(served.await.expect("joined"), Err(StreamError::Malformed(_))));
    }
}
