//! Framing: `u32 length | u32 header length | JSON header | payload`, all big-endian.
//!
//! The outer length prefix is handled by tokio-util's `LengthDelimitedCodec`, which refuses
//! a frame longer than the maximum before buffering it, so a hostile peer cannot make us
//! allocate. The header is kept as raw JSON bytes and decoded by the caller into the message
//! type of its side; the payload (file data) is carried as-is, never base64.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures_sink::Sink;
use serde::{de::DeserializeOwned, Serialize};
use tokio::io::{AsyncRead, AsyncWrite, ReadHalf, WriteHalf};
use tokio_util::codec::{Decoder, Encoder, Framed, FramedParts, LengthDelimitedCodec};

use crate::MAX_HEADER;

/// One decoded frame: a JSON header and an optional binary payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub header: Bytes,
    pub payload: Bytes,
}

impl Frame {
    /// Builds a frame from a message and a payload.
    pub fn new<T: Serialize>(msg: &T, payload: Bytes) -> Result<Frame, FrameError> {
        let header = serde_json::to_vec(msg).map_err(FrameError::Encode)?;
        Ok(Frame {
            header: Bytes::from(header),
            payload,
        })
    }

    /// Parses the header as a message of type `T`.
    pub fn message<T: DeserializeOwned>(&self) -> Result<T, FrameError> {
        serde_json::from_slice(&self.header).map_err(FrameError::Decode)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {len} bytes exceeds the maximum of {max}")]
    TooLarge { len: usize, max: usize },
    #[error("malformed frame: {0}")]
    Malformed(&'static str),
    #[error("malformed message: {0}")]
    Decode(serde_json::Error),
    #[error("cannot encode message: {0}")]
    Encode(serde_json::Error),
    #[error("connection closed in the middle of a frame")]
    TruncatedFrame,
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Codec for [`Frame`]s with a maximum frame size.
#[derive(Debug)]
pub struct FrameCodec {
    inner: LengthDelimitedCodec,
    max_frame: usize,
}

impl FrameCodec {
    pub fn new(max_frame: u32) -> FrameCodec {
        let max_frame = max_frame as usize;
        let inner = LengthDelimitedCodec::builder()
            .length_field_length(4)
            .max_frame_length(max_frame)
            .new_codec();
        FrameCodec { inner, max_frame }
    }

    pub fn max_frame(&self) -> usize {
        self.max_frame
    }

    /// Changes the maximum, for after the handshake negotiated one.
    pub fn set_max_frame(&mut self, max_frame: u32) {
        self.max_frame = max_frame as usize;
        self.inner.set_max_frame_length(self.max_frame);
    }
}

fn split_frame(mut body: BytesMut) -> Result<Frame, FrameError> {
    if body.len() < 4 {
        return Err(FrameError::Malformed(
            "frame shorter than its header length",
        ));
    }
    let header_len = body.get_u32() as usize;
    if header_len > MAX_HEADER as usize {
        return Err(FrameError::Malformed("header too large"));
    }
    if header_len > body.len() {
        return Err(FrameError::Malformed("header length beyond the frame"));
    }
    let header = body.split_to(header_len).freeze();
    Ok(Frame {
        header,
        payload: body.freeze(),
    })
}

impl Decoder for FrameCodec {
    type Item = Frame;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        // Check the prefix ourselves so the error names the sizes.
        if src.len() >= 4 {
            let len = u32::from_be_bytes([src[0], src[1], src[2], src[3]]) as usize;
            if len > self.max_frame {
                return Err(FrameError::TooLarge {
                    len,
                    max: self.max_frame,
                });
            }
        }
        match self.inner.decode(src) {
            Ok(Some(body)) => split_frame(body).map(Some),
            Ok(None) => Ok(None),
            Err(e) => Err(FrameError::Io(e)),
        }
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        match self.decode(src)? {
            Some(frame) => Ok(Some(frame)),
            None if src.is_empty() => Ok(None),
            None => Err(FrameError::TruncatedFrame),
        }
    }
}

impl Encoder<Frame> for FrameCodec {
    type Error = FrameError;

    fn encode(&mut self, frame: Frame, dst: &mut BytesMut) -> Result<(), FrameError> {
        let len = check_lengths(&frame, self.max_frame)?;
        dst.reserve(4 + len);
        dst.put_u32(len as u32);
        dst.put_u32(frame.header.len() as u32);
        dst.extend_from_slice(&frame.header);
        dst.extend_from_slice(&frame.payload);
        Ok(())
    }
}

/// Payloads at least this large are written from their own buffer instead of being copied
/// into the frame's.
const WRITE_DIRECT: usize = 16 * 1024;
/// Bytes gathered before a sender has to wait for them to be written.
const WRITE_GATHER: usize = 64 * 1024;

/// The sending half of a framed connection.
///
/// Like the sink of a `Framed`, but a large payload (file data) is written to the transport
/// from its own buffer instead of first being copied behind its header, which for a TLS
/// transport saves one pass over every byte sent. Small frames are still gathered, so a
/// burst of replies shares one write. A frame, once accepted, is written whole even if the
/// sender goes away in the middle of flushing: what is left is written by the next flush.
#[derive(Debug)]
pub struct FrameSink<W> {
    io: W,
    max_frame: usize,
    /// Headers and small frames being gathered.
    gather: BytesMut,
    /// What is ready to be written, in order (a few pieces at most).
    queue: VecDeque<Bytes>,
    /// Bytes handed to the transport so far, for a watchdog of a peer that stops reading.
    written: Arc<AtomicU64>,
}

/// Splits a framed connection into a frame stream and a [`FrameSink`], keeping whatever the
/// stream had already read.
pub fn split<S>(
    framed: Framed<S, FrameCodec>,
) -> (FrameSink<WriteHalf<S>>, Framed<ReadHalf<S>, FrameCodec>)
where
    S: AsyncRead + AsyncWrite,
{
    let parts = framed.into_parts();
    let max_frame = parts.codec.max_frame();
    let (read, write) = tokio::io::split(parts.io);
    let mut source = FramedParts::new::<Frame>(read, parts.codec);
    source.read_buf = parts.read_buf;
    let sink = FrameSink {
        io: write,
        max_frame,
        gather: BytesMut::new(),
        queue: VecDeque::from([parts.write_buf.freeze()]),
        written: Arc::default(),
    };
    (sink, Framed::from_parts(source))
}

impl<W: AsyncWrite + Unpin> FrameSink<W> {
    /// A counter of the bytes written to the transport, readable while the sink is busy.
    pub fn progress(&self) -> Arc<AtomicU64> {
        self.written.clone()
    }

    fn pending(&self) -> usize {
        self.queue.iter().map(Bytes::len).sum::<usize>() + self.gather.len()
    }

    /// Writes everything queued and gathered; progress is kept in `self`, so a flush that
    /// is abandoned leaves a consistent stream for the next one.
    fn poll_write_out(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), FrameError>> {
        loop {
            if self.queue.is_empty() && !self.gather.is_empty() {
                self.queue.push_back(self.gather.split().freeze());
            }
            let Some(front) = self.queue.front_mut() else {
                return Poll::Ready(Ok(()));
            };
            if front.is_empty() {
                self.queue.pop_front();
                continue;
            }
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, front))?;
            if n == 0 {
                return Poll::Ready(Err(FrameError::Io(std::io::ErrorKind::WriteZero.into())));
            }
            front.advance(n);
            self.written.fetch_add(n as u64, Ordering::Relaxed);
        }
    }
}

impl<W: AsyncWrite + Unpin> Sink<Frame> for FrameSink<W> {
    type Error = FrameError;

    fn poll_ready(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), FrameError>> {
        if self.pending() >= WRITE_GATHER {
            ready!(self.poll_write_out(cx))?;
        }
        Poll::Ready(Ok(()))
    }

    fn start_send(mut self: Pin<&mut Self>, frame: Frame) -> Result<(), FrameError> {
        let len = check_lengths(&frame, self.max_frame)?;
        let this = &mut *self;
        this.gather.reserve(8 + frame.header.len());
        this.gather.put_u32(len as u32);
        this.gather.put_u32(frame.header.len() as u32);
        this.gather.extend_from_slice(&frame.header);
        if frame.payload.len() < WRITE_DIRECT {
            this.gather.extend_from_slice(&frame.payload);
        } else {
            this.queue.push_back(this.gather.split().freeze());
            this.queue.push_back(frame.payload);
        }
        Ok(())
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), FrameError>> {
        ready!(self.poll_write_out(cx))?;
        Pin::new(&mut self.io)
            .poll_flush(cx)
            .map_err(FrameError::Io)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), FrameError>> {
        ready!(self.as_mut().poll_flush(cx))?;
        Pin::new(&mut self.io)
            .poll_shutdown(cx)
            .map_err(FrameError::Io)
    }
}

/// The frame's length after its length prefix, if the frame may be sent.
fn check_lengths(frame: &Frame, max_frame: usize) -> Result<usize, FrameError> {
    if frame.header.len() > MAX_HEADER as usize {
        return Err(FrameError::Malformed("header too large"));
    }
    let len = 4 + frame.header.len() + frame.payload.len();
    if len > max_frame {
        return Err(FrameError::TooLarge {
            len,
            max: max_frame,
        });
    }
    Ok(len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn encode(frames: &[Frame], max: u32) -> BytesMut {
        let mut codec = FrameCodec::new(max);
        let mut buf = BytesMut::new();
        for f in frames {
            codec.encode(f.clone(), &mut buf).unwrap();
        }
        buf
    }

    fn frame(h: &[u8], p: &[u8]) -> Frame {
        Frame {
            header: Bytes::copy_from_slice(h),
            payload: Bytes::copy_from_slice(p),
        }
    }

    #[test]
    fn round_trip() {
        let frames = vec![frame(b"{}", b""), frame(b"{\"a\":1}", &[0u8, 1, 2, 255])];
        let mut buf = encode(&frames, 1024);
        let mut codec = FrameCodec::new(1024);
        let mut out = Vec::new();
        while let Some(f) = codec.decode_eof(&mut buf).unwrap() {
            out.push(f);
        }
        assert_eq!(out, frames);
    }

    #[test]
    fn oversized_prefix_is_refused_before_buffering() {
        let mut codec = FrameCodec::new(1024);
        let mut buf = BytesMut::from(&[0x7f, 0xff, 0xff, 0xff][..]);
        assert!(matches!(
            codec.decode(&mut buf),
            Err(FrameError::TooLarge { .. })
        ));
    }

    #[test]
    fn oversized_frame_is_not_encoded() {
        let mut codec = FrameCodec::new(16);
        let mut buf = BytesMut::new();
        assert!(codec.encode(frame(b"{}", &[0; 64]), &mut buf).is_err());
    }

    #[test]
    fn eof_mid_frame_is_an_error() {
        let mut buf = encode(&[frame(b"{}", b"hello")], 1024);
        buf.truncate(buf.len() - 2);
        let mut codec = FrameCodec::new(1024);
        assert!(matches!(
            codec.decode_eof(&mut buf),
            Err(FrameError::TruncatedFrame)
        ));
    }

    #[test]
    fn clean_eof_is_none() {
        let mut codec = FrameCodec::new(1024);
        assert!(codec.decode_eof(&mut BytesMut::new()).unwrap().is_none());
    }

    #[test]
    fn header_length_beyond_frame_is_malformed() {
        let mut buf = BytesMut::new();
        buf.put_u32(8);
        buf.put_u32(100);
        buf.put_u32(0);
        let mut codec = FrameCodec::new(1024);
        assert!(matches!(
            codec.decode(&mut buf),
            Err(FrameError::Malformed(_))
        ));
    }

    /// Frames of every size through a [`FrameSink`] over a narrow pipe, with a flush
    /// abandoned mid-payload, come out whole and in order.
    #[test]
    fn frame_sink_writes_whole_frames_even_after_an_abandoned_flush() {
        use futures::{SinkExt, StreamExt};
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let (a, b) = tokio::io::duplex(1000);
            let (mut sink, _unused) = split(Framed::new(a, FrameCodec::new(1 << 20)));
            let frames: Vec<Frame> = [0usize, 10, WRITE_DIRECT - 1, WRITE_DIRECT, 200_000, 3]
                .iter()
                .enumerate()
                .map(|(i, &n)| {
                    let payload: Vec<u8> = (0..n).map(|j| (i * 7 + j) as u8).collect();
                    frame(format!("{{\"i\":{i}}}").as_bytes(), &payload)
                })
                .collect();
            // Nobody reads yet: the pipe fills and this flush is abandoned half way.
            sink.feed(frames[4].clone()).await.unwrap();
            let abandoned =
                tokio::time::timeout(std::time::Duration::from_millis(20), sink.flush()).await;
            assert!(
                abandoned.is_err(),
                "a 200 kB frame cannot fit a 1000-byte pipe"
            );
            let reader = tokio::spawn(async move {
                let mut source = Framed::new(b, FrameCodec::new(1 << 20));
                let mut got = Vec::new();
                while let Some(f) = source.next().await {
                    got.push(f.unwrap());
                }
                got
            });
            for f in frames.iter().filter(|f| f.payload.len() != 200_000) {
                sink.send(f.clone()).await.unwrap();
            }
            sink.close().await.unwrap();
            drop(sink);
            let got = reader.await.unwrap();
            let mut want = vec![frames[4].clone()];
            want.extend(
                frames
                    .iter()
                    .filter(|f| f.payload.len() != 200_000)
                    .cloned(),
            );
            assert_eq!(got, want);
        });
    }

    proptest! {
        /// Frames split at arbitrary points decode to the same frames.
        #[test]
        fn split_anywhere(
            frames in prop::collection::vec(
                (prop::collection::vec(any::<u8>(), 0..64), prop::collection::vec(any::<u8>(), 0..300)),
                1..8),
            cuts in prop::collection::vec(1usize..97, 1..40),
        ) {
            let frames: Vec<Frame> = frames.iter().map(|(h, p)| frame(h, p)).collect();
            let all = encode(&frames, 4096);
            let mut codec = FrameCodec::new(4096);
            let mut buf = BytesMut::new();
            let mut out = Vec::new();
            let mut pos = 0;
            let mut cut = cuts.iter().cycle();
            while pos < all.len() {
                let end = (pos + cut.next().copied().unwrap_or(1)).min(all.len());
                buf.extend_from_slice(&all[pos..end]);
                pos = end;
                while let Some(f) = codec.decode(&mut buf).unwrap() {
                    out.push(f);
                }
            }
            prop_assert!(codec.decode_eof(&mut buf).unwrap().is_none());
            prop_assert_eq!(out, frames);
        }

        /// Garbage never panics: it decodes to frames, asks for more, or errors.
        #[test]
        fn garbage_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
            let mut codec = FrameCodec::new(512);
            let mut buf = BytesMut::from(&bytes[..]);
            while let Ok(Some(f)) = codec.decode_eof(&mut buf) {
                let _ = f.message::<crate::ClientMessage>();
            }
        }
    }
}
