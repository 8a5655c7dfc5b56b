//! An idle timeout shared by the two streams of a proxied connection.
//!
//! A connection is idle when no byte has moved either way for a while. Each direction on
//! its own says nothing: a download has the guest silent for minutes while data flows to
//! it. So both streams of a connection share one [`Activity`] clock, moved on by every
//! read and write on either; a read or write that has waited past the clock's deadline
//! fails with [`std::io::ErrorKind::TimedOut`], which ends the copy (or the relay) and so
//! the connection. On tokio's clock, so tests drive it with a paused one.

use std::future::Future as _;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// When a connection last moved a byte, and how long it may rest.
#[derive(Debug)]
pub struct Activity {
    idle: Duration,
    last: Mutex<Instant>,
}

impl Activity {
    /// A clock starting now.
    pub fn new(idle: Duration) -> Arc<Self> {
        Arc::new(Self {
            idle,
            last: Mutex::new(Instant::now()),
        })
    }

    fn touch(&self) {
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
    }

    fn deadline(&self) -> Instant {
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) + self.idle
    }
}

/// A stream whose pending reads and writes fail once its [`Activity`] has been idle.
#[derive(Debug)]
pub struct Idle<S> {
    inner: S,
    activity: Arc<Activity>,
    sleep: Pin<Box<Sleep>>,
    read: u64,
}

impl<S> Idle<S> {
    /// Wraps `inner` on `activity` (shared with the connection's other stream).
    pub fn new(inner: S, activity: Arc<Activity>) -> Self {
        let sleep = Box::pin(tokio::time::sleep_until(activity.deadline()));
        Self {
            inner,
            activity,
            sleep,
            read: 0,
        }
    }

    /// Bytes read from the stream so far (what a connection that ended on an error
    /// still moved).
    pub fn bytes_read(&self) -> u64 {
        self.read
    }

    /// The wrapped stream.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Pending until the connection has been idle for its whole allowance; then an error.
    fn poll_idle(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        loop {
            let deadline = self.activity.deadline();
            if self.sleep.deadline() != deadline {
                self.sleep.as_mut().reset(deadline);
            }
            match self.sleep.as_mut().poll(cx) {
                Poll::Pending => return Poll::Pending,
                // The other stream may have moved meanwhile: then wait on.
                Poll::Ready(()) if self.activity.deadline() > Instant::now() => continue,
                Poll::Ready(()) => {
                    return Poll::Ready(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the connection was idle too long",
                    ))
                }
            }
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Idle<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(r) => {
                let n = buf.filled().len() - before;
                if n > 0 {
                    this.read += n as u64;
                    this.activity.touch();
                }
                Poll::Ready(r)
            }
            Poll::Pending => this.poll_idle(cx).map(Err),
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Idle<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_write(cx, data) {
            Poll::Ready(r) => {
                if matches!(r, Ok(n) if n > 0) {
                    this.activity.touch();
                }
                Poll::Ready(r)
            }
            Poll::Pending => this.poll_idle(cx).map(Err),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_flush(cx) {
            Poll::Pending => this.poll_idle(cx).map(Err),
            ready => ready,
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    /// A download: the guest is silent while data flows to it, and the connection lives
    /// on; once nothing moves either way for the allowance, both ends fail.
    #[tokio::test(start_paused = true)]
    async fn a_connection_is_idle_only_when_nothing_moves_either_way() {
        let idle = Duration::from_secs(60);
        let activity = Activity::new(idle);
        let (guest_end, guest) = tokio::io::duplex(1024);
        let (up_end, upstream) = tokio::io::duplex(1024);
        let mut guest = Idle::new(guest, activity.clone());
        let mut upstream = Idle::new(upstream, activity.clone());
        let (mut guest_end, mut up_end) = (guest_end, up_end);
        let relay =
            tokio::spawn(
                async move { tokio::io::copy_bidirectional(&mut guest, &mut upstream).await },
            );
        // Ten minutes of a chunk every 30 s from the upstream: never idle.
        let mut got = 0;
        for _ in 0..20 {
            tokio::time::sleep(Duration::from_secs(30)).await;
            up_end.write_all(b"chunk").await.unwrap();
            let mut buf = [0u8; 5];
            guest_end.read_exact(&mut buf).await.unwrap();
            got += 1;
        }
        assert_eq!(got, 20);
        assert!(!relay.is_finished());
        // Then silence: the relay ends after the allowance, not before.
        let quiet = Instant::now();
        let err = relay.await.unwrap().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(quiet.elapsed(), idle);
        // ... and the guest sees its connection end.
        let mut rest = Vec::new();
        assert_eq!(guest_end.read_to_end(&mut rest).await.unwrap(), 0);
    }
}
