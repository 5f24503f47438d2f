//! A CONNECT stream as an ordinary byte stream (AsyncRead + AsyncWrite), for
//! code that speaks a protocol over the tunnel (the waypoint's HTTP server
//! and client) rather than pumping bytes through it.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use h2::{RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

pub struct StreamIo {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// Data received but not yet read.
    pending: Bytes,
    /// What a prior peek took off the stream, read first.
    prefix: Bytes,
}

fn h2_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        e.into_io().expect("checked is_io")
    } else {
        io::Error::other(e)
    }
}

impl StreamIo {
    pub fn new(send: SendStream<Bytes>, recv: RecvStream) -> Self {
        StreamIo {
            send,
            recv,
            pending: Bytes::new(),
            prefix: Bytes::new(),
        }
    }

    /// The first bytes of the stream, without consuming them (protocol
    /// sniffing): waits for the first DATA frame; empty at end of stream.
    pub async fn peek(&mut self) -> io::Result<&[u8]> {
        // Empty DATA frames say nothing about the protocol: wait past them.
        while self.prefix.is_empty() && self.pending.is_empty() {
            match std::future::poll_fn(|cx| self.recv.poll_data(cx)).await {
                Some(chunk) => {
                    let chunk = chunk.map_err(h2_io)?;
                    let _ = self.recv.flow_control().release_capacity(chunk.len());
                    self.prefix = chunk;
                }
                None => break,
            }
        }
        Ok(if self.prefix.is_empty() {
            &self.pending
        } else {
            &self.prefix
        })
    }
}

impl AsyncRead for StreamIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let me = &mut *self;
        if me.pending.is_empty() {
            if !me.prefix.is_empty() {
                me.pending = std::mem::take(&mut me.prefix);
            } else {
                match ready!(me.recv.poll_data(cx)) {
                    None => return Poll::Ready(Ok(())), // END_STREAM: EOF
                    Some(Err(e)) => return Poll::Ready(Err(h2_io(e))),
                    Some(Ok(chunk)) => {
                        let _ = me.recv.flow_control().release_capacity(chunk.len());
                        me.pending = chunk;
                    }
                }
            }
        }
        let n = me.pending.len().min(buf.remaining());
        buf.put_slice(&me.pending[..n]);
        me.pending.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for StreamIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let me = &mut *self;
        me.send
            .reserve_capacity(buf.len().min(crate::MAX_FRAME as usize));
        let n = match ready!(me.send.poll_capacity(cx)) {
            Some(Ok(n)) => n,
            Some(Err(e)) => return Poll::Ready(Err(h2_io(e))),
            None => return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
        };
        let n = n.min(buf.len());
        me.send
            .send_data(Bytes::copy_from_slice(&buf[..n]), false)
            .map_err(h2_io)?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    /// Half-close: END_STREAM, the tunnel's FIN.
    fn poll_shutdown(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        let _ = self.send.send_data(Bytes::new(), true);
        Poll::Ready(Ok(()))
    }
}
