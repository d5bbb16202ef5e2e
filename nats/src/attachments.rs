//! The `attachments` object store: chunked writes that enforce a size limit and hash sha256 as
//! the bytes pass, and chunked reads that hold one chunk at a time, so neither direction ever
//! buffers a whole attachment.
//!
//! Objects are written in the JetStream Object Store layout (chunks on
//! `$O.attachments.C.<nuid>`, one info record on `$O.attachments.M.<base64url(name)>`), so
//! `ObjectStore::info` and the `nats object` tools read them. The write is Parley's own rather
//! than `ObjectStore::put` because `put` leaves the chunks of an aborted write behind under a
//! nuid the caller never learns; here the nuid is ours, so an oversized upload is purged.

use std::collections::HashMap;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, object_store::ObjectStore};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE;
use bytes::{Bytes, BytesMut};
use chrono::{DateTime, SecondsFormat, Utc};
use futures::{Stream, StreamExt};
use parley_schemas::{AttachmentId, UserId};
use serde::Serialize;
use sha2::{Digest, Sha256};

/// The object store bucket.
pub const BUCKET: &str = "attachments";
/// Bytes per chunk message: the most either direction holds in memory per transfer.
pub const CHUNK_SIZE: usize = 128 * 1024;

/// What Parley records about an attachment, in the object's metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachmentMeta {
    pub attachment_id: AttachmentId,
    pub uploader: UserId,
    /// The declared (and sniff-checked) media type, without parameters.
    pub content_type: String,
    pub size: u64,
    /// Lowercase hex.
    pub sha256: String,
    pub filename: Option<String>,
    pub created_at: DateTime<Utc>,
    /// Chunk subject token and count, to read the bytes back.
    nuid: String,
    chunks: u64,
}

/// Why an attachment could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum AttachmentError {
    /// More bytes than the limit for the attachment's kind; nothing is kept.
    #[error("attachment is larger than {limit} bytes")]
    TooLarge { limit: u64 },
    /// The client's body failed (disconnect, bad framing); nothing is kept.
    #[error("reading the upload failed: {0}")]
    Body(String),
    #[error("no such attachment")]
    NotFound,
    #[error("object store: {0}")]
    Nats(String),
    /// An object whose metadata Parley did not write (or cannot read any more).
    #[error("attachment {0} has unreadable metadata")]
    Corrupt(String),
}

/// Handles to the `attachments` bucket; clone freely.
#[derive(Clone)]
pub struct Attachments {
    store: ObjectStore,
    stream: jetstream::stream::Stream,
    js: jetstream::Context,
}

/// The info record, as the Object Store layout defines it (field names are the wire format).
#[derive(Serialize)]
struct InfoRecord<'a> {
    name: String,
    bucket: &'static str,
    nuid: &'a str,
    size: u64,
    chunks: u64,
    mtime: String,
    digest: String,
    metadata: HashMap<&'static str, String>,
    options: Options,
}

#[derive(Serialize)]
struct Options {
    max_chunk_size: usize,
}

/// What an upload declares; size and hash are measured.
#[derive(Debug, Clone)]
pub struct NewAttachment {
    pub attachment_id: AttachmentId,
    pub uploader: UserId,
    pub content_type: String,
    pub filename: Option<String>,
    pub created_at: DateTime<Utc>,
}

impl Attachments {
    pub(crate) async fn open(js: &jetstream::Context) -> Result<Self, String> {
        let store = js
            .get_object_store(BUCKET)
            .await
            .map_err(|e| e.to_string())?;
        let stream = js
            .get_stream(format!("OBJ_{BUCKET}"))
            .await
            .map_err(|e| e.to_string())?;
        Ok(Self {
            store,
            stream,
            js: js.clone(),
        })
    }

    /// Streams `body` into the bucket as `new.attachment_id`, chunk by chunk. Over `limit`
    /// bytes, the chunks written so far are purged and `TooLarge` returned; the object only
    /// exists once its info record is stored, after the last chunk.
    pub async fn put<S, E>(
        &self,
        new: NewAttachment,
        limit: u64,
        mut body: S,
    ) -> Result<AttachmentMeta, AttachmentError>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        let nuid = uuid::Uuid::now_v7().simple().to_string();
        let chunk_subject = format!("$O.{BUCKET}.C.{nuid}");
        let mut hasher = Sha256::new();
        let mut size: u64 = 0;
        let mut chunks: u64 = 0;
        let mut buf = BytesMut::with_capacity(CHUNK_SIZE);
        let written: Result<(), AttachmentError> = async {
            loop {
                let next = body.next().await;
                let data = match next {
                    Some(Ok(data)) => data,
                    Some(Err(e)) => return Err(AttachmentError::Body(e.to_string())),
                    None => break,
                };
                size += data.len() as u64;
                if size > limit {
                    return Err(AttachmentError::TooLarge { limit });
                }
                hasher.update(&data);
                let mut data = &data[..];
                while !data.is_empty() {
                    let take = (CHUNK_SIZE - buf.len()).min(data.len());
                    buf.extend_from_slice(&data[..take]);
                    data = &data[take..];
                    if buf.len() == CHUNK_SIZE {
                        self.publish_chunk(&chunk_subject, buf.split().freeze())
                            .await?;
                        chunks += 1;
                    }
                }
            }
            if !buf.is_empty() {
                self.publish_chunk(&chunk_subject, buf.split().freeze())
                    .await?;
                chunks += 1;
            }
            Ok(())
        }
        .await;
        if let Err(e) = written {
            self.purge_chunks(&chunk_subject).await;
            return Err(e);
        }
        let digest = hasher.finalize();
        let meta = AttachmentMeta {
            attachment_id: new.attachment_id,
            uploader: new.uploader,
            content_type: new.content_type,
            size,
            sha256: hex::encode(digest),
            filename: new.filename,
            created_at: new.created_at,
            nuid,
            chunks,
        };
        let mut metadata = HashMap::from([
            ("uploader", meta.uploader.to_string()),
            ("content_type", meta.content_type.clone()),
            ("sha256", meta.sha256.clone()),
            (
                "created_at",
                meta.created_at.to_rfc3339_opts(SecondsFormat::Micros, true),
            ),
        ]);
        if let Some(f) = &meta.filename {
            metadata.insert("filename", f.clone());
        }
        let name = meta.attachment_id.to_string();
        let record = InfoRecord {
            bucket: BUCKET,
            nuid: &meta.nuid,
            size,
            chunks,
            mtime: meta.created_at.to_rfc3339_opts(SecondsFormat::Nanos, true),
            digest: format!("SHA-256={}", URL_SAFE.encode(digest)),
            metadata,
            options: Options {
                max_chunk_size: CHUNK_SIZE,
            },
            name: name.clone(),
        };
        let payload =
            serde_json::to_vec(&record).map_err(|e| AttachmentError::Nats(e.to_string()))?;
        let mut headers = HeaderMap::new();
        headers.insert(async_nats::header::NATS_ROLLUP, "sub");
        let subject = format!("$O.{BUCKET}.M.{}", URL_SAFE.encode(&name));
        let stored = async {
            self.js
                .publish_with_headers(subject, headers, payload.into())
                .await
                .map_err(|e| AttachmentError::Nats(e.to_string()))?
                .await
                .map_err(|e| AttachmentError::Nats(e.to_string()))
        }
        .await;
        if let Err(e) = stored {
            self.purge_chunks(&chunk_subject).await;
            return Err(e);
        }
        Ok(meta)
    }

    async fn publish_chunk(&self, subject: &str, chunk: Bytes) -> Result<(), AttachmentError> {
        // One chunk in flight at a time: the ack is the back-pressure that keeps memory flat.
        self.js
            .publish(subject.to_owned(), chunk)
            .await
            .map_err(|e| AttachmentError::Nats(e.to_string()))?
            .await
            .map_err(|e| AttachmentError::Nats(e.to_string()))?;
        Ok(())
    }

    /// Best effort: a failed purge leaves unreachable chunks (no info record names them), which
    /// is logged rather than hiding the upload's own error.
    async fn purge_chunks(&self, subject: &str) {
        if let Err(error) = self.stream.purge().filter(subject).await {
            tracing::warn!(%error, subject, "cannot purge the chunks of an aborted upload");
        }
    }

    /// The attachment's metadata; `NotFound` when it was never stored (or was deleted).
    pub async fn meta(&self, id: AttachmentId) -> Result<AttachmentMeta, AttachmentError> {
        use async_nats::jetstream::object_store::InfoErrorKind;
        let info = match self.store.info(id.to_string()).await {
            Ok(info) => info,
            Err(e) if e.kind() == InfoErrorKind::NotFound => {
                return Err(AttachmentError::NotFound);
            }
            Err(e) => return Err(AttachmentError::Nats(e.to_string())),
        };
        if info.deleted {
            return Err(AttachmentError::NotFound);
        }
        let corrupt = || AttachmentError::Corrupt(id.to_string());
        let get = |k: &str| info.metadata.get(k).cloned().ok_or_else(corrupt);
        Ok(AttachmentMeta {
            attachment_id: id,
            uploader: UserId::parse(&get("uploader")?).map_err(|_| corrupt())?,
            content_type: get("content_type")?,
            size: info.size as u64,
            sha256: get("sha256")?,
            filename: info.metadata.get("filename").cloned(),
            created_at: DateTime::parse_from_rfc3339(&get("created_at")?)
                .map_err(|_| corrupt())?
                .with_timezone(&Utc),
            nuid: info.nuid.clone(),
            chunks: info.chunks as u64,
        })
    }

    /// The attachment's bytes, one chunk fetched per poll (direct gets), so a slow reader
    /// holds at most one chunk.
    pub fn bytes(
        &self,
        meta: &AttachmentMeta,
    ) -> impl Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static {
        let stream = self.stream.clone();
        let subject = format!("$O.{BUCKET}.C.{}", meta.nuid);
        let total = meta.chunks;
        futures::stream::try_unfold((0u64, 1u64), move |(read, next_seq)| {
            let stream = stream.clone();
            let subject = subject.clone();
            async move {
                if read >= total {
                    return Ok(None);
                }
                let msg = stream
                    .direct_get_next_for_subject(subject, Some(next_seq))
                    .await
                    .map_err(std::io::Error::other)?;
                Ok(Some((msg.payload, (read + 1, msg.sequence + 1))))
            }
        })
    }
}
