//! Reads of `users` and `devices`: who the caller is, and whom it may see.

use chrono::{DateTime, Utc};
use parley_schemas::{DeviceId, UserId};
use sqlx::{FromRow, PgPool};
use uuid::Uuid;

use crate::me::{DeviceView, MeView};

#[derive(FromRow)]
struct UserRow {
    user_id: Uuid,
    handle: String,
    display_name: String,
}

#[derive(FromRow)]
struct DeviceRow {
    device_id: Uuid,
    device_name: String,
    platform: Option<String>,
    created_at: DateTime<Utc>,
}

/// The user with its active devices, oldest first; `None` while the user is not projected.
pub(crate) async fn me(pg: &PgPool, user: UserId) -> Result<Option<MeView>, sqlx::Error> {
    let mut tx = super::snapshot(pg).await?;
    let row: Option<UserRow> =
        sqlx::query_as("SELECT user_id, handle, display_name FROM users WHERE user_id = $1")
            .bind(user.as_uuid())
            .fetch_optional(&mut *tx)
            .await?;
    let Some(row) = row else {
        return Ok(None);
    };
    let devices: Vec<DeviceRow> = sqlx::query_as(
        "SELECT device_id, device_name, platform, created_at FROM devices \
         WHERE user_id = $1 AND removed_at IS NULL ORDER BY created_at, device_id",
    )
    .bind(user.as_uuid())
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Some(MeView {
        user_id: UserId::from_uuid(row.user_id),
        handle: row.handle,
        display_name: row.display_name,
        devices: devices
            .into_iter()
            .map(|d| DeviceView {
                device_id: DeviceId::from_uuid(d.device_id),
                device_name: d.device_name,
                platform: d.platform,
                created_at: d.created_at,
            })
            .collect(),
    }))
}

/// Whether `a` and `b` are both current members of some chat: who may see whose presence.
pub(crate) async fn share_a_chat(pg: &PgPool, a: UserId, b: UserId) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM members x JOIN members y ON y.chat_id = x.chat_id \
         WHERE x.user_id = $1 AND y.user_id = $2 AND x.left_seq IS NULL AND y.left_seq IS NULL)",
    )
    .bind(a.as_uuid())
    .bind(b.as_uuid())
    .fetch_one(pg)
    .await
}
