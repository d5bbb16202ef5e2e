//! The chat aggregate: who is in it and with which role, its title and visibility. Messages are
//! not state: deciding never needs the history, so loading a chat costs its membership, not its
//! length.

use std::collections::BTreeMap;

use parley_nats::Aggregate;
use parley_schemas::events::{
    AttachmentRef, ChatCreated, MemberRole, MessageSent, MessageSentV2, ParticipantsModified,
    RoleChanged, SealedBody, TitleChanged,
};
use parley_schemas::{
    ChatEvent, ChatId, ChatKind, ChatTitle, MessageBody, MessageId, Role, UserId, Visibility,
};
use serde::{Deserialize, Serialize};

use super::Rejection;
use super::message::{self, MessageChange, MessageFacts};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Membership {
    pub role: Role,
    /// The chat version at which the user (last) joined: seniority for admin succession.
    pub since: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Chat {
    #[default]
    Absent,
    Live {
        kind: ChatKind,
        members: BTreeMap<UserId, Membership>,
        /// Events applied so far (the aggregate version), kept for seniority.
        version: u64,
        /// Only a channel is ever public: then anyone may add themselves.
        #[serde(default)]
        visibility: Visibility,
        /// A group's or channel's title (a dm has none).
        #[serde(default)]
        title: Option<String>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChatCommand {
    Create {
        chat_id: ChatId,
        creator: UserId,
        kind: ChatKind,
        title: Option<String>,
        /// The others; the creator is always in.
        members: Vec<UserId>,
        max_members: usize,
        visibility: Visibility,
        /// Those of `members` who have blocked the creator (read from their user aggregates).
        blocked_by: Vec<UserId>,
    },
    ModifyParticipants {
        actor: UserId,
        add: Vec<UserId>,
        remove: Vec<UserId>,
        max_members: usize,
        /// Those of `add` who have blocked the actor (read from their user aggregates).
        blocked_by: Vec<UserId>,
    },
    SendMessage {
        actor: UserId,
        message_id: MessageId,
        body: MessageBody,
        reply_to: Option<MessageId>,
        /// Checked by the caller against the read model: a message of this chat in no thread.
        thread_root: Option<MessageId>,
        /// Users the body's `@handle`s name; only current members other than the sender stay.
        mentions: Vec<UserId>,
    },
    ChangeTitle {
        actor: UserId,
        title: ChatTitle,
    },
    ChangeRole {
        actor: UserId,
        user: UserId,
        role: Role,
    },
    /// What the API sends since crypto-shredding (ADR 7): the body, validated as a
    /// `MessageBody`, arrives sealed under the message's key (`message_sent.v2`).
    /// `SendMessage` (plaintext `v1`) is kept for the decider's tests and older tooling.
    SendSealedMessage {
        actor: UserId,
        message_id: MessageId,
        body: SealedBody,
        reply_to: Option<MessageId>,
        /// As for `SendMessage`.
        thread_root: Option<MessageId>,
        /// As for `SendMessage`.
        mentions: Vec<UserId>,
        /// Uploads the caller checked the actor may attach (uploaded them or can already see
        /// them); at most [`MAX_ATTACHMENTS`], each once.
        attachments: Vec<AttachmentRef>,
    },
    /// Edit, delete or react to an existing message, given its facts from the read model.
    ChangeMessage {
        actor: UserId,
        message_id: MessageId,
        /// `None`: no such message in this chat.
        target: Option<MessageFacts>,
        change: MessageChange,
    },
}

impl Chat {
    pub fn is_member(&self, user: UserId) -> bool {
        matches!(self, Chat::Live { members, .. } if members.contains_key(&user))
    }
    pub fn kind(&self) -> Option<ChatKind> {
        match self {
            Chat::Live { kind, .. } => Some(*kind),
            Chat::Absent => None,
        }
    }
    /// A channel anyone may join by adding themselves.
    pub fn is_public(&self) -> bool {
        matches!(
            self,
            Chat::Live {
                visibility: Visibility::Public,
                ..
            }
        )
    }
}

pub fn decide(state: &Chat, cmd: &ChatCommand) -> Result<Vec<ChatEvent>, Rejection> {
    match (state, cmd) {
        // Checked before anything else, so that asking again for an existing dm with someone
        // who has since blocked the creator is refused too; it reads as "no such user".
        (_, ChatCommand::Create { blocked_by, .. }) if !blocked_by.is_empty() => {
            Err(Rejection::NotFound)
        }
        (
            Chat::Absent,
            ChatCommand::Create {
                chat_id,
                creator,
                kind,
                title,
                members,
                max_members,
                visibility,
                blocked_by: _,
            },
        ) => create(
            *chat_id,
            *creator,
            *kind,
            title.clone(),
            members,
            *max_members,
            *visibility,
        ),
        // Creating what exists is a retry of the same command (the id is pre-minted per
        // command): nothing more to do.
        (Chat::Live { .. }, ChatCommand::Create { .. }) => Ok(Vec::new()),
        (Chat::Absent, _) => Err(Rejection::NotFound),
        (
            Chat::Live {
                kind,
                members,
                visibility,
                ..
            },
            ChatCommand::ModifyParticipants {
                actor,
                add,
                remove,
                max_members,
                blocked_by,
            },
        ) => modify(
            *kind,
            *visibility,
            members,
            *actor,
            add,
            remove,
            *max_members,
            blocked_by,
        ),
        (
            Chat::Live { members, .. },
            ChatCommand::SendMessage {
                actor,
                message_id,
                body,
                reply_to,
                thread_root,
                mentions,
            },
        ) => {
            if !members.contains_key(actor) {
                return Err(Rejection::NotFound);
            }
            let mentions = member_mentions(members, mentions, *actor);
            Ok(vec![ChatEvent::MessageSent(MessageSent {
                message_id: *message_id,
                sender_id: *actor,
                body: body.as_str().to_owned(),
                reply_to: *reply_to,
                attachments: Vec::new(),
                thread_root: *thread_root,
                mentions,
            })])
        }
        (
            Chat::Live {
                kind,
                members,
                title: current,
                ..
            },
            ChatCommand::ChangeTitle { actor, title },
        ) => {
            let me = members.get(actor).ok_or(Rejection::NotFound)?;
            if *kind == ChatKind::Dm {
                return Err(Rejection::Invalid("a dm has no title".into()));
            }
            if me.role != Role::Admin {
                return Err(Rejection::Forbidden("only admins change the title"));
            }
            if current.as_deref() == Some(title.as_str()) {
                return Ok(Vec::new());
            }
            Ok(vec![ChatEvent::TitleChanged(TitleChanged {
                title: title.as_str().to_owned(),
            })])
        }
        (Chat::Live { kind, members, .. }, ChatCommand::ChangeRole { actor, user, role }) => {
            change_role(*kind, members, *actor, *user, *role)
        }
        (
            Chat::Live { members, .. },
            ChatCommand::SendSealedMessage {
                actor,
                message_id,
                body,
                reply_to,
                thread_root,
                mentions,
                attachments,
            },
        ) => {
            if !members.contains_key(actor) {
                return Err(Rejection::NotFound);
            }
            check_attachments(attachments)?;
            Ok(vec![ChatEvent::MessageSentV2(MessageSentV2 {
                message_id: *message_id,
                sender_id: *actor,
                sealed_body: body.clone(),
                reply_to: *reply_to,
                attachments: attachments.iter().map(|a| a.attachment_id).collect(),
                thread_root: *thread_root,
                mentions: member_mentions(members, mentions, *actor),
                attachment_details: attachments.clone(),
            })])
        }
        (
            Chat::Live { members, .. },
            ChatCommand::ChangeMessage {
                actor,
                message_id,
                target,
                change,
            },
        ) => message::decide(members, *actor, *message_id, target.as_ref(), change),
    }
}

fn change_role(
    kind: ChatKind,
    members: &BTreeMap<UserId, Membership>,
    actor: UserId,
    user: UserId,
    role: Role,
) -> Result<Vec<ChatEvent>, Rejection> {
    let me = members.get(&actor).ok_or(Rejection::NotFound)?;
    if kind == ChatKind::Dm {
        return Err(Rejection::Invalid("a dm has no roles to change".into()));
    }
    if me.role != Role::Admin {
        return Err(Rejection::Forbidden("only admins change roles"));
    }
    let target = members.get(&user).ok_or(Rejection::NotFound)?;
    if target.role == role {
        return Ok(Vec::new());
    }
    let admins = members.values().filter(|m| m.role == Role::Admin).count();
    if role == Role::Member && admins <= 1 {
        return Err(Rejection::Invalid(
            "a chat keeps at least one admin: make another member admin first".into(),
        ));
    }
    Ok(vec![ChatEvent::RoleChanged(RoleChanged {
        user_id: user,
        role,
    })])
}

/// Only people who can read the message are recorded as mentioned: a handle of a non-member
/// stays plain text.
fn member_mentions(
    members: &BTreeMap<UserId, Membership>,
    named: &[UserId],
    sender: UserId,
) -> Vec<UserId> {
    dedup_others(named, sender)
        .into_iter()
        .filter(|u| members.contains_key(u))
        .collect()
}

fn dedup_others(list: &[UserId], exclude: UserId) -> Vec<UserId> {
    let mut out: Vec<UserId> = Vec::with_capacity(list.len());
    for u in list {
        if *u != exclude && !out.contains(u) {
            out.push(*u);
        }
    }
    out
}

fn create(
    chat_id: ChatId,
    creator: UserId,
    kind: ChatKind,
    title: Option<String>,
    members: &[UserId],
    max_members: usize,
    visibility: Visibility,
) -> Result<Vec<ChatEvent>, Rejection> {
    let others = dedup_others(members, creator);
    if visibility == Visibility::Public && kind != ChatKind::Channel {
        return Err(Rejection::Invalid("only a channel can be public".into()));
    }
    match kind {
        ChatKind::Dm if others.len() != 1 => {
            return Err(Rejection::Invalid(
                "a dm names exactly one other user in members".into(),
            ));
        }
        ChatKind::Dm if title.is_some() => {
            return Err(Rejection::Invalid("a dm has no title".into()));
        }
        _ if others.len() + 1 > max_members => {
            return Err(Rejection::Invalid(format!(
                "a {} holds at most {max_members} members",
                kind.as_str()
            )));
        }
        _ => {}
    }
    let mut list = vec![MemberRole {
        user_id: creator,
        role: Role::Admin,
    }];
    list.extend(others.into_iter().map(|user_id| MemberRole {
        user_id,
        role: Role::Member,
    }));
    Ok(vec![ChatEvent::Created(ChatCreated {
        chat_id,
        kind,
        title,
        members: list,
        visibility,
    })])
}

#[allow(clippy::too_many_arguments)]
fn modify(
    kind: ChatKind,
    visibility: Visibility,
    members: &BTreeMap<UserId, Membership>,
    actor: UserId,
    add: &[UserId],
    remove: &[UserId],
    max_members: usize,
    blocked_by: &[UserId],
) -> Result<Vec<ChatEvent>, Rejection> {
    let added: Vec<UserId> = dedup_others(add, UserId::from_uuid(uuid::Uuid::nil()))
        .into_iter()
        .filter(|u| !members.contains_key(u))
        .collect();
    // A stranger may do exactly one thing: join a public channel by adding only themselves.
    // Anything else from a non-member is about a chat they cannot see.
    let joins_public =
        visibility == Visibility::Public && added == [actor] && remove.iter().all(|u| *u == actor);
    let me = match members.get(&actor) {
        Some(me) => Some(me),
        None if joins_public => None,
        None => return Err(Rejection::NotFound),
    };
    // Someone who blocked the actor reads as nobody the actor can add.
    if added.iter().any(|u| blocked_by.contains(u)) {
        return Err(Rejection::NotFound);
    }
    let mut removed: Vec<UserId> = Vec::new();
    for u in remove {
        if members.contains_key(u) && !removed.contains(u) {
            removed.push(*u);
        }
    }
    let touches_others = added.iter().any(|u| *u != actor) || removed.iter().any(|u| *u != actor);
    if touches_others && me.is_none_or(|m| m.role != Role::Admin) {
        return Err(Rejection::Forbidden("only admins add or remove others"));
    }
    if kind == ChatKind::Dm && (!added.is_empty() || !removed.is_empty()) {
        return Err(Rejection::Invalid(
            "a dm's participants cannot change".into(),
        ));
    }
    if added.is_empty() && removed.is_empty() {
        return Ok(Vec::new());
    }
    let remaining = members.len() + added.len() - removed.len();
    if remaining > max_members {
        return Err(Rejection::Invalid(format!(
            "a {} holds at most {max_members} members",
            kind.as_str()
        )));
    }
    // If no admin would remain, the most senior remaining member becomes one: a chat is never
    // left without someone who can manage it.
    let admins_left = members
        .iter()
        .any(|(u, m)| m.role == Role::Admin && !removed.contains(u));
    let promoted = if admins_left {
        Vec::new()
    } else {
        members
            .iter()
            .filter(|(u, _)| !removed.contains(u))
            .min_by_key(|(u, m)| (m.since, **u))
            .map(|(u, _)| vec![*u])
            .or_else(|| added.first().map(|u| vec![*u]))
            .unwrap_or_default()
    };
    Ok(vec![ChatEvent::ParticipantsModified(
        ParticipantsModified {
            added,
            removed,
            promoted,
        },
    )])
}

pub fn evolve(state: Chat, event: &ChatEvent) -> Chat {
    match (state, event) {
        (Chat::Absent, ChatEvent::Created(c)) => Chat::Live {
            visibility: c.visibility,
            title: c.title.clone(),
            kind: c.kind,
            members: c
                .members
                .iter()
                .map(|m| {
                    (
                        m.user_id,
                        Membership {
                            role: m.role,
                            since: 1,
                        },
                    )
                })
                .collect(),
            version: 1,
        },
        (
            Chat::Live {
                kind,
                mut members,
                version,
                visibility,
                mut title,
            },
            event,
        ) => {
            let version = version + 1;
            match event {
                ChatEvent::ParticipantsModified(p) => {
                    for u in &p.removed {
                        members.remove(u);
                    }
                    for u in &p.added {
                        members.insert(
                            *u,
                            Membership {
                                role: Role::Member,
                                since: version,
                            },
                        );
                    }
                    for u in &p.promoted {
                        if let Some(m) = members.get_mut(u) {
                            m.role = Role::Admin;
                        }
                    }
                }
                ChatEvent::TitleChanged(t) => title = Some(t.title.clone()),
                ChatEvent::RoleChanged(r) => {
                    if let Some(m) = members.get_mut(&r.user_id) {
                        m.role = r.role;
                    }
                }
                // Messages are not aggregate state (see `domain::message`).
                ChatEvent::MessageSent(_)
                | ChatEvent::MessageSentV2(_)
                | ChatEvent::MessageEdited(_)
                | ChatEvent::MessageDeleted(_)
                | ChatEvent::ReactionAdded(_)
                | ChatEvent::ReactionRemoved(_)
                | ChatEvent::Created(_) => {}
            }
            Chat::Live {
                kind,
                members,
                version,
                visibility,
                title,
            }
        }
        // An event before creation cannot happen in a well-formed stream; ignore rather
        // than panic so a damaged stream still loads.
        (Chat::Absent, _) => Chat::Absent,
    }
}

impl Aggregate for Chat {
    type Event = ChatEvent;
    const PREFIX: &'static str = "chats";
    const STREAM: &'static str = parley_nats::streams::CHATS;
    // 2: title and visibility joined the state; older snapshots would lack a creation title.
    const SNAPSHOT_VERSION: u32 = 2;
    fn evolve(self, event: &ChatEvent) -> Self {
        evolve(self, event)
    }
}

/// Most attachments one message may carry (API.md).
pub const MAX_ATTACHMENTS: usize = 10;

/// At most [`MAX_ATTACHMENTS`], none twice: a message lists each file once.
fn check_attachments(attachments: &[AttachmentRef]) -> Result<(), Rejection> {
    if attachments.len() > MAX_ATTACHMENTS {
        return Err(Rejection::Invalid(format!(
            "at most {MAX_ATTACHMENTS} attachments"
        )));
    }
    let mut seen = std::collections::BTreeSet::new();
    if !attachments.iter().all(|a| seen.insert(a.attachment_id)) {
        return Err(Rejection::Invalid("an attachment is listed twice".into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn users(n: usize) -> Vec<UserId> {
        (0..n).map(|_| UserId::new()).collect()
    }

    fn given(events: &[ChatEvent]) -> Chat {
        events.iter().fold(Chat::Absent, evolve)
    }

    fn group_of(creator: UserId, others: &[UserId]) -> ChatEvent {
        decide(
            &Chat::Absent,
            &ChatCommand::Create {
                chat_id: ChatId::new(),
                creator,
                kind: ChatKind::Group,
                title: Some("t".into()),
                members: others.to_vec(),
                max_members: 100,
                visibility: Visibility::Private,
                blocked_by: vec![],
            },
        )
        .unwrap()
        .remove(0)
    }

    fn modify_cmd(actor: UserId, add: &[UserId], remove: &[UserId]) -> ChatCommand {
        ChatCommand::ModifyParticipants {
            actor,
            add: add.to_vec(),
            remove: remove.to_vec(),
            max_members: 5,
            blocked_by: vec![],
        }
    }

    fn send(actor: UserId) -> ChatCommand {
        ChatCommand::SendMessage {
            actor,
            message_id: MessageId::new(),
            body: MessageBody::parse("hi").unwrap(),
            reply_to: None,
            thread_root: None,
            mentions: vec![],
        }
    }

    fn attachment(name: &str) -> AttachmentRef {
        AttachmentRef {
            attachment_id: parley_schemas::AttachmentId::new(),
            content_type: "image/png".into(),
            size: 12,
            filename: Some(name.into()),
            sha256: "00".repeat(32),
        }
    }

    fn send_with(actor: UserId, attachments: Vec<AttachmentRef>) -> ChatCommand {
        ChatCommand::SendSealedMessage {
            actor,
            message_id: MessageId::new(),
            body: SealedBody {
                alg: "xchacha20poly1305".into(),
                nonce: "AA==".into(),
                ciphertext: "AA==".into(),
                key: None,
            },
            reply_to: None,
            thread_root: None,
            mentions: vec![],
            attachments,
        }
    }

    #[test]
    fn a_sealed_message_carries_its_attachments_ids_and_metadata_in_order() {
        let [a, b] = users(2)[..] else { unreachable!() };
        let chat = given(&[group_of(a, &[b])]);
        let files = vec![attachment("one.png"), attachment("two.png")];
        let events = decide(&chat, &send_with(a, files.clone())).unwrap();
        let [ChatEvent::MessageSentV2(m)] = &events[..] else {
            panic!("not one message: {events:?}")
        };
        assert_eq!(
            m.attachments,
            files.iter().map(|f| f.attachment_id).collect::<Vec<_>>()
        );
        assert_eq!(m.attachment_details, files);
    }

    #[test]
    fn a_message_with_eleven_attachments_is_rejected() {
        let [a, b] = users(2)[..] else { unreachable!() };
        let chat = given(&[group_of(a, &[b])]);
        let ten = (0..10).map(|i| attachment(&format!("{i}.png"))).collect();
        assert!(decide(&chat, &send_with(a, ten)).is_ok());
        let eleven = (0..11).map(|i| attachment(&format!("{i}.png"))).collect();
        assert!(matches!(
            decide(&chat, &send_with(a, eleven)),
            Err(Rejection::Invalid(_))
        ));
    }

    #[test]
    fn a_message_listing_one_attachment_twice_is_rejected() {
        let [a, b] = users(2)[..] else { unreachable!() };
        let chat = given(&[group_of(a, &[b])]);
        let file = attachment("a.png");
        assert!(matches!(
            decide(&chat, &send_with(a, vec![file.clone(), file])),
            Err(Rejection::Invalid(_))
        ));
    }

    #[test]
    fn a_non_member_cannot_send_attachments() {
        let [a, b, stranger] = users(3)[..] else {
            unreachable!()
        };
        let chat = given(&[group_of(a, &[b])]);
        assert_eq!(
            decide(&chat, &send_with(stranger, vec![attachment("a.png")])),
            Err(Rejection::NotFound)
        );
    }

    #[test]
    fn create_makes_the_creator_admin_and_drops_duplicates_and_self() {
        let [a, b] = users(2)[..] else { unreachable!() };
        let ChatEvent::Created(c) = group_of(a, &[b, b, a]) else {
            panic!("not a creation")
        };
        assert_eq!(
            c.members,
            vec![
                MemberRole {
                    user_id: a,
                    role: Role::Admin
                },
                MemberRole {
                    user_id: b,
                    role: Role::Member
                }
            ]
        );
    }

    #[test]
    fn a_dm_names_exactly_one_other_user_and_has_no_title() {
        let [a, b, c] = users(3)[..] else {
            unreachable!()
        };
        let dm = |members: Vec<UserId>, title: Option<String>| {
            decide(
                &Chat::Absent,
                &ChatCommand::Create {
                    chat_id: ChatId::new(),
                    creator: a,
                    kind: ChatKind::Dm,
                    title,
                    members,
                    max_members: 2,
                    visibility: Visibility::Private,
                    blocked_by: vec![],
                },
            )
        };
        assert!(dm(vec![b], None).is_ok());
        assert!(matches!(dm(vec![b, c], None), Err(Rejection::Invalid(_))));
        assert!(matches!(dm(vec![a], None), Err(Rejection::Invalid(_))));
        assert!(matches!(
            dm(vec![b], Some("x".into())),
            Err(Rejection::Invalid(_))
        ));
    }

    #[test]
    fn create_over_the_member_limit_is_invalid() {
        let a = UserId::new();
        let res = decide(
            &Chat::Absent,
            &ChatCommand::Create {
                chat_id: ChatId::new(),
                creator: a,
                kind: ChatKind::Group,
                title: None,
                members: users(3),
                max_members: 3,
                visibility: Visibility::Private,
                blocked_by: vec![],
            },
        );
        assert!(matches!(res, Err(Rejection::Invalid(_))));
    }

    #[test]
    fn creating_an_existing_chat_again_changes_nothing() {
        let a = UserId::new();
        let state = given(&[group_of(a, &[])]);
        let again = ChatCommand::Create {
            chat_id: ChatId::new(),
            creator: a,
            kind: ChatKind::Group,
            title: None,
            members: vec![],
            max_members: 100,
            visibility: Visibility::Private,
            blocked_by: vec![],
        };
        assert_eq!(decide(&state, &again), Ok(vec![]));
    }

    #[test]
    fn only_members_send_and_non_members_get_not_found() {
        let [a, b, outsider] = users(3)[..] else {
            unreachable!()
        };
        let state = given(&[group_of(a, &[b])]);
        assert!(decide(&state, &send(b)).is_ok());
        assert_eq!(decide(&state, &send(outsider)), Err(Rejection::NotFound));
        assert_eq!(decide(&Chat::Absent, &send(a)), Err(Rejection::NotFound));
    }

    #[test]
    fn only_admins_add_or_remove_others_but_anyone_may_leave() {
        let [a, b, c, d] = users(4)[..] else {
            unreachable!()
        };
        let state = given(&[group_of(a, &[b, c])]);
        assert!(matches!(
            decide(&state, &modify_cmd(b, &[d], &[])),
            Err(Rejection::Forbidden(_))
        ));
        assert!(matches!(
            decide(&state, &modify_cmd(b, &[], &[c])),
            Err(Rejection::Forbidden(_))
        ));
        assert!(decide(&state, &modify_cmd(b, &[], &[b])).is_ok());
        assert!(decide(&state, &modify_cmd(a, &[d], &[c])).is_ok());
        assert_eq!(
            decide(&state, &modify_cmd(d, &[], &[d])),
            Err(Rejection::NotFound)
        );
    }

    #[test]
    fn adding_members_already_in_and_removing_strangers_changes_nothing() {
        let [a, b, stranger] = users(3)[..] else {
            unreachable!()
        };
        let state = given(&[group_of(a, &[b])]);
        assert_eq!(
            decide(&state, &modify_cmd(a, &[b], &[stranger])),
            Ok(vec![])
        );
    }

    #[test]
    fn modify_over_the_member_limit_is_invalid() {
        let a = UserId::new();
        let state = given(&[group_of(a, &users(3))]);
        assert!(matches!(
            decide(&state, &modify_cmd(a, &users(2), &[])),
            Err(Rejection::Invalid(_))
        ));
        assert!(decide(&state, &modify_cmd(a, &users(1), &[])).is_ok());
    }

    #[test]
    fn when_the_last_admin_leaves_the_most_senior_member_is_promoted() {
        let [a, b, c] = users(3)[..] else {
            unreachable!()
        };
        let created = group_of(a, &[b]);
        let state = given(std::slice::from_ref(&created));
        let add_c = decide(&state, &modify_cmd(a, &[c], &[])).unwrap();
        let state = given(&[created, add_c[0].clone()]);
        let leave = decide(&state, &modify_cmd(a, &[], &[a])).unwrap();
        let ChatEvent::ParticipantsModified(p) = &leave[0] else {
            panic!()
        };
        assert_eq!(p.promoted, vec![b]);
        let state = evolve(state, &leave[0]);
        let Chat::Live { members, .. } = &state else {
            panic!()
        };
        assert_eq!(members[&b].role, Role::Admin);
        // b, now admin, may add people.
        assert!(decide(&state, &modify_cmd(b, &[a], &[])).is_ok());
    }

    #[test]
    fn a_dm_cannot_gain_or_lose_participants() {
        let [a, b, c] = users(3)[..] else {
            unreachable!()
        };
        let created = decide(
            &Chat::Absent,
            &ChatCommand::Create {
                chat_id: ChatId::new(),
                creator: a,
                kind: ChatKind::Dm,
                title: None,
                members: vec![b],
                max_members: 2,
                visibility: Visibility::Private,
                blocked_by: vec![],
            },
        )
        .unwrap();
        let state = given(&created);
        assert!(matches!(
            decide(&state, &modify_cmd(a, &[c], &[])),
            Err(Rejection::Invalid(_))
        ));
    }

    #[test]
    fn a_removed_member_can_no_longer_send() {
        let [a, b] = users(2)[..] else { unreachable!() };
        let created = group_of(a, &[b]);
        let state = given(std::slice::from_ref(&created));
        let kick = decide(&state, &modify_cmd(a, &[], &[b])).unwrap();
        let state = given(&[created, kick[0].clone()]);
        assert_eq!(decide(&state, &send(b)), Err(Rejection::NotFound));
    }

    fn channel_of(creator: UserId, others: &[UserId], visibility: Visibility) -> ChatEvent {
        decide(
            &Chat::Absent,
            &ChatCommand::Create {
                chat_id: ChatId::new(),
                creator,
                kind: ChatKind::Channel,
                title: Some("news".into()),
                members: others.to_vec(),
                max_members: 100_000,
                visibility,
                blocked_by: vec![],
            },
        )
        .unwrap()
        .remove(0)
    }

    fn title(actor: UserId, t: &str) -> ChatCommand {
        ChatCommand::ChangeTitle {
            actor,
            title: ChatTitle::parse(t).unwrap(),
        }
    }

    fn role(actor: UserId, user: UserId, role: Role) -> ChatCommand {
        ChatCommand::ChangeRole { actor, user, role }
    }

    #[test]
    fn only_a_channel_can_be_public() {
        let a = UserId::new();
        for kind in [ChatKind::Group, ChatKind::Dm] {
            let res = decide(
                &Chat::Absent,
                &ChatCommand::Create {
                    chat_id: ChatId::new(),
                    creator: a,
                    kind,
                    title: None,
                    members: vec![UserId::new()],
                    max_members: 100,
                    visibility: Visibility::Public,
                    blocked_by: vec![],
                },
            );
            assert!(matches!(res, Err(Rejection::Invalid(_))), "{kind:?}");
        }
        let ChatEvent::Created(c) = channel_of(a, &[], Visibility::Public) else {
            panic!("not a creation")
        };
        assert_eq!(c.visibility, Visibility::Public);
    }

    #[test]
    fn anyone_may_join_a_public_channel_by_adding_only_themselves() {
        let [a, stranger, other] = users(3)[..] else {
            unreachable!()
        };
        let state = given(&[channel_of(a, &[], Visibility::Public)]);
        let join = decide(&state, &modify_cmd(stranger, &[stranger], &[])).unwrap();
        assert_eq!(
            join,
            vec![ChatEvent::ParticipantsModified(ParticipantsModified {
                added: vec![stranger],
                removed: vec![],
                promoted: vec![],
            })]
        );
        let state = evolve(state, &join[0]);
        assert!(state.is_member(stranger));
        // Joined as a plain member: adding others still takes an admin.
        assert!(matches!(
            decide(&state, &modify_cmd(stranger, &[other], &[])),
            Err(Rejection::Forbidden(_))
        ));
    }

    #[test]
    fn a_stranger_cannot_join_a_private_channel_or_group_nor_bring_others_into_a_public_one() {
        let [a, stranger, other] = users(3)[..] else {
            unreachable!()
        };
        for created in [channel_of(a, &[], Visibility::Private), group_of(a, &[])] {
            let state = given(&[created]);
            assert_eq!(
                decide(&state, &modify_cmd(stranger, &[stranger], &[])),
                Err(Rejection::NotFound)
            );
        }
        let public = given(&[channel_of(a, &[], Visibility::Public)]);
        assert_eq!(
            decide(&public, &modify_cmd(stranger, &[stranger, other], &[])),
            Err(Rejection::NotFound)
        );
        assert_eq!(
            decide(&public, &modify_cmd(stranger, &[other], &[])),
            Err(Rejection::NotFound)
        );
    }

    #[test]
    fn joining_a_full_public_channel_is_invalid() {
        let [a, b, stranger] = users(3)[..] else {
            unreachable!()
        };
        let state = given(&[channel_of(a, &[b], Visibility::Public)]);
        let cmd = ChatCommand::ModifyParticipants {
            actor: stranger,
            add: vec![stranger],
            remove: vec![],
            max_members: 2,
            blocked_by: vec![],
        };
        assert!(matches!(decide(&state, &cmd), Err(Rejection::Invalid(_))));
    }

    #[test]
    fn nobody_can_add_or_open_a_dm_with_a_user_who_blocked_them() {
        let [a, b, blocker] = users(3)[..] else {
            unreachable!()
        };
        let state = given(&[group_of(a, &[b])]);
        let add = ChatCommand::ModifyParticipants {
            actor: a,
            add: vec![blocker],
            remove: vec![],
            max_members: 5,
            blocked_by: vec![blocker],
        };
        assert_eq!(decide(&state, &add), Err(Rejection::NotFound));
        for existing in [Chat::Absent, state] {
            let dm = ChatCommand::Create {
                chat_id: ChatId::new(),
                creator: a,
                kind: ChatKind::Dm,
                title: None,
                members: vec![blocker],
                max_members: 2,
                visibility: Visibility::Private,
                blocked_by: vec![blocker],
            };
            assert_eq!(decide(&existing, &dm), Err(Rejection::NotFound));
        }
    }

    #[test]
    fn mentions_keep_only_current_members_other_than_the_sender_once_each() {
        let [a, b, outsider] = users(3)[..] else {
            unreachable!()
        };
        let state = given(&[group_of(a, &[b])]);
        let cmd = ChatCommand::SendMessage {
            actor: a,
            message_id: MessageId::new(),
            body: MessageBody::parse("@b @b @outsider @a").unwrap(),
            reply_to: None,
            thread_root: None,
            mentions: vec![b, b, outsider, a],
        };
        let [ChatEvent::MessageSent(m)] = &decide(&state, &cmd).unwrap()[..] else {
            panic!("not one message")
        };
        assert_eq!(m.mentions, vec![b]);
    }

    #[test]
    fn a_thread_reply_records_its_root() {
        let a = UserId::new();
        let state = given(&[group_of(a, &[])]);
        let root = MessageId::new();
        let cmd = ChatCommand::SendMessage {
            actor: a,
            message_id: MessageId::new(),
            body: MessageBody::parse("in thread").unwrap(),
            reply_to: None,
            thread_root: Some(root),
            mentions: vec![],
        };
        let [ChatEvent::MessageSent(m)] = &decide(&state, &cmd).unwrap()[..] else {
            panic!("not one message")
        };
        assert_eq!(m.thread_root, Some(root));
    }

    #[test]
    fn only_admins_change_the_title_a_dm_has_none_and_the_same_title_changes_nothing() {
        let [a, b] = users(2)[..] else { unreachable!() };
        let state = given(&[group_of(a, &[b])]);
        assert!(matches!(
            decide(&state, &title(b, "x")),
            Err(Rejection::Forbidden(_))
        ));
        let changed = decide(&state, &title(a, "renamed")).unwrap();
        assert_eq!(
            changed,
            vec![ChatEvent::TitleChanged(TitleChanged {
                title: "renamed".into()
            })]
        );
        let state = evolve(state, &changed[0]);
        assert_eq!(decide(&state, &title(a, "renamed")), Ok(vec![]));
        assert_eq!(
            decide(&state, &title(UserId::new(), "x")),
            Err(Rejection::NotFound)
        );
        let dm = decide(
            &Chat::Absent,
            &ChatCommand::Create {
                chat_id: ChatId::new(),
                creator: a,
                kind: ChatKind::Dm,
                title: None,
                members: vec![b],
                max_members: 2,
                visibility: Visibility::Private,
                blocked_by: vec![],
            },
        )
        .unwrap();
        assert!(matches!(
            decide(&given(&dm), &title(a, "x")),
            Err(Rejection::Invalid(_))
        ));
    }

    #[test]
    fn only_admins_change_roles_of_members() {
        let [a, b, c] = users(3)[..] else {
            unreachable!()
        };
        let state = given(&[group_of(a, &[b, c])]);
        assert!(matches!(
            decide(&state, &role(b, c, Role::Admin)),
            Err(Rejection::Forbidden(_))
        ));
        assert_eq!(
            decide(&state, &role(a, UserId::new(), Role::Admin)),
            Err(Rejection::NotFound)
        );
        assert_eq!(
            decide(&state, &role(UserId::new(), b, Role::Admin)),
            Err(Rejection::NotFound)
        );
        let promote = decide(&state, &role(a, b, Role::Admin)).unwrap();
        let state = evolve(state, &promote[0]);
        // b is an admin now, and may demote the creator; repeating a role changes nothing.
        assert_eq!(decide(&state, &role(b, b, Role::Admin)), Ok(vec![]));
        let demote = decide(&state, &role(b, a, Role::Member)).unwrap();
        assert_eq!(
            demote,
            vec![ChatEvent::RoleChanged(RoleChanged {
                user_id: a,
                role: Role::Member
            })]
        );
        let state = evolve(state, &demote[0]);
        assert!(matches!(
            decide(&state, &role(a, c, Role::Admin)),
            Err(Rejection::Forbidden(_))
        ));
    }

    #[test]
    fn the_last_admin_cannot_be_demoted() {
        let [a, b] = users(2)[..] else { unreachable!() };
        let state = given(&[group_of(a, &[b])]);
        assert!(matches!(
            decide(&state, &role(a, a, Role::Member)),
            Err(Rejection::Invalid(_))
        ));
    }

    #[derive(Debug, Clone)]
    enum Step {
        Send(usize),
        Add(usize, usize),
        Remove(usize, usize),
        Promote(usize, usize),
        Demote(usize, usize),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            (0..6usize).prop_map(Step::Send),
            (0..6usize, 0..6usize).prop_map(|(a, b)| Step::Add(a, b)),
            (0..6usize, 0..6usize).prop_map(|(a, b)| Step::Remove(a, b)),
            (0..6usize, 0..6usize).prop_map(|(a, b)| Step::Promote(a, b)),
            (0..6usize, 0..6usize).prop_map(|(a, b)| Step::Demote(a, b)),
        ]
    }

    proptest! {
        /// Whatever commands arrive: evolve never panics, accepted commands bump the version by
        /// exactly their event count, membership never exceeds the limit, and a non-empty chat
        /// always has an admin.
        #[test]
        fn invariants_hold_under_any_command_sequence(steps in proptest::collection::vec(step(), 0..60)) {
            let people = users(6);
            let created = group_of(people[0], &people[1..3]);
            let mut state = given(&[created]);
            let mut version = 1u64;
            for s in steps {
                let cmd = match s {
                    Step::Send(a) => send(people[a]),
                    Step::Add(a, b) => modify_cmd(people[a], &[people[b]], &[]),
                    Step::Remove(a, b) => modify_cmd(people[a], &[], &[people[b]]),
                    Step::Promote(a, b) => role(people[a], people[b], Role::Admin),
                    Step::Demote(a, b) => role(people[a], people[b], Role::Member),
                };
                if let Ok(events) = decide(&state, &cmd) {
                    for e in &events {
                        state = evolve(state, e);
                    }
                    version += events.len() as u64;
                }
                let Chat::Live { members, version: v, .. } = &state else {
                    panic!("a created chat never becomes absent")
                };
                prop_assert_eq!(*v, version);
                prop_assert!(members.len() <= 5, "over the limit of 5");
                if !members.is_empty() {
                    prop_assert!(members.values().any(|m| m.role == Role::Admin));
                }
            }
        }

        #[test]
        fn evolve_never_panics_on_arbitrary_event_orders(order in proptest::collection::vec(0..3usize, 0..20)) {
            let a = UserId::new();
            let events = [
                group_of(a, &[]),
                ChatEvent::ParticipantsModified(ParticipantsModified { added: vec![UserId::new()], removed: vec![a], promoted: vec![] }),
                ChatEvent::MessageSent(MessageSent { message_id: MessageId::new(), sender_id: a, body: "x".into(), reply_to: None, attachments: vec![], thread_root: None, mentions: vec![] }),
            ];
            let _ = order.iter().fold(Chat::Absent, |s, i| evolve(s, &events[*i]));
        }
    }
}
