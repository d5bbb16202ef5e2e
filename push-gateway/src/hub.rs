//! The process-wide live feed: one set of core NATS subscriptions per chat (its
//! `live.chats.<id>`, `typing.<id>` and `live.receipts.<id>`), shared by every connection
//! tracking the chat. Each event is decoded, rendered
//! and serialised once here, and the same frame bytes are handed to every connection.
//!
//! Fan-out never waits: a connection whose queue is full is stopped as a slow consumer (it
//! catches up from its inbox when it reconnects), so one stalled client cannot hold up the
//! chat for everyone else.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};

use async_nats::Client;
use axum::extract::ws::Utf8Bytes;
use futures::StreamExt;
use parley_nats::MessageKeys;
use parley_nats::receipts::WatermarkMoved;
use parley_nats::subjects;
use parley_schemas::cloudevent::decode;
use parley_schemas::frames::{ServerFrame, render_opened};
use parley_schemas::{ChatEvent, ChatId, UserId};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::stop::{StopReason, Stopper};
use crate::wire::{MembershipNotice, SequenceOnly, Typing};

/// Identifies one WebSocket connection inside this process.
pub(crate) type ConnId = u64;

/// One chat's live item, as queued to a connection.
#[derive(Debug, Clone)]
pub(crate) struct LiveMsg {
    pub chat: ChatId,
    pub item: Arc<LiveItem>,
}

/// Everything that reaches a connection from inside the gateway, in its one bounded queue: a
/// socket costs one channel for all three, not one each (and no NATS subscription of its own).
#[derive(Debug, Clone)]
pub(crate) enum Inbound {
    /// A chat's live item, from the hub.
    Live(LiveMsg),
    /// `notify.user.<user_id>`: the user joined or left a chat, routed by the registry.
    Membership(MembershipNotice),
    /// A rendered `presence` frame about a contact; best effort.
    Presence(Utf8Bytes),
}

#[derive(Debug)]
pub(crate) enum LiveItem {
    Event(LiveEvent),
    /// A best-effort frame about `user_id` (typing, receipt): for the chat's other members
    /// only, never for the user it is about.
    Ephemeral {
        user_id: UserId,
        frame: Utf8Bytes,
    },
}

#[derive(Debug)]
pub(crate) struct LiveEvent {
    pub sequence: u64,
    /// The serialised `newMessage`/`chatUpdate` frame; `None` when this build cannot render
    /// the event's type, so connections fetch the projector's rendering from PostgreSQL.
    pub frame: Option<Utf8Bytes>,
    /// Users a `participants_modified` removes.
    pub removed: Vec<UserId>,
}

/// A connection's interest in a chat.
#[derive(Clone)]
pub(crate) struct Subscriber {
    pub conn: ConnId,
    pub tx: mpsc::Sender<Inbound>,
    pub stopper: Arc<Stopper>,
}

impl Subscriber {
    /// Queues an item the connection must not miss. Fan-out never waits: a connection whose
    /// queue is full is stopped as a slow consumer and catches up from its inbox when it
    /// reconnects, rather than being buffered for without bound.
    pub(crate) fn must_send(&self, item: Inbound) {
        if let Err(mpsc::error::TrySendError::Full(_)) = self.tx.try_send(item) {
            self.stopper.stop(StopReason::SlowConsumer);
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FeedState {
    Subscribing,
    /// The SUBs are queued on the NATS connection: a `flush` after this point guarantees the
    /// server routes every later event to us.
    Subscribed,
    Failed,
}

struct Feed {
    generation: u64,
    subscribers: Arc<RwLock<Vec<Subscriber>>>,
    state: watch::Receiver<FeedState>,
    cancel: CancellationToken,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot subscribe to the live feed of chat {0}")]
pub(crate) struct HubError(ChatId);

pub(crate) struct Hub {
    nats: Client,
    /// Opens sealed bodies (ADR 7) once per event for every connection.
    keys: MessageKeys,
    feeds: Mutex<HashMap<ChatId, Feed>>,
    next_generation: std::sync::atomic::AtomicU64,
    shutdown: CancellationToken,
}

impl Hub {
    pub(crate) fn new(nats: Client, keys: MessageKeys, shutdown: CancellationToken) -> Arc<Self> {
        Arc::new(Self {
            nats,
            keys,
            feeds: Mutex::new(HashMap::new()),
            next_generation: std::sync::atomic::AtomicU64::new(0),
            shutdown,
        })
    }

    /// Adds `sub` to the chat's feed, subscribing on first use. Returns once the subscription is
    /// queued on the NATS connection; the caller flushes the connection to make it effective.
    pub(crate) async fn join(
        self: &Arc<Self>,
        chat: ChatId,
        sub: Subscriber,
    ) -> Result<(), HubError> {
        let mut state = {
            let mut feeds = lock(&self.feeds);
            match feeds.get(&chat) {
                Some(feed) => {
                    write(&feed.subscribers).push(sub);
                    feed.state.clone()
                }
                None => {
                    let generation = self
                        .next_generation
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let subscribers = Arc::new(RwLock::new(vec![sub]));
                    let (state_tx, state_rx) = watch::channel(FeedState::Subscribing);
                    let cancel = self.shutdown.child_token();
                    tokio::spawn(Arc::clone(self).run_feed(
                        chat,
                        generation,
                        Arc::clone(&subscribers),
                        state_tx,
                        cancel.clone(),
                    ));
                    feeds.insert(
                        chat,
                        Feed {
                            generation,
                            subscribers,
                            state: state_rx.clone(),
                            cancel,
                        },
                    );
                    state_rx
                }
            }
        };
        loop {
            match *state.borrow_and_update() {
                FeedState::Subscribed => return Ok(()),
                FeedState::Failed => return Err(HubError(chat)),
                FeedState::Subscribing => {}
            }
            if state.changed().await.is_err() {
                return Err(HubError(chat));
            }
        }
    }

    /// Removes the connection from the chat's feed; the last one out unsubscribes.
    pub(crate) fn leave(&self, chat: ChatId, conn: ConnId) {
        let mut feeds = lock(&self.feeds);
        let empty = match feeds.get(&chat) {
            Some(feed) => {
                let mut subs = write(&feed.subscribers);
                subs.retain(|s| s.conn != conn);
                subs.is_empty()
            }
            None => false,
        };
        if empty && let Some(feed) = feeds.remove(&chat) {
            feed.cancel.cancel();
        }
    }

    async fn run_feed(
        self: Arc<Self>,
        chat: ChatId,
        generation: u64,
        subscribers: Arc<RwLock<Vec<Subscriber>>>,
        state: watch::Sender<FeedState>,
        cancel: CancellationToken,
    ) {
        let subscribed = async {
            let live = self.nats.subscribe(subjects::live_chat(chat)).await?;
            let typing = self.nats.subscribe(subjects::typing(chat)).await?;
            let receipts = self.nats.subscribe(subjects::live_receipts(chat)).await?;
            Ok::<_, async_nats::SubscribeError>((live, typing, receipts))
        }
        .await;
        let (mut live, mut typing, mut receipts) = match subscribed {
            Ok(subs) => subs,
            Err(error) => {
                tracing::warn!(%chat, %error, "live subscription failed");
                self.forget(chat, generation);
                let _ = state.send(FeedState::Failed);
                return;
            }
        };
        let _ = state.send(FeedState::Subscribed);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                msg = live.next() => match msg {
                    Some(msg) => {
                        if let Some(event) = live_event(&self.keys, chat, &msg.payload).await {
                            fan_out(&subscribers, chat, LiveItem::Event(event));
                        }
                    }
                    None => break,
                },
                msg = typing.next() => match msg {
                    Some(msg) => {
                        if let Some(item) = typing_item(chat, &msg.payload) {
                            fan_out(&subscribers, chat, item);
                        }
                    }
                    None => break,
                },
                msg = receipts.next() => match msg {
                    Some(msg) => {
                        if let Some(item) = receipt_item(chat, &msg.payload) {
                            fan_out(&subscribers, chat, item);
                        }
                    }
                    None => break,
                },
            }
        }
        // The NATS client is gone: these connections would wait for live events forever.
        self.forget(chat, generation);
        for sub in read(&subscribers).iter() {
            sub.stopper.stop(StopReason::Unavailable);
        }
    }

    fn forget(&self, chat: ChatId, generation: u64) {
        let mut feeds = lock(&self.feeds);
        if feeds.get(&chat).is_some_and(|f| f.generation == generation) {
            feeds.remove(&chat);
        }
    }
}

fn fan_out(subscribers: &RwLock<Vec<Subscriber>>, chat: ChatId, item: LiveItem) {
    let is_event = matches!(item, LiveItem::Event(_));
    let msg = LiveMsg {
        chat,
        item: Arc::new(item),
    };
    for sub in read(subscribers).iter() {
        let item = Inbound::Live(msg.clone());
        if is_event {
            sub.must_send(item);
        } else {
            // Typing and receipts are best effort.
            let _ = sub.tx.try_send(item);
        }
    }
}

/// Decodes and renders a republished chat event once for every connection. A sealed body is
/// opened with its message key (a destroyed key renders the message deleted); if the key
/// store cannot be reached, the frame is left to the read model, as for an unknown type.
async fn live_event(keys: &MessageKeys, chat: ChatId, payload: &[u8]) -> Option<LiveEvent> {
    match decode::<ChatEvent>(payload) {
        Ok(event) => {
            if event.meta.subject != chat.to_string() {
                tracing::warn!(%chat, subject = %event.meta.subject, "live event for another chat; ignored");
                return None;
            }
            let sequence = event.meta.sequence;
            if let ChatEvent::MessageDeleted(d) = &event.event {
                keys.forget(chat, d.message_id).await;
            }
            let opened = match keys.open_event(chat, &event.event).await {
                Ok(opened) => opened,
                Err(error) => {
                    tracing::warn!(%chat, %error, sequence, "cannot open a sealed body; the read model will render it");
                    return Some(LiveEvent {
                        sequence,
                        frame: None,
                        removed: Vec::new(),
                    });
                }
            };
            let item = render_opened(&event, opened.as_deref());
            let frame = ServerFrame::for_item(chat, sequence, &item).to_json();
            let removed = match &event.event {
                ChatEvent::ParticipantsModified(p) => p.removed.clone(),
                _ => Vec::new(),
            };
            Some(LiveEvent {
                sequence,
                frame: Some(frame.into()),
                removed,
            })
        }
        Err(error) => match serde_json::from_slice::<SequenceOnly>(payload) {
            Ok(s) => {
                tracing::debug!(%chat, %error, sequence = s.sequence, "live event not renderable here; will read it from PostgreSQL");
                Some(LiveEvent {
                    sequence: s.sequence,
                    frame: None,
                    removed: Vec::new(),
                })
            }
            Err(_) => {
                tracing::warn!(%chat, %error, "undecodable live event; ignored");
                None
            }
        },
    }
}

fn typing_item(chat: ChatId, payload: &[u8]) -> Option<LiveItem> {
    let typing: Typing = serde_json::from_slice(payload).ok()?;
    if typing.chat_id != chat {
        return None;
    }
    let frame = ServerFrame::Typing {
        chat_id: chat,
        user_id: typing.user_id,
    };
    Some(LiveItem::Ephemeral {
        user_id: typing.user_id,
        frame: frame.to_json().into(),
    })
}

/// A moved watermark, rendered once as the `receipt` frame every other member gets.
fn receipt_item(chat: ChatId, payload: &[u8]) -> Option<LiveItem> {
    let moved: WatermarkMoved = match serde_json::from_slice(payload) {
        Ok(m) => m,
        Err(error) => {
            tracing::warn!(%chat, %error, "malformed receipt notice; ignored");
            return None;
        }
    };
    if moved.chat_id != chat || (moved.delivered_up_to.is_none() && moved.read_up_to.is_none()) {
        return None;
    }
    let frame = ServerFrame::Receipt {
        chat_id: chat,
        user_id: moved.user_id,
        delivered_up_to: moved.delivered_up_to,
        read_up_to: moved.read_up_to,
    };
    Some(LiveItem::Ephemeral {
        user_id: moved.user_id,
        frame: frame.to_json().into(),
    })
}

// The maps are only touched in short non-async sections; a panic while holding one leaves
// plain data behind, so a poisoned lock is still safe to use.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|e| e.into_inner())
}
fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|e| e.into_inner())
}
