//! The client's TCP stream as hyper sees it: counting the bytes it moves (for the idle
//! check), watching the framing of the requests read from it, lingering after an early close,
//! and giving hyper the end-of-stream that parks an HTTP/1.1 connection between requests
//! (see `connection.rs` for when and why).

use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use super::connection::Activity;
use super::framing::Framing;
use super::server::OpenGuard;
use crate::upstream::body::Stall;

/// Most bytes read at once while a request head is read (see `Watched::poll_read`).
const HEAD_READ: usize = 8 * 1024;
/// How long an HTTP/1.1 connection waits idle before it is parked. A client sending request
/// after request finds its connection as it left it (a fresh hyper connection per request
/// costs a quarter more CPU per request); one that keeps its connection for later gives the
/// memory back after this long.
const PARK_AFTER: Duration = Duration::from_millis(100);

/// One HTTP/1.1 round's view of parking (see the module's comment).
#[derive(Debug)]
pub(super) struct Park {
    /// This round may end by parking (HTTP/1.1 only).
    pub(super) allowed: bool,
    /// Bytes written since the last completed flush.
    unflushed: bool,
    /// Response bodies dropped as of the last completed flush.
    flushed_answers: u64,
    /// The round ended by the fake end-of-stream.
    pub(super) faked: bool,
    /// The client closed its side.
    pub(super) client_closed: bool,
    /// Bytes read by an earlier round and not used: served first.
    pub(super) unread: Bytes,
    /// How long the connection has had nothing to do: parked after [`PARK_AFTER`].
    quiet: Stall,
}

impl Park {
    /// A connection that is never parked (HTTP/2), or not yet in a round.
    pub(super) fn never() -> Self {
        Self {
            allowed: false,
            unflushed: false,
            flushed_answers: 0,
            faked: false,
            client_closed: false,
            unread: Bytes::new(),
            quiet: Stall::new(PARK_AFTER),
        }
    }

    /// An HTTP/1.1 round that may end by parking, reading first the `unread` bytes the last
    /// round left.
    pub(super) fn round(activity: &Activity, unread: Bytes) -> Self {
        Self {
            allowed: true,
            flushed_answers: activity.answered.load(Ordering::Acquire),
            unread,
            ..Self::never()
        }
    }
}

/// The client's TCP stream, counting the bytes it moves for the idle check, watching the
/// framing of the requests read from it, and parking between HTTP/1.1 requests.
pub(super) struct Watched {
    /// Taken only when dropped.
    pub(super) stream: Option<TcpStream>,
    pub(super) activity: Arc<Activity>,
    pub(super) framing: Framing,
    /// `limits.lingering_close`: how long a connection closed in the middle of a request body
    /// goes on reading (and discarding) what the client still sends. Closing a socket with
    /// unread data sends a TCP reset, and a client that is still uploading then loses the
    /// answer it was just given (a 429 before the body was read, say). Zero: close at once.
    pub(super) linger: Duration,
    pub(super) park: Park,
    /// Counted as open until the stream is closed, lingering included.
    pub(super) _open: Option<OpenGuard>,
}

impl Watched {
    fn moved(&self, n: usize) {
        if n > 0 {
            self.activity.bytes.fetch_add(n as u64, Ordering::Relaxed);
        }
    }

    fn stream(&mut self) -> Pin<&mut TcpStream> {
        Pin::new(
            self.stream
                .as_mut()
                .expect("the stream is only taken on drop"),
        )
    }

    pub(super) fn stream_ref(&self) -> &TcpStream {
        self.stream
            .as_ref()
            .expect("the stream is only taken on drop")
    }

    /// What a write did: bytes moved, now to be flushed before the connection may park.
    fn wrote(&mut self, result: &Poll<io::Result<usize>>) {
        if let Poll::Ready(Ok(n)) = *result {
            self.moved(n);
            self.park.unflushed |= n > 0;
            self.park.quiet.moved();
        }
    }

    /// Whether this round may end by parking now (the module's conditions, but the last).
    fn may_park(&self) -> bool {
        self.park.allowed
            && self.activity.in_flight.load(Ordering::Acquire) == 0
            && !self.park.unflushed
            && self.park.flushed_answers == self.activity.answered.load(Ordering::Acquire)
            && self.framing.at_boundary()
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        // hyper closes a connection whose request it did not read to its end (an early
        // answer, a head over the bound): keep reading for a while so that the answer
        // reaches the client.
        if !self.framing.mid_request() || self.linger.is_zero() {
            return;
        }
        if let (Some(stream), Ok(runtime)) =
            (self.stream.take(), tokio::runtime::Handle::try_current())
        {
            runtime.spawn(linger(stream, self.linger, self._open.take()));
        }
    }
}

/// Send FIN (if hyper did not), then discard what the client sends until it closes too or
/// `how_long` passed.
async fn linger(mut stream: TcpStream, how_long: Duration, _open: Option<OpenGuard>) {
    let _ = stream.shutdown().await;
    let mut sink = vec![0u8; 16 * 1024];
    let _ = tokio::time::timeout(how_long, async {
        while let Ok(1..) = stream.read(&mut sink).await {}
    })
    .await;
}

impl AsyncRead for Watched {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.park.unread.is_empty() {
            // Already counted and watched when first read.
            let n = this.park.unread.len().min(buf.remaining());
            buf.put_slice(&this.park.unread.split_to(n));
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        // hyper reads into all the room its buffer has, and checks the head bound only
        // between reads: a head that is all there at once (a connection that waited to be
        // readable) would pass the bound by most of a read. Heads are read in small steps.
        let result = match this.framing.mid_body() || buf.remaining() <= HEAD_READ {
            true => this.stream().poll_read(cx, buf),
            false => {
                // Not zeroed: ReadBuf hands out only what the read filled.
                let mut step = [MaybeUninit::<u8>::uninit(); HEAD_READ];
                let mut part = ReadBuf::uninit(&mut step);
                let result = this.stream().poll_read(cx, &mut part);
                buf.put_slice(part.filled());
                result
            }
        };
        match result {
            Poll::Ready(Ok(())) => {
                let read = &buf.filled()[before..];
                if read.is_empty() {
                    this.park.client_closed = true;
                }
                this.moved(read.len());
                if this.framing.conflicting().is_none() {
                    this.framing.feed(read);
                    if let Some(position) = this.framing.conflicting() {
                        this.activity.conflicting.store(position, Ordering::Release);
                    }
                }
            }
            // Nothing to read, nothing pending: once that has lasted PARK_AFTER, end hyper's
            // connection here (see `connection.rs`); the socket stays open.
            Poll::Pending if this.may_park() && this.park.quiet.waiting(cx) => {
                this.park.faked = true;
                return Poll::Ready(Ok(()));
            }
            _ => {}
        }
        if result.is_ready() {
            // Not idle any more: a later idle stretch counts from its own start.
            this.park.quiet.moved();
        }
        result
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = this.stream().poll_write(cx, buf);
        this.wrote(&result);
        result
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = this.stream().poll_write_vectored(cx, bufs);
        this.wrote(&result);
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.stream
            .as_ref()
            .is_some_and(TcpStream::is_write_vectored)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let result = this.stream().poll_flush(cx);
        if let Poll::Ready(Ok(())) = result {
            let answered = this.activity.answered.load(Ordering::Acquire);
            let changed = this.park.unflushed || this.park.flushed_answers != answered;
            this.park.unflushed = false;
            this.park.flushed_answers = answered;
            // hyper may be waiting on the read side already: have it read once more, now
            // that the connection can be parked.
            if changed && this.may_park() {
                cx.waker().wake_by_ref();
            }
        }
        result
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().stream().poll_shutdown(cx)
    }
}
