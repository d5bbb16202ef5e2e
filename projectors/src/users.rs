//! The users projection: `users`, `devices`, `member_settings` and `user_blocks` from the
//! `USERS` stream; `users.version` is the per-user checkpoint. A device added to a user who is already in chats starts its cursors at
//! each chat's current sequence: older events are history, not inbox.

use std::time::Duration;

use parley_schemas::UserEvent;
use sqlx::PgPool;

use crate::runner::{Delivered, Disposition, Versions, checkpoint, decode_all};

pub async fn apply(
    pg: &PgPool,
    batch: Vec<Delivered>,
    out_of_order_delay: Duration,
) -> Result<Vec<Disposition>, sqlx::Error> {
    let events = decode_all::<UserEvent>("users", &batch);
    let mut tx = pg.begin().await?;
    let mut versions = Versions::lock(
        &mut tx,
        "SELECT user_id, version FROM users WHERE user_id = ANY($1) ORDER BY user_id FOR UPDATE",
        &events,
        out_of_order_delay,
    )
    .await?;
    let mut out = Vec::with_capacity(events.len());
    for event in &events {
        let (user_id, event) = match versions.admit(event) {
            Ok(admitted) => admitted,
            Err(d) => {
                out.push(d);
                continue;
            }
        };
        let seq = event.meta.sequence as i64;
        match &event.event {
            UserEvent::Registered(r) => {
                sqlx::query(
                    "INSERT INTO users (user_id, handle, display_name, created_at, version) \
                     VALUES ($1, $2, $3, $4, $5) ON CONFLICT (user_id) DO NOTHING",
                )
                .bind(user_id)
                .bind(&r.handle)
                .bind(&r.display_name)
                .bind(event.meta.time)
                .bind(seq)
                .execute(&mut *tx)
                .await?;
            }
            UserEvent::DeviceAdded(d) => {
                sqlx::query(
                    "INSERT INTO devices (device_id, user_id, device_name, platform, created_at) \
                     VALUES ($1, $2, $3, $4, $5) ON CONFLICT (device_id) DO NOTHING",
                )
                .bind(d.device_id.as_uuid())
                .bind(user_id)
                .bind(&d.device_name)
                .bind(&d.platform)
                .bind(event.meta.time)
                .execute(&mut *tx)
                .await?;
                // A new device starts at each chat's sequence as of the moment it was added
                // (never below the membership), not as of now: the chats projection may already
                // hold events of that chat from after the device joined, which it must get.
                // Strictly earlier: times are stored to the microsecond, and an event of the
                // same microsecond is better sent twice (clients drop repeats) than skipped.
                // Only cursors past the membership's start are written: a missing row already
                // means `joined_seq - 1` to every reader. Writing that default too would make
                // the table depend on which projection ran first (a chat created just after the
                // device), so a rebuild, which merges the streams by time, could differ from it.
                sqlx::query(
                    "INSERT INTO device_cursors (device_id, chat_id, acked_up_to) \
                     SELECT $1, m.chat_id, before_device.s \
                     FROM members m, LATERAL ( \
                         SELECT max(s) AS s FROM ( \
                             (SELECT sequence AS s FROM messages x WHERE x.chat_id = m.chat_id \
                              AND x.sent_at < $3 ORDER BY sequence DESC LIMIT 1) \
                             UNION ALL \
                             (SELECT sequence FROM chat_updates u WHERE u.chat_id = m.chat_id \
                              AND (u.at IS NULL OR u.at < $3) ORDER BY sequence DESC LIMIT 1) \
                         ) AS seen) AS before_device \
                     WHERE m.user_id = $2 AND m.left_seq IS NULL \
                       AND before_device.s > m.joined_seq - 1 \
                     ON CONFLICT DO NOTHING",
                )
                .bind(d.device_id.as_uuid())
                .bind(user_id)
                .bind(event.meta.time)
                .execute(&mut *tx)
                .await?;
            }
            UserEvent::DeviceRemoved(d) => {
                sqlx::query("UPDATE devices SET removed_at = $2 WHERE device_id = $1")
                    .bind(d.device_id.as_uuid())
                    .bind(event.meta.time)
                    .execute(&mut *tx)
                    .await?;
            }
            UserEvent::Blocked(b) => {
                sqlx::query(
                    "INSERT INTO user_blocks (user_id, blocked_id, since) VALUES ($1, $2, $3) \
                     ON CONFLICT DO NOTHING",
                )
                .bind(user_id)
                .bind(b.user_id.as_uuid())
                .bind(event.meta.time)
                .execute(&mut *tx)
                .await?;
            }
            UserEvent::Unblocked(b) => {
                sqlx::query("DELETE FROM user_blocks WHERE user_id = $1 AND blocked_id = $2")
                    .bind(user_id)
                    .bind(b.user_id.as_uuid())
                    .execute(&mut *tx)
                    .await?;
            }
            UserEvent::ChatSettingsChanged(c) => {
                sqlx::query(
                    "INSERT INTO member_settings (user_id, chat_id, muted, notify) \
                     VALUES ($1, $2, $3, $4) ON CONFLICT (user_id, chat_id) DO UPDATE \
                     SET muted = EXCLUDED.muted, notify = EXCLUDED.notify",
                )
                .bind(user_id)
                .bind(c.chat_id.as_uuid())
                .bind(c.muted)
                .bind(c.notify.as_str())
                .execute(&mut *tx)
                .await?;
            }
        }
        sqlx::query("UPDATE users SET version = $2 WHERE user_id = $1")
            .bind(user_id)
            .bind(seq)
            .execute(&mut *tx)
            .await?;
        versions.advance(user_id, seq);
        out.push(Disposition::Ack);
    }
    checkpoint(&mut tx, "users", &batch).await?;
    tx.commit().await?;
    Ok(out)
}
