//! The socket's write half: drains the connection's bounded frame queue, writing whatever is
//! queued before one flush (one syscall for a burst, not one per frame), and sends the close
//! frame when told, dropping whatever is still queued.

use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use futures::SinkExt;
use futures::stream::SplitSink;
use tokio::sync::{mpsc, oneshot};

/// How long a close frame may take to leave; a client that does not read never takes it.
const CLOSE_WRITE_TIMEOUT: Duration = Duration::from_secs(1);
/// Frames written per flush at most, so a steady stream still gets flushed regularly.
const MAX_BURST: usize = 64;

/// How the connection ends.
pub(crate) struct Closing {
    pub frame: Option<CloseFrame>,
    /// Write what is queued before the close frame (an error frame explaining it, say).
    pub flush_queued: bool,
}

pub(crate) async fn run(
    mut sink: SplitSink<WebSocket, Message>,
    mut frames: mpsc::Receiver<Message>,
    mut close: oneshot::Receiver<Closing>,
) {
    loop {
        let first = tokio::select! {
            biased;
            closing = &mut close => return finish(&mut sink, &mut frames, closing.ok()).await,
            next = frames.recv() => match next {
                Some(m) => m,
                None => return,
            },
        };
        let written = tokio::select! {
            biased;
            // A write blocked by a client that does not read must not delay the close.
            closing = &mut close => return finish(&mut sink, &mut frames, closing.ok()).await,
            r = write_burst(&mut sink, first, &mut frames) => r,
        };
        if written.is_err() {
            // The socket is gone; the reader notices on its side.
            return;
        }
    }
}

async fn write_burst(
    sink: &mut SplitSink<WebSocket, Message>,
    first: Message,
    frames: &mut mpsc::Receiver<Message>,
) -> Result<(), axum::Error> {
    sink.feed(first).await?;
    for _ in 1..MAX_BURST {
        match frames.try_recv() {
            Ok(m) => sink.feed(m).await?,
            Err(_) => break,
        }
    }
    sink.flush().await
}

async fn finish(
    sink: &mut SplitSink<WebSocket, Message>,
    frames: &mut mpsc::Receiver<Message>,
    closing: Option<Closing>,
) {
    let Some(closing) = closing else {
        return;
    };
    let _ = tokio::time::timeout(CLOSE_WRITE_TIMEOUT, async {
        if closing.flush_queued {
            while let Ok(m) = frames.try_recv() {
                sink.feed(m).await?;
            }
        }
        match closing.frame {
            Some(frame) => sink.send(Message::Close(Some(frame))).await,
            None => sink.flush().await,
        }
    })
    .await;
}
