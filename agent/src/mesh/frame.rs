//! Framed, versioned messages on QUIC streams: a 4-byte big-endian length, then a postcard
//! encoding of `{version, body}`. Frames are bounded ([`MAX_FRAME`]); a frame that is too
//! large, of another version, or that does not decode is an error for that stream only.

use serde::{Deserialize, Serialize, de::DeserializeOwned};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The wire version this agent speaks.
pub const VERSION: u16 = 1;
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
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

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

pub async fn write_frame<T: Serialize>(
    w: &mut (impl AsyncWrite + Unpin),
    body: &T,
) -> Result<(), FrameError> {
    let bytes = postcard::to_stdvec(&EnvelopeOut {
        version: VERSION,
        body,
    })
    .map_err(|e| FrameError::Malformed(e.to_string()))?;
    let len = u32::try_from(bytes.len()).map_err(|_| FrameError::TooLarge(u32::MAX))?;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    w.write_all(&len.to_be_bytes()).await?;
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
    let mut bytes = vec![0u8; len as usize];
    r.read_exact(&mut bytes).await?;
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
        a.write_all(&[0, 0, 0, 4, 1, 0x7f, 0xff, 0xff])
            .await
            .unwrap();
        let err = read_frame::<Msg>(&mut b).await.unwrap_err();
        assert!(matches!(err, FrameError::Malformed(_)), "{err}");

        let (mut a, mut b) = tokio::io::duplex(4096);
        a.write_all(&[0, 0, 0, 10, 1]).await.unwrap();
        drop(a);
        assert!(
            read_frame::<Msg>(&mut b).await.is_err(),
            "a truncated frame"
        );
    }
}
