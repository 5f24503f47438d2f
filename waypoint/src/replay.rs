//! A request body that streams to the upstream as it arrives and keeps a
//! copy of its first bytes, so that a retry (or a mirror) can resend it.
//!
//! The client's body is read once, by the attempt in flight; the bytes of
//! every frame it reads are copied into the replay buffer while the total
//! fits. (Copied, not referenced: a reference to a small frame would pin the
//! whole read buffer it was cut from, and many tiny frames would multiply
//! the memory held.) A later attempt first replays what was kept, then goes
//! on reading the client's body where the previous attempt stopped. Once the body outgrows the
//! buffer the copy is dropped and no new attempt can start: the request is
//! sent once. Memory per request is therefore the buffer at most, plus the
//! frame in transit, whatever the body's size.

use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http::HeaderMap;
use hyper::body::{Body, Frame, SizeHint};
use tokio::sync::watch;

use crate::upstream::BoxError;

/// Why a request cannot be sent again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NotReplayable {
    #[error("request body larger than the replay buffer")]
    TooLarge,
    #[error("request body failed while being read")]
    Broken,
}

impl NotReplayable {
    /// The access log's word for it.
    pub fn reason(self) -> &'static str {
        match self {
            NotReplayable::TooLarge => "body_over_replay_buffer",
            NotReplayable::Broken => "body_broken",
        }
    }
}

struct Shared<B> {
    src: B,
    kept: BytesMut,
    trailers: Option<HeaderMap>,
    /// Bytes read from the client so far.
    total: u64,
    ended: bool,
    overflow: bool,
    broken: bool,
    /// The attempt allowed to read; older ones fail.
    generation: u32,
    started: bool,
}

pub struct Replay<B> {
    shared: Mutex<Shared<B>>,
    limit: usize,
    hint: SizeHint,
    /// True once the body's fate is known (ended, outgrown or broken).
    settled: watch::Sender<bool>,
    /// True once the client has sent all of it (or it broke): where the
    /// route timeout starts counting, as Envoy's does.
    read: watch::Sender<bool>,
}

impl<B: Body<Data = Bytes> + Unpin> Replay<B>
where
    B::Error: Into<BoxError>,
{
    pub fn new(src: B, limit: usize) -> Arc<Self> {
        let hint = src.size_hint();
        let settled = watch::Sender::new(src.is_end_stream());
        let read = watch::Sender::new(src.is_end_stream());
        Arc::new(Replay {
            shared: Mutex::new(Shared {
                ended: src.is_end_stream(),
                src,
                kept: BytesMut::new(),
                trailers: None,
                total: 0,
                overflow: false,
                broken: false,
                generation: 0,
                started: false,
            }),
            limit,
            hint,
            settled,
            read,
        })
    }

    /// Resolves once the client's body has been read to its end (or broke).
    pub async fn read_to_end(&self) {
        let mut rx = self.read.subscribe();
        let _ = rx.wait_for(|r| *r).await;
    }

    /// The body for the next attempt: the first always; a later one only
    /// while everything read so far is still kept.
    pub fn attempt(self: &Arc<Self>) -> Result<Attempt<B>, NotReplayable> {
        let mut s = self.shared.lock().unwrap();
        let mut again = None;
        if s.started {
            if s.broken {
                return Err(NotReplayable::Broken);
            }
            if s.overflow {
                return Err(NotReplayable::TooLarge);
            }
            s.generation += 1;
            // One copy per retry, of at most the buffer: retries are rare.
            again = (!s.kept.is_empty()).then(|| Bytes::copy_from_slice(&s.kept));
        }
        s.started = true;
        Ok(Attempt {
            replay: self.clone(),
            generation: s.generation,
            again,
            trailers_sent: false,
            fresh: true,
        })
    }

    /// Whether another attempt could start now.
    pub fn replayable(&self) -> Result<(), NotReplayable> {
        let s = self.shared.lock().unwrap();
        if s.broken {
            Err(NotReplayable::Broken)
        } else if s.overflow {
            Err(NotReplayable::TooLarge)
        } else {
            Ok(())
        }
    }

    pub fn bytes_read(&self) -> u64 {
        self.shared.lock().unwrap().total
    }

    /// The whole body, once the attempts have read all of it and it fit:
    /// what a mirror sends. Waits without reading (the mirror must not pull
    /// the body at its own pace); None when the body outgrew the buffer or
    /// the request went away first.
    pub fn whole(this: Weak<Self>) -> impl std::future::Future<Output = Option<Whole>> {
        let mut rx = this.upgrade().map(|r| r.settled.subscribe());
        async move {
            rx.as_mut()?.wait_for(|s| *s).await.ok()?;
            let r = this.upgrade()?;
            let s = r.shared.lock().unwrap();
            (s.ended && !s.overflow && !s.broken).then(|| Whole {
                data: Bytes::copy_from_slice(&s.kept),
                trailers: s.trailers.clone(),
            })
        }
    }
}

/// A fully kept request body.
pub struct Whole {
    pub data: Bytes,
    pub trailers: Option<HeaderMap>,
}

/// One attempt's view of the request body.
pub struct Attempt<B> {
    replay: Arc<Replay<B>>,
    generation: u32,
    /// What earlier attempts read, sent before reading on.
    again: Option<Bytes>,
    trailers_sent: bool,
    fresh: bool,
}

#[derive(Debug, thiserror::Error)]
#[error("request body superseded by a retry")]
struct Superseded;

impl<B: Body<Data = Bytes> + Unpin> Body for Attempt<B>
where
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        this.fresh = false;
        let replay = this.replay.clone();
        // Held only for this synchronous poll, never across an await.
        let mut s = replay.shared.lock().unwrap();
        if s.generation != this.generation {
            // An older attempt still being written (its upstream answered
            // early): it must not steal frames from the current one.
            return Poll::Ready(Some(Err(Box::new(Superseded))));
        }
        if let Some(d) = this.again.take() {
            return Poll::Ready(Some(Ok(Frame::data(d))));
        }
        if s.ended {
            if let (Some(t), false) = (&s.trailers, this.trailers_sent) {
                this.trailers_sent = true;
                return Poll::Ready(Some(Ok(Frame::trailers(t.clone()))));
            }
            return Poll::Ready(None);
        }
        let polled = Pin::new(&mut s.src).poll_frame(cx);
        match polled {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                s.ended = true;
                drop(s);
                replay.settled.send_replace(true);
                replay.read.send_replace(true);
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                s.broken = true;
                drop(s);
                replay.settled.send_replace(true);
                replay.read.send_replace(true);
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(Some(Ok(frame))) => {
                let mut settle = false;
                if let Some(d) = frame.data_ref() {
                    s.total += d.len() as u64;
                    if !s.overflow {
                        if s.kept.len() + d.len() <= replay.limit {
                            s.kept.extend_from_slice(d);
                        } else {
                            s.overflow = true;
                            s.kept = BytesMut::new();
                            settle = true;
                        }
                    }
                } else if let Some(t) = frame.trailers_ref() {
                    s.trailers = Some(t.clone());
                    this.trailers_sent = true;
                }
                // A body of known length ends with its last frame: a sender
                // that sees is_end_stream polls no further, so no None comes.
                let mut all_read = false;
                if !s.ended && s.src.is_end_stream() {
                    s.ended = true;
                    settle = true;
                    all_read = true;
                }
                drop(s);
                if settle {
                    replay.settled.send_replace(true);
                }
                if all_read {
                    replay.read.send_replace(true);
                }
                Poll::Ready(Some(Ok(frame)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        let s = self.replay.shared.lock().unwrap();
        let replayed = self.again.is_none();
        let trailers_done = s.trailers.is_none() || self.trailers_sent;
        replayed && trailers_done && (s.ended || s.src.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        // Only before the first frame is the whole length still ahead.
        if self.fresh {
            self.replay.hint
        } else {
            SizeHint::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody};
    use std::time::Duration;

    type Src = StreamBody<
        futures_util::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, std::io::Error>>>,
    >;

    fn src(chunks: &[&'static [u8]], trailer: bool) -> Src {
        let mut frames: Vec<Result<Frame<Bytes>, std::io::Error>> = chunks
            .iter()
            .map(|c| Ok(Frame::data(Bytes::from_static(c))))
            .collect();
        if trailer {
            let mut t = HeaderMap::new();
            t.insert("x-t", "1".parse().unwrap());
            frames.push(Ok(Frame::trailers(t)));
        }
        StreamBody::new(futures_util::stream::iter(frames))
    }

    async fn read(a: Attempt<Src>) -> (Vec<u8>, bool) {
        let c = a.collect().await.unwrap();
        let t = c.trailers().is_some();
        (c.to_bytes().to_vec(), t)
    }

    /// The route timeout's start: not before the last frame was read, and
    /// at once for a body that had none to read.
    #[tokio::test]
    async fn read_to_end_waits_for_the_last_frame() {
        let r = Replay::new(src(&[b"ab", b"cd"], false), 1);
        let done = || {
            let r = r.clone();
            async move {
                tokio::time::timeout(Duration::from_millis(50), r.read_to_end())
                    .await
                    .is_ok()
            }
        };
        assert!(!done().await, "ended before anything was read");
        let mut a = r.attempt().unwrap();
        a.frame().await.unwrap().unwrap();
        assert!(!done().await, "ended after the first frame");
        while a.frame().await.is_some() {}
        assert!(done().await, "not ended after the last frame");
        let empty = Replay::new(http_body_util::Empty::<Bytes>::new(), 1);
        tokio::time::timeout(Duration::from_millis(50), empty.read_to_end())
            .await
            .expect("an empty body is read at once");
    }

    #[tokio::test]
    async fn a_body_within_the_buffer_is_replayed_whole_with_trailers() {
        let r = Replay::new(src(&[b"ab", b"cd"], true), 8);
        assert_eq!(read(r.attempt().unwrap()).await, (b"abcd".to_vec(), true));
        assert_eq!(read(r.attempt().unwrap()).await, (b"abcd".to_vec(), true));
        assert_eq!(r.bytes_read(), 4);
        let w = Replay::whole(Arc::downgrade(&r)).await.unwrap();
        assert_eq!(w.data, "abcd");
    }

    #[tokio::test]
    async fn a_retry_resumes_a_body_the_first_attempt_left_half_read() {
        let r = Replay::new(src(&[b"ab", b"cd", b"ef"], false), 8);
        let mut first = r.attempt().unwrap();
        let f = first.frame().await.unwrap().unwrap();
        assert_eq!(f.data_ref().unwrap().as_ref(), b"ab");
        let second = r.attempt().unwrap();
        // The first attempt may not read on once superseded.
        assert!(first.frame().await.unwrap().is_err());
        assert_eq!(read(second).await, (b"abcdef".to_vec(), false));
    }

    #[tokio::test]
    async fn tiny_frames_are_kept_as_one_copy() {
        const ONE: &[&[u8]] = &[b"x".as_slice(); 1000];
        let r = Replay::new(src(ONE, false), 4096);
        assert_eq!(read(r.attempt().unwrap()).await.0, vec![b'x'; 1000]);
        let mut again = r.attempt().unwrap();
        let f = again.frame().await.unwrap().unwrap();
        assert_eq!(f.into_data().unwrap().len(), 1000, "replayed as one frame");
        assert!(again.frame().await.is_none());
    }

    #[tokio::test]
    async fn a_body_over_the_buffer_streams_once_and_is_not_replayable() {
        let r = Replay::new(src(&[b"abcd", b"efgh", b"ij"], false), 6);
        assert_eq!(read(r.attempt().unwrap()).await.0, b"abcdefghij");
        assert_eq!(r.attempt().err(), Some(NotReplayable::TooLarge));
        assert_eq!(r.bytes_read(), 10);
        assert!(Replay::whole(Arc::downgrade(&r)).await.is_none());
    }

    #[tokio::test]
    async fn a_body_of_known_length_is_whole_after_its_last_frame() {
        // Senders stop polling once is_end_stream says so: the mirror must
        // not wait for a None that never comes.
        let r = Replay::new(http_body_util::Full::new(Bytes::from_static(b"abc")), 8);
        let mut a = r.attempt().unwrap();
        assert_eq!(
            a.frame().await.unwrap().unwrap().into_data().unwrap(),
            "abc"
        );
        assert!(a.is_end_stream());
        let w = tokio::time::timeout(Duration::from_secs(1), Replay::whole(Arc::downgrade(&r)));
        assert_eq!(w.await.unwrap().unwrap().data, "abc");
    }

    #[tokio::test]
    async fn an_empty_body_is_at_its_end_before_any_poll() {
        let r = Replay::new(http_body_util::Empty::<Bytes>::new(), 8);
        let a = r.attempt().unwrap();
        assert!(a.is_end_stream());
        assert!(r.attempt().is_ok());
    }
}
