//! The request body as forwarded: bounded in size (413) and in how long it may stay silent (408). The
//! byte count covers chunked bodies, so a body that grows past the limit is cut off mid-stream.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};

use crate::BoxError;

/// What stopped a body, shared with the pipeline so it can answer with the right status.
#[derive(Clone, Default)]
pub struct Tripped(Arc<AtomicU8>);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trip {
    TooLarge,
    Idle,
    /// The client's body framing broke (a bad chunk, a reset): its fault, not the upstream's.
    Broken,
}

impl Tripped {
    fn set(&self, t: Trip) {
        self.0.store(t as u8 + 1, Ordering::Relaxed);
    }

    pub fn get(&self) -> Option<Trip> {
        match self.0.load(Ordering::Relaxed) {
            1 => Some(Trip::TooLarge),
            2 => Some(Trip::Idle),
            3 => Some(Trip::Broken),
            _ => None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("request body {0}")]
struct BodyLimit(&'static str);

pin_project_lite::pin_project! {
    pub struct GuardedBody {
        #[pin]
        inner: Incoming,
        seen: u64,
        max: u64,
        idle: Duration,
        #[pin]
        timer: Sleep,
        tripped: Tripped,
    }
}

impl GuardedBody {
    pub fn new(inner: Incoming, max: u64, idle: Duration, tripped: Tripped) -> GuardedBody {
        GuardedBody { inner, seen: 0, max, idle, timer: tokio::time::sleep(idle), tripped }
    }
}

impl Body for GuardedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        match this.inner.as_mut().poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    *this.seen += data.len() as u64;
                    if *this.seen > *this.max {
                        this.tripped.set(Trip::TooLarge);
                        return Poll::Ready(Some(Err(Box::new(BodyLimit("too large")))));
                    }
                }
                this.timer.as_mut().reset(Instant::now() + *this.idle);
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.tripped.set(Trip::Broken);
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => match this.timer.poll(cx) {
                Poll::Ready(()) => {
                    this.tripped.set(Trip::Idle);
                    Poll::Ready(Some(Err(Box::new(BodyLimit("idle for too long")))))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
