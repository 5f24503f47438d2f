use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

/// Bytes moved by one tunnel: `sent` into the stream, `received` out of it.
#[derive(Clone, Copy, Debug, Default)]
pub struct Transfer {
    pub sent: u64,
    pub received: u64,
}

/// The first read of a connection, and the smallest any read shrinks to:
/// a request or a reply, not a bulk transfer.
const MIN_READ: usize = 4 * 1024;
/// Reads double up to this while each one fills its buffer (bulk data), so
/// a busy stream moves large chunks in few syscalls and h2 frames.
const MAX_READ: usize = 256 * 1024;

/// The size of the next read, from how the last one went: a full buffer
/// means more is waiting (double), a mostly empty one that the data is
/// small (halve). The bytes of a read go to h2 as they are, so the buffer
/// is never larger than what that read could carry.
fn next_read(size: usize, got: usize) -> usize {
    if got == size {
        (size * 2).min(MAX_READ)
    } else if got < size / 4 {
        (size / 2).max(MIN_READ)
    } else {
        size
    }
}

/// A socket that can tell when a read would find something, so a tunnel
/// waiting for bytes holds no buffer: an idle connection costs its task and
/// its sockets, not a read buffer.
pub trait ReadReady: AsyncRead + Unpin {
    /// Ready when bytes, EOF or an error are there to read. Without a
    /// readiness signal (in-memory pipes) it is always ready, and the buffer
    /// of a read that then has to wait is let go of until it is woken.
    fn poll_read_ready(&self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl ReadReady for tokio::net::TcpStream {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        tokio::net::TcpStream::poll_read_ready(self, cx)
    }
}

impl ReadReady for tokio::net::tcp::OwnedReadHalf {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.as_ref().poll_read_ready(cx)
    }
}

impl<T: AsyncRead> ReadReady for tokio::io::ReadHalf<T> {}

/// One read of at most `size` bytes into a buffer made for it once the
/// socket is readable. A read that finds nothing after all (a stale
/// readiness) drops its buffer before it waits again.
fn poll_read_chunk<R: ReadReady>(
    rd: &mut R,
    size: usize,
    cx: &mut Context<'_>,
) -> Poll<io::Result<BytesMut>> {
    ready!(rd.poll_read_ready(cx))?;
    let mut buf = BytesMut::with_capacity(size);
    ready!(tokio_util::io::poll_read_buf(Pin::new(rd), cx, &mut buf))?;
    Poll::Ready(Ok(buf))
}

/// Moves bytes between a TCP-like socket and an HBONE stream until both
/// directions end. A half-close crosses as END_STREAM (and back as a write
/// shutdown); an error on either side resets the stream and ends both. Each
/// read's buffer is frozen into `Bytes` and handed to h2 without another
/// copy, and freed once h2 has written it.
pub async fn pump<R, W>(
    mut rd: R,
    mut wr: W,
    mut send: SendStream<Bytes>,
    mut recv: RecvStream,
    counters: &(impl Fn(Transfer) + Sync),
) -> std::io::Result<Transfer>
where
    R: ReadReady,
    W: AsyncWrite + Unpin,
{
    let sent = std::sync::atomic::AtomicU64::new(0);
    let received = std::sync::atomic::AtomicU64::new(0);
    let upstream = async {
        let mut size = MIN_READ;
        loop {
            let buf = std::future::poll_fn(|cx| poll_read_chunk(&mut rd, size, cx)).await?;
            let n = buf.len();
            if n == 0 {
                send.send_data(Bytes::new(), true).map_err(h2_io)?;
                return Ok::<_, std::io::Error>(());
            }
            sent.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
            counters(Transfer {
                sent: n as u64,
                received: 0,
            });
            size = next_read(size, n);
            let mut chunk = buf.freeze();
            while !chunk.is_empty() {
                send.reserve_capacity(chunk.len());
                let cap = match std::future::poll_fn(|cx| send.poll_capacity(cx)).await {
                    Some(c) => c.map_err(h2_io)?,
                    None => {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::BrokenPipe,
                            "stream closed",
                        ))
                    }
                };
                if cap == 0 {
                    continue;
                }
                send.send_data(chunk.split_to(cap.min(chunk.len())), false)
                    .map_err(h2_io)?;
            }
        }
    };
    let downstream = async {
        while let Some(data) = recv.data().await {
            let data = data.map_err(h2_io)?;
            let n = data.len();
            wr.write_all(&data).await?;
            received.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
            counters(Transfer {
                sent: 0,
                received: n as u64,
            });
            let _ = recv.flow_control().release_capacity(n);
        }
        wr.shutdown().await?;
        Ok::<_, std::io::Error>(())
    };
    let result = tokio::try_join!(upstream, downstream);
    let t = Transfer {
        sent: sent.load(std::sync::atomic::Ordering::Relaxed),
        received: received.load(std::sync::atomic::Ordering::Relaxed),
    };
    match result {
        Ok(_) => Ok(t),
        Err(e) => {
            // Tell the peer, so its side of the tunnel ends too.
            send.send_reset(h2::Reason::CANCEL);
            Err(e)
        }
    }
}

fn h2_io(e: h2::Error) -> std::io::Error {
    if e.is_io() {
        e.into_io().unwrap()
    } else {
        std::io::Error::new(std::io::ErrorKind::ConnectionReset, e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_size_follows_the_data() {
        // (size, got) -> next
        let cases = [
            (MIN_READ, 1, MIN_READ),                // a byte: stays small
            (MIN_READ, MIN_READ, 2 * MIN_READ),     // full: doubles
            (MAX_READ / 2, MAX_READ / 2, MAX_READ), // up to the cap
            (MAX_READ, MAX_READ, MAX_READ),         // and no further
            (MAX_READ, MAX_READ / 2, MAX_READ),     // half full: keeps its size
            (MAX_READ, 100, MAX_READ / 2),          // mostly empty: halves
            (2 * MIN_READ, 10, MIN_READ),           // not below the floor
        ];
        for (size, got, want) in cases {
            assert_eq!(next_read(size, got), want, "size {size} got {got}");
        }
    }
}
