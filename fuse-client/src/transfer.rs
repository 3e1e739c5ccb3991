//! Streamed whole-file transfers on top of [`RemoteClient`]: uploads send fixed-size chunks
//! as fast as the connection takes them; downloads keep a window of ranged reads in flight.
//! Neither ever holds more than a few chunks in memory. Chunks are the connection's
//! [`RemoteClient::chunk_size`]: 1 MiB, or what fits in the frames the server allows.

use bytes::{Bytes, BytesMut};
use futures::stream::{FuturesOrdered, StreamExt};
use sharefs_protocol::FileInfo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::error::{ClientError, Result};
use crate::remote::{RemoteClient, UploadTarget};

/// Files up to this size (and one chunk) go up in one `put` round trip.
pub const SMALL_FILE: u64 = 256 * 1024;
/// Reads in flight during a download.
const READ_WINDOW: usize = 8;

/// Uploads everything `reader` yields to `target` in the caller's tree. `size` (when
/// known) lets the server refuse an over-quota upload before any byte is sent. `progress`
/// gets the running byte count.
pub async fn upload<R>(
    client: &RemoteClient,
    target: &UploadTarget,
    mut reader: R,
    size: Option<u64>,
    mut progress: impl FnMut(u64),
) -> Result<FileInfo>
where
    R: AsyncRead + Unpin,
{
    let small = SMALL_FILE.min(u64::from(client.chunk_size()));
    if let Some(size) = size.filter(|s| *s <= small) {
        let mut buf = Vec::with_capacity(size as usize);
        (&mut reader).take(small + 1).read_to_end(&mut buf).await?;
        if buf.len() as u64 <= small {
            let len = buf.len() as u64;
            let info = client.put_small(target, Bytes::from(buf)).await?;
            progress(len);
            return Ok(info);
        }
        // The file grew past the small limit while we read it: stream it instead.
        return stream_upload(
            client,
            target,
            Some(Bytes::from(buf)),
            reader,
            None,
            progress,
        )
        .await;
    }
    stream_upload(client, target, None, reader, size, progress).await
}

async fn stream_upload<R>(
    client: &RemoteClient,
    target: &UploadTarget,
    head: Option<Bytes>,
    mut reader: R,
    size: Option<u64>,
    mut progress: impl FnMut(u64),
) -> Result<FileInfo>
where
    R: AsyncRead + Unpin,
{
    let upload = client.upload_begin(target, size).await?;
    let chunk = client.chunk_size() as usize;
    let mut hasher = blake3::Hasher::new();
    let mut offset = 0u64;
    let result: Result<()> = async {
        if let Some(head) = head {
            for piece in head.chunks(chunk) {
                hasher.update(piece);
                let piece = Bytes::copy_from_slice(piece);
                let len = piece.len() as u64;
                client.send_chunk(upload, offset, piece).await?;
                offset += len;
            }
        }
        loop {
            let mut buf = BytesMut::with_capacity(chunk);
            while buf.len() < chunk {
                if reader.read_buf(&mut buf).await? == 0 {
                    break;
                }
            }
            if buf.is_empty() {
                return Ok(());
            }
            hasher.update(&buf);
            let len = buf.len() as u64;
            client.send_chunk(upload, offset, buf.freeze()).await?;
            offset += len;
            progress(offset);
        }
    }
    .await;
    if let Err(e) = result {
        // Best effort: the server also discards the upload if the connection is gone.
        let _ = client.upload_abort(upload).await;
        return Err(e);
    }
    client
        .upload_commit(
            upload,
            offset,
            hasher.finalize().to_hex().as_str(),
            target.mtime_ns,
        )
        .await
}

/// Downloads the file `id` of `owner` into `writer`; returns the file as it was at open.
pub async fn download<W>(
    client: &RemoteClient,
    owner: &str,
    id: u64,
    writer: &mut W,
    mut progress: impl FnMut(u64, u64),
) -> Result<FileInfo>
where
    W: AsyncWrite + Unpin,
{
    let (handle, info) = client.open(owner, id).await?;
    let result = async {
        let mut next = 0u64;
        let mut done = 0u64;
        let mut in_flight = FuturesOrdered::new();
        let chunk = client.chunk_size();
        loop {
            while in_flight.len() < READ_WINDOW && next < info.size {
                let len = (info.size - next).min(u64::from(chunk)) as u32;
                let c = client.clone();
                let off = next;
                in_flight.push_back(async move { (off, c.read(handle, off, len).await) });
                next += len as u64;
            }
            let Some((off, data)) = in_flight.next().await else {
                break;
            };
            let data = data?;
            if data.is_empty() && off < info.size {
                return Err(ClientError::Protocol(format!(
                    "{owner}/{}: server returned no data at offset {off}",
                    info.name
                )));
            }
            writer.write_all(&data).await?;
            done += data.len() as u64;
            progress(done, info.size);
        }
        writer.flush().await?;
        Ok(())
    }
    .await;
    let _ = client.close(handle).await;
    result.map(|()| info)
}
