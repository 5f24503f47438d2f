use bytes::{Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Bytes moved by one tunnel: `sent` into the stream, `received` out of it.
#[derive(Clone, Copy, Debug, Default)]
pub struct Transfer {
    pub sent: u64,
    pub received: u64,
}

const CHUNK: usize = 256 * 1024;

/// Moves bytes between a TCP-like socket and an HBONE stream until both
/// directions end. A half-close crosses as END_STREAM (and back as a write
/// shutdown); an error on either side resets the stream and ends both. Read
/// buffers are frozen into `Bytes` and handed to h2 without another copy.
pub async fn pump<R, W>(
    mut rd: R,
    mut wr: W,
    mut send: SendStream<Bytes>,
    mut recv: RecvStream,
    counters: &(impl Fn(Transfer) + Sync),
) -> std::io::Result<Transfer>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let sent = std::sync::atomic::AtomicU64::new(0);
    let received = std::sync::atomic::AtomicU64::new(0);
    let upstream = async {
        let mut buf = BytesMut::with_capacity(CHUNK);
        loop {
            buf.reserve(CHUNK);
            let n = rd.read_buf(&mut buf).await?;
            if n == 0 {
                send.send_data(Bytes::new(), true).map_err(h2_io)?;
                return Ok::<_, std::io::Error>(());
            }
            sent.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
            counters(Transfer {
                sent: n as u64,
                received: 0,
            });
            let mut chunk = buf.split().freeze();
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
