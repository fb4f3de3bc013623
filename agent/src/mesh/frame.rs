//! Framed, versioned messages on QUIC streams. Every stream opens with one byte, its
//! [`Protocol`], which the router reads to hand the stream to the service that owns it.
//! Then come frames: a 4-byte big-endian length, then a postcard encoding of
//! `{version, body}`. Frames are bounded ([`MAX_FRAME`]) and their bytes are allocated as
//! they arrive, not on the word of the length prefix; a frame that is too large, of another
//! version, or that does not decode is an error for that stream only. An answer too big for
//! one frame is sent as several (see `api`).

use serde::{Deserialize, Serialize, de::DeserializeOwned};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The wire version this agent speaks. 2: host records carry an application's problem.
/// 3: rollouts (bakes, rollbacks, restarts in host records). 4: zones (a planned host's
/// zone in the deployment log). 5: catch-ups (a host command and its confirmation say so).
/// 6: the swarm (a host command names its batch, a host record what it fetches, a host
/// report what the fetch moved, and the chunk requests of the blobs protocol).
pub const VERSION: u16 = 6;
/// The largest frame accepted, in bytes.
pub const MAX_FRAME: u32 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {0} bytes is larger than the limit of {MAX_FRAME}")]
    TooLarge(u32),
    #[error("frame of wire version {0}; this agent speaks version {VERSION}")]
    Version(u16),
    #[error("malformed frame: {0}")]
    Malformed(String),
    #[error("the stream ended")]
    Closed,
    #[error("unknown protocol tag {0}: the peer speaks a protocol this agent does not know")]
    Protocol(u8),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// The service a stream belongs to: the first byte of every stream between agents (and
/// from operators). Unknown tags are refused, so a newer peer's protocol closes only its
/// own stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Protocol {
    /// Host-state gossip (`hoststate`), one message per unidirectional stream.
    Gossip = 1,
    /// Operator requests (`api`), a request and its answer on a bidirectional stream.
    Api = 2,
    /// The replicated deployment log (`fleet::log::network`): openraft RPCs between voters.
    Raft = 3,
    /// Bundles between agents (`blobs`): a fetch and the bundle's bytes.
    Blobs = 4,
    /// Revocation lists, passed from agent to agent (`revocation`).
    Revocations = 5,
    /// Fleet deployments between agents (`fleet::wire`): operators' requests forwarded
    /// to the log's leader, the coordinator's commands to hosts and their results.
    Fleet = 6,
    /// Hook logs between agents (`logs`): a request and the log's chunks.
    Logs = 7,
}

impl Protocol {
    pub fn from_byte(b: u8) -> Option<Protocol> {
        Some(match b {
            1 => Protocol::Gossip,
            2 => Protocol::Api,
            3 => Protocol::Raft,
            4 => Protocol::Blobs,
            5 => Protocol::Revocations,
            6 => Protocol::Fleet,
            7 => Protocol::Logs,
            _ => return None,
        })
    }
}

/// Writes the tag that opens a stream.
pub async fn write_protocol(
    w: &mut (impl AsyncWrite + Unpin),
    protocol: Protocol,
) -> Result<(), FrameError> {
    w.write_all(&[protocol as u8]).await?;
    Ok(())
}

/// Reads the tag that opens a stream.
pub async fn read_protocol(r: &mut (impl AsyncRead + Unpin)) -> Result<Protocol, FrameError> {
    let mut tag = [0u8; 1];
    match r.read_exact(&mut tag).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(FrameError::Closed),
        Err(e) => return Err(e.into()),
    }
    Protocol::from_byte(tag[0]).ok_or(FrameError::Protocol(tag[0]))
}

/// How much of a frame is allocated before its bytes arrive.
const FIRST_ALLOCATION: usize = 16 * 1024;

#[derive(Serialize)]
struct EnvelopeOut<'a, T> {
    version: u16,
    body: &'a T,
}

#[derive(Deserialize)]
struct EnvelopeIn<T> {
    version: u16,
    body: T,
}

/// The bytes of one frame (length prefix included), refused if over [`MAX_FRAME`].
pub fn encode_frame<T: Serialize>(body: &T) -> Result<Vec<u8>, FrameError> {
    let mut bytes = vec![0u8; 4];
    let bytes = postcard::to_extend(
        &EnvelopeOut {
            version: VERSION,
            body,
        },
        std::mem::take(&mut bytes),
    )
    .map_err(|e| FrameError::Malformed(e.to_string()))?;
    let len = u32::try_from(bytes.len() - 4).map_err(|_| FrameError::TooLarge(u32::MAX))?;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    let mut bytes = bytes;
    bytes[..4].copy_from_slice(&len.to_be_bytes());
    Ok(bytes)
}

pub async fn write_frame<T: Serialize>(
    w: &mut (impl AsyncWrite + Unpin),
    body: &T,
) -> Result<(), FrameError> {
    let bytes = encode_frame(body)?;
    w.write_all(&bytes).await?;
    Ok(())
}

pub async fn read_frame<T: DeserializeOwned>(
    r: &mut (impl AsyncRead + Unpin),
) -> Result<T, FrameError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(FrameError::Closed),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_be_bytes(len);
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    // Allocated as the bytes arrive: a length prefix alone reserves at most a little.
    let mut bytes = Vec::with_capacity((len as usize).min(FIRST_ALLOCATION));
    let read = r.take(u64::from(len)).read_to_end(&mut bytes).await?;
    if read != len as usize {
        return Err(FrameError::Io(std::io::ErrorKind::UnexpectedEof.into()));
    }
    // The version is the envelope's first field: check it before decoding the body.
    let (version, _) = postcard::take_from_bytes::<u16>(&bytes)
        .map_err(|e| FrameError::Malformed(e.to_string()))?;
    if version != VERSION {
        return Err(FrameError::Version(version));
    }
    let envelope: EnvelopeIn<T> =
        postcard::from_bytes(&bytes).map_err(|e| FrameError::Malformed(e.to_string()))?;
    debug_assert_eq!(envelope.version, VERSION);
    Ok(envelope.body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    enum Msg {
        Ping { from: String },
        Pong(u64),
    }

    #[tokio::test]
    async fn frames_round_trip() {
        let (mut a, mut b) = tokio::io::duplex(4096);
        write_frame(&mut a, &Msg::Ping { from: "x".into() })
            .await
            .unwrap();
        write_frame(&mut a, &Msg::Pong(7)).await.unwrap();
        assert_eq!(
            read_frame::<Msg>(&mut b).await.unwrap(),
            Msg::Ping { from: "x".into() }
        );
        assert_eq!(read_frame::<Msg>(&mut b).await.unwrap(), Msg::Pong(7));
        drop(a);
        assert!(matches!(
            read_frame::<Msg>(&mut b).await,
            Err(FrameError::Closed)
        ));
    }

    #[tokio::test]
    async fn bad_frames_are_errors_not_panics() {
        let (mut a, mut b) = tokio::io::duplex(4096);
        a.write_all(&(MAX_FRAME + 1).to_be_bytes()).await.unwrap();
        assert!(matches!(
            read_frame::<Msg>(&mut b).await,
            Err(FrameError::TooLarge(_))
        ));

        let (mut a, mut b) = tokio::io::duplex(4096);
        a.write_all(&[0, 0, 0, 3, 9, 0xff, 0xff]).await.unwrap();
        assert!(matches!(
            read_frame::<Msg>(&mut b).await,
            Err(FrameError::Version(9))
        ));

        let (mut a, mut b) = tokio::io::duplex(4096);
        a.write_all(&[0, 0, 0, 4, VERSION as u8, 0x7f, 0xff, 0xff])
            .await
            .unwrap();
        let err = read_frame::<Msg>(&mut b).await.unwrap_err();
        assert!(matches!(err, FrameError::Malformed(_)), "{err}");

        let (mut a, mut b) = tokio::io::duplex(4096);
        a.write_all(&[0, 0, 0, 10, VERSION as u8]).await.unwrap();
        drop(a);
        assert!(
            read_frame::<Msg>(&mut b).await.is_err(),
            "a truncated frame"
        );
    }

    #[tokio::test]
    async fn a_length_prefix_alone_reserves_little() {
        // A peer announces a 1 MiB frame and sends 3 bytes: the reader holds the stream
        // open without having allocated the megabyte (it reads into a growing buffer).
        let (mut a, mut b) = tokio::io::duplex(4096);
        a.write_all(&MAX_FRAME.to_be_bytes()).await.unwrap();
        a.write_all(&[1, 0, 0]).await.unwrap();
        drop(a);
        let err = read_frame::<Msg>(&mut b).await.unwrap_err();
        assert!(matches!(err, FrameError::Io(_)), "{err}");
    }

    #[tokio::test]
    async fn streams_open_with_their_protocol() {
        let (mut a, mut b) = tokio::io::duplex(64);
        write_protocol(&mut a, Protocol::Gossip).await.unwrap();
        a.write_all(&[9]).await.unwrap();
        assert_eq!(read_protocol(&mut b).await.unwrap(), Protocol::Gossip);
        assert!(matches!(
            read_protocol(&mut b).await,
            Err(FrameError::Protocol(9))
        ));
        let frame = encode_frame(&Msg::Pong(3)).unwrap();
        assert_eq!(
            u32::from_be_bytes(frame[..4].try_into().unwrap()) as usize,
            frame.len() - 4
        );
    }
}
