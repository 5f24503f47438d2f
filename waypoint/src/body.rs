//! A response body that counts the bytes it carries and reports the total,
//! with the `grpc-status` of its trailers if any, once: when it ends or is
//! dropped (a client that goes away still counts).

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};

type Done = Box<dyn FnOnce(u64, Option<u32>) + Send + Sync>;

pub struct Counted<B> {
    inner: B,
    sent: u64,
    grpc_status: Option<u32>,
    done: Option<Done>,
}

impl<B> Counted<B> {
    pub fn new(inner: B, done: impl FnOnce(u64, Option<u32>) + Send + Sync + 'static) -> Self {
        Counted {
            inner,
            sent: 0,
            grpc_status: None,
            done: Some(Box::new(done)),
        }
    }

    fn finish(&mut self) {
        if let Some(f) = self.done.take() {
            f(self.sent, self.grpc_status);
        }
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for Counted<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        match &r {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(d) = f.data_ref() {
                    self.sent += d.len() as u64;
                } else if let Some(t) = f.trailers_ref() {
                    self.grpc_status = crate::grpc::status(t);
                }
            }
            Poll::Ready(None) | Poll::Ready(Some(Err(_))) => self.finish(),
            Poll::Pending => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B> Drop for Counted<B> {
    fn drop(&mut self) {
        self.finish();
    }
}
