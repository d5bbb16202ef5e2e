//! `GET /v1/ws`: checks the `Origin` allowlist and the per-address connection limit,
//! authenticates (header before the upgrade, or a first `auth` frame after it), enforces the
//! per-user connection limit, and hands the socket to its connection task.

use axum::extract::State;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use parley_platform::auth::AuthError;
use parley_platform::{ClientIp, Principal, Problem};
use parley_schemas::frames::ClientFrame;

use crate::connection;
use crate::gateway::AppState;
use crate::registry::Slot;
use crate::stop::{close, code};
use crate::wire::error_frame;

/// Seconds a client over its connection limit is told to wait.
const RETRY_AFTER_SECS: u64 = 5;
/// Read buffer per socket: client frames are acks and typing, far smaller; a larger frame is
/// read in several steps.
const SOCKET_READ_BUFFER: usize = 1024;
/// Bytes a socket gathers before writing when not flushed (a few frames of a replay).
const SOCKET_WRITE_BUFFER: usize = 4 * 1024;

pub(crate) async fn upgrade(
    State(gw): State<AppState>,
    ClientIp(ip): ClientIp,
    headers: HeaderMap,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    if let Some(allowed) = &gw.config.allowed_origins
        && let Some(origin) = headers.get(header::ORIGIN)
        && !origin_allowed(allowed, origin.as_bytes())
    {
        return Problem::new(
            StatusCode::FORBIDDEN,
            "origin-not-allowed",
            "this origin may not open a Parley socket",
        )
        .into_response();
    }
    // Held, like the user's slot, for as long as the connection runs, from before the
    // upgrade: sockets that never authenticate count against their address too.
    let Some(addr_slot) = gw.registry.reserve_addr(ip) else {
        return too_many("this address has too many open connections").into_response();
    };
    let chats_stream = match gw.background().await {
        Ok(bg) => bg.chats.clone(),
        Err(error) => {
            tracing::warn!(%error, "push gateway cannot start");
            return Problem::unavailable("the push gateway cannot reach NATS", 1).into_response();
        }
    };
    let admitted = if headers.contains_key(header::AUTHORIZATION) {
        let principal = match gw.infra.auth.from_headers(&headers).await {
            Ok(p) => p,
            Err(e) => return Problem::from(e).into_response(),
        };
        match gw.registry.reserve(principal.user_id) {
            Some(slot) => Some((principal, slot)),
            None => return too_many("this user has too many open connections").into_response(),
        }
    } else {
        None
    };
    let ws = match ws {
        Ok(ws) => ws,
        Err(rejection) => {
            return Problem::new(rejection.status(), "not-a-websocket", rejection.body_text())
                .into_response();
        }
    };
    let max = gw.config.max_frame_bytes;
    // tungstenite's 128 KiB buffer defaults made an idle socket cost ~150 KiB resident (the read
    // buffer is zeroed before each read): 15,000 sockets, 2.2 GiB. Client frames are small
    // (acks, typing), so a few KiB suffice; larger frames still grow the buffer up to `max`.
    ws.max_message_size(max)
        .max_frame_size(max)
        .read_buffer_size(SOCKET_READ_BUFFER)
        .write_buffer_size(SOCKET_WRITE_BUFFER)
        .on_upgrade(move |mut socket| async move {
            let admitted = match admitted {
                Some(a) => Some(a),
                None => first_frame_auth(&mut socket, &gw).await,
            };
            if let Some((principal, slot)) = admitted {
                // The slot is held for as long as the connection runs.
                connection::run(socket, gw, principal, chats_stream).await;
                drop(slot);
            }
            drop(addr_slot);
        })
}

fn too_many(detail: &'static str) -> Problem {
    let mut p = Problem::new(
        StatusCode::TOO_MANY_REQUESTS,
        "too-many-connections",
        detail,
    );
    p.retry_after = Some(RETRY_AFTER_SECS);
    p
}

/// An origin is serialized as `scheme://host[:port]`; browsers send it lower case, but
/// configuration is typed by people, so the comparison ignores ASCII case.
fn origin_allowed(allowed: &[String], origin: &[u8]) -> bool {
    allowed
        .iter()
        .any(|a| a == "*" || a.as_bytes().eq_ignore_ascii_case(origin))
}

/// For clients that cannot set headers (browsers): the first text frame must be
/// `{"type":"auth","token":…}` within `auth_timeout`.
async fn first_frame_auth(socket: &mut WebSocket, gw: &AppState) -> Option<(Principal, Slot)> {
    let deadline = tokio::time::Instant::now() + gw.config.auth_timeout;
    let shutdown = gw.infra.shutdown.clone();
    let token = loop {
        let frame = tokio::select! {
            _ = shutdown.cancelled() => {
                let _ = socket.send(Message::Close(Some(close(code::GOING_AWAY, "server shutting down")))).await;
                return None;
            }
            f = tokio::time::timeout_at(deadline, socket.recv()) => f,
        };
        match frame {
            Err(_) => {
                return refuse(
                    socket,
                    "unauthorized",
                    "no auth frame in time",
                    code::UNAUTHORIZED,
                )
                .await;
            }
            Ok(None | Some(Err(_)) | Some(Ok(Message::Close(_)))) => return None,
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => continue,
            Ok(Some(Ok(Message::Text(text)))) => match serde_json::from_str(&text) {
                Ok(ClientFrame::Auth { token }) => break token,
                _ => {
                    return refuse(
                        socket,
                        "unauthorized",
                        r#"the first frame must be {"type":"auth","token":"…"}"#,
                        code::UNAUTHORIZED,
                    )
                    .await;
                }
            },
            Ok(Some(Ok(Message::Binary(_)))) => {
                return refuse(
                    socket,
                    "unauthorized",
                    "the first frame must be a JSON text auth frame",
                    code::UNAUTHORIZED,
                )
                .await;
            }
        }
    };
    let principal = match gw.infra.auth.authenticate(&token).await {
        Ok(p) => p,
        Err(AuthError::Unavailable(cause)) => {
            tracing::warn!(%cause, "token check failed");
            return refuse(
                socket,
                "unavailable",
                "session store unavailable; retry",
                code::INTERNAL,
            )
            .await;
        }
        Err(e) => {
            return refuse(socket, "unauthorized", e.to_string(), code::UNAUTHORIZED).await;
        }
    };
    match gw.registry.reserve(principal.user_id) {
        Some(slot) => Some((principal, slot)),
        None => {
            refuse(
                socket,
                "too_many_connections",
                "this user has too many open connections",
                code::TOO_MANY,
            )
            .await
        }
    }
}

/// Sends a final error frame and closes; always `None`, for the caller to return.
async fn refuse<T>(
    socket: &mut WebSocket,
    error: &'static str,
    detail: impl Into<String>,
    close_code: u16,
) -> Option<T> {
    let reason = match close_code {
        code::UNAUTHORIZED => "unauthorized",
        code::TOO_MANY => "too many connections",
        _ => "unavailable",
    };
    let _ = socket.send(Message::Text(error_frame(error, detail))).await;
    let _ = socket
        .send(Message::Close(Some(close(close_code, reason))))
        .await;
    // Read until the client's close reply, so it is not reset before reading ours.
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), async {
        while let Some(Ok(msg)) = socket.next().await {
            if matches!(msg, Message::Close(_)) {
                break;
            }
        }
    })
    .await;
    None
}
