//! The request-response codec shared by the chunk, control and membership protocols: one
//! [`Frame`] per message (see `mesh_proto::wire`), checked against the protocol's limits
//! before anything past the length prefixes is read. Payloads are read into buffers of
//! [`super::bufpool`], which return there when the last reference to them is dropped.

use std::io;
use std::marker::PhantomData;

use bytes::Bytes;
use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::StreamProtocol;
use mesh_proto::wire::{self, FRAME_PREFIX_LEN, Limits};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// One message: a small typed header and raw payload bytes (a chunk, a manifest, or nothing).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame<H> {
    pub header: H,
    pub payload: Bytes,
}

impl<H> Frame<H> {
    pub fn new(header: H) -> Self {
        Self {
            header,
            payload: Bytes::new(),
        }
    }

    pub fn with_payload(header: H, payload: Bytes) -> Self {
        Self { header, payload }
    }
}

/// Codec for requests `Req` and responses `Resp` under the given limits.
pub struct FrameCodec<Req, Resp> {
    limits: Limits,
    _types: PhantomData<fn() -> (Req, Resp)>,
}

impl<Req, Resp> FrameCodec<Req, Resp> {
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            _types: PhantomData,
        }
    }
}

impl<Req, Resp> Clone for FrameCodec<Req, Resp> {
    fn clone(&self) -> Self {
        Self::new(self.limits)
    }
}

impl<Req, Resp> std::fmt::Debug for FrameCodec<Req, Resp> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameCodec")
            .field("limits", &self.limits)
            .finish()
    }
}

fn invalid(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

async fn read_frame<T, H>(io: &mut T, limits: Limits) -> io::Result<Frame<H>>
where
    T: AsyncRead + Unpin + Send,
    H: DeserializeOwned,
{
    let mut prefix = [0u8; FRAME_PREFIX_LEN];
    io.read_exact(&mut prefix).await?;
    let header_len = wire::check_prefix(&prefix, limits).map_err(invalid)?;
    let mut header = vec![0u8; header_len];
    io.read_exact(&mut header).await?;
    let mut len = [0u8; 4];
    io.read_exact(&mut len).await?;
    let payload_len = wire::check_payload_len(u32::from_be_bytes(len), limits).map_err(invalid)?;
    let mut payload = super::bufpool::POOL.take(payload_len);
    io.read_exact(payload.as_mut_slice()).await?;
    let header = wire::decode_header(&header).map_err(invalid)?;
    Ok(Frame {
        header,
        payload: payload.freeze(),
    })
}

async fn write_frame<T, H>(io: &mut T, frame: Frame<H>, limits: Limits) -> io::Result<()>
where
    T: AsyncWrite + Unpin + Send,
    H: Serialize,
{
    let header = wire::encode_header(&frame.header);
    if header.len() > limits.header || frame.payload.len() > limits.payload {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "message of {} + {} bytes exceeds the protocol's limits",
                header.len(),
                frame.payload.len()
            ),
        ));
    }
    let mut head = Vec::with_capacity(FRAME_PREFIX_LEN + header.len() + 4);
    head.push(wire::WIRE_VERSION);
    head.extend_from_slice(&(header.len() as u32).to_be_bytes());
    head.extend_from_slice(&header);
    head.extend_from_slice(&(frame.payload.len() as u32).to_be_bytes());
    io.write_all(&head).await?;
    io.write_all(&frame.payload).await?;
    io.flush().await
}

impl<Req, Resp> libp2p::request_response::Codec for FrameCodec<Req, Resp>
where
    Req: Serialize + DeserializeOwned + Send + 'static,
    Resp: Serialize + DeserializeOwned + Send + 'static,
{
    type Protocol = StreamProtocol;
    type Request = Frame<Req>;
    type Response = Frame<Resp>;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Frame<Req>>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_frame(io, self.limits).await
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Frame<Resp>>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_frame(io, self.limits).await
    }

    async fn write_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: Frame<Req>,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_frame(io, req, self.limits).await
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        res: Frame<Resp>,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_frame(io, res, self.limits).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use libp2p::request_response::Codec;
    use mesh_proto::ChunkId;
    use mesh_proto::wire::{ChunkRequest, ChunkResponse};

    type ChunkCodec = FrameCodec<ChunkRequest, ChunkResponse>;

    fn protocol() -> StreamProtocol {
        StreamProtocol::new(wire::CHUNK_PROTOCOL)
    }

    #[tokio::test]
    async fn a_frame_round_trips_through_a_stream() {
        let mut codec = ChunkCodec::new(Limits::CHUNK);
        let frame = Frame::with_payload(
            ChunkRequest::Store {
                id: ChunkId::of(b"abc"),
            },
            Bytes::from_static(b"abc"),
        );
        let mut buf = futures::io::Cursor::new(Vec::new());
        codec
            .write_request(&protocol(), &mut buf, frame.clone())
            .await
            .unwrap();
        let mut reader = futures::io::Cursor::new(buf.into_inner());
        let back = codec.read_request(&protocol(), &mut reader).await.unwrap();
        assert_eq!(back, frame);
    }

    #[tokio::test]
    async fn oversized_and_truncated_frames_are_errors_not_panics() {
        let mut codec = ChunkCodec::new(Limits::CHUNK);
        let mut huge = vec![wire::WIRE_VERSION];
        huge.extend_from_slice(&u32::MAX.to_be_bytes());
        let err = codec
            .read_request(&protocol(), &mut futures::io::Cursor::new(huge))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        let frame = wire::encode_frame(
            &ChunkRequest::Fetch {
                id: ChunkId::of(b"x"),
            },
            b"",
        );
        for cut in 0..frame.len() {
            let mut reader = futures::io::Cursor::new(frame[..cut].to_vec());
            assert!(codec.read_request(&protocol(), &mut reader).await.is_err());
        }
        let too_big = Frame::with_payload(
            ChunkResponse::Data,
            Bytes::from(vec![0u8; Limits::CHUNK.payload + 1]),
        );
        let mut sink = futures::io::Cursor::new(Vec::new());
        assert!(
            codec
                .write_response(&protocol(), &mut sink, too_big)
                .await
                .is_err()
        );
    }
}
