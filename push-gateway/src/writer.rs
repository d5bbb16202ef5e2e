//! The socket's write half, driven by the connection's own task: frames queue in an outbox and
//! are written in bursts (one flush, so one syscall, for whatever is queued), and the close
//! frame ends it.
//!
//! No writer task and no channel: each would cost every idle socket a task and about 2.5 KiB
//! (tokio's channel allocates its first block up front), and every frame a wake-up of a second
//! task (docs/benchmarks.md, "Session 8").

use std::collections::VecDeque;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use futures::SinkExt;
use futures::stream::SplitSink;

/// How long a close frame may take to leave; a client that does not read never takes it.
const CLOSE_WRITE_TIMEOUT: Duration = Duration::from_secs(1);
/// Frames written per flush at most, so a long queue still reaches the client in steps.
const MAX_BURST: usize = 64;
/// An emptied queue keeps at most this much room, so a socket that once took a burst does not
/// hold the burst's memory while idle.
const KEPT_CAPACITY: usize = 16;

/// How the connection ends.
pub(crate) struct Closing {
    pub frame: Option<CloseFrame>,
    /// Write what is queued before the close frame (an error frame explaining it, say).
    pub flush_queued: bool,
}

pub(crate) struct Outbox {
    sink: SplitSink<WebSocket, Message>,
    queue: VecDeque<Utf8Bytes>,
    /// Frames handed to the sink since its last completed flush.
    unflushed: bool,
}

impl Outbox {
    pub(crate) fn new(sink: SplitSink<WebSocket, Message>) -> Self {
        Self {
            sink,
            queue: VecDeque::new(),
            unflushed: false,
        }
    }

    pub(crate) fn push(&mut self, frame: Utf8Bytes) {
        self.queue.push_back(frame);
    }

    /// Frames queued and not yet handed to the socket.
    pub(crate) fn len(&self) -> usize {
        self.queue.len()
    }

    /// Something is queued or not flushed yet: [`Outbox::drain`] has work.
    pub(crate) fn busy(&self) -> bool {
        !self.queue.is_empty() || self.unflushed
    }

    /// Writes and flushes everything queued. Cancel-safe, so it can be one branch of the
    /// connection's `select!`: a frame leaves the queue only once the socket has taken it, and
    /// a flush cut short resumes on the next call.
    pub(crate) async fn drain(&mut self) -> Result<(), axum::Error> {
        futures::future::poll_fn(|cx| self.poll_drain(cx)).await
    }

    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), axum::Error>> {
        let mut fed = 0;
        while !self.queue.is_empty() {
            if fed == MAX_BURST {
                ready!(self.sink.poll_flush_unpin(cx))?;
                self.unflushed = false;
                fed = 0;
            }
            ready!(self.sink.poll_ready_unpin(cx))?;
            if let Some(frame) = self.queue.pop_front() {
                self.sink.start_send_unpin(Message::Text(frame))?;
                self.unflushed = true;
                fed += 1;
            }
        }
        if self.queue.capacity() > KEPT_CAPACITY {
            self.queue.shrink_to(KEPT_CAPACITY);
        }
        ready!(self.sink.poll_flush_unpin(cx))?;
        self.unflushed = false;
        Poll::Ready(Ok(()))
    }

    /// Ends the socket's write half: what is queued (if `flush_queued`), then the close frame,
    /// within [`CLOSE_WRITE_TIMEOUT`].
    pub(crate) async fn close(mut self, closing: Closing) {
        let _ = tokio::time::timeout(CLOSE_WRITE_TIMEOUT, async {
            if closing.flush_queued {
                self.drain().await?;
            }
            match closing.frame {
                Some(frame) => self.sink.send(Message::Close(Some(frame))).await,
                None => self.sink.flush().await,
            }
        })
        .await;
    }
}
