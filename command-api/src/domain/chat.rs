//! The chat aggregate: who is in it and with which role. Messages are not state: deciding
//! never needs the history, so loading a chat costs its membership, not its length.

use std::collections::BTreeMap;

use parley_nats::Aggregate;
use parley_schemas::events::{
    ChatCreated, MemberRole, MessageSent, MessageSentV2, ParticipantsModified, SealedBody,
};
use parley_schemas::{ChatEvent, ChatId, ChatKind, MessageBody, MessageId, Role, UserId};
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
    },
    ModifyParticipants {
        actor: UserId,
        add: Vec<UserId>,
        remove: Vec<UserId>,
        max_members: usize,
    },
    SendMessage {
        actor: UserId,
        message_id: MessageId,
        body: MessageBody,
        reply_to: Option<MessageId>,
    },
    /// What the API sends since crypto-shredding (ADR 7): the body, validated as a
    /// `MessageBody`, arrives sealed under the message's key (`message_sent.v2`).
    /// `SendMessage` (plaintext `v1`) is kept for the decider's tests and older tooling.
    SendSealedMessage {
        actor: UserId,
        message_id: MessageId,
        body: SealedBody,
        reply_to: Option<MessageId>,
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
}

pub fn decide(state: &Chat, cmd: &ChatCommand) -> Result<Vec<ChatEvent>, Rejection> {
    match (state, cmd) {
        (
            Chat::Absent,
            ChatCommand::Create {
                chat_id,
                creator,
                kind,
                title,
                members,
                max_members,
            },
        ) => create(
            *chat_id,
            *creator,
            *kind,
            title.clone(),
            members,
            *max_members,
        ),
        // Creating what exists is a retry of the same command (the id is pre-minted per
        // command): nothing more to do.
        (Chat::Live { .. }, ChatCommand::Create { .. }) => Ok(Vec::new()),
        (Chat::Absent, _) => Err(Rejection::NotFound),
        (
            Chat::Live { kind, members, .. },
            ChatCommand::ModifyParticipants {
                actor,
                add,
                remove,
                max_members,
            },
        ) => modify(*kind, members, *actor, add, remove, *max_members),
        (
            Chat::Live { members, .. },
            ChatCommand::SendMessage {
                actor,
                message_id,
                body,
                reply_to,
            },
        ) => {
            if !members.contains_key(actor) {
                return Err(Rejection::NotFound);
            }
            Ok(vec![ChatEvent::MessageSent(MessageSent {
                message_id: *message_id,
                sender_id: *actor,
                body: body.as_str().to_owned(),
                reply_to: *reply_to,
                attachments: Vec::new(),
            })])
        }
        (
            Chat::Live { members, .. },
            ChatCommand::SendSealedMessage {
                actor,
                message_id,
                body,
                reply_to,
            },
        ) => {
            if !members.contains_key(actor) {
                return Err(Rejection::NotFound);
            }
            Ok(vec![ChatEvent::MessageSentV2(MessageSentV2 {
                message_id: *message_id,
                sender_id: *actor,
                sealed_body: body.clone(),
                reply_to: *reply_to,
                attachments: Vec::new(),
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
) -> Result<Vec<ChatEvent>, Rejection> {
    let others = dedup_others(members, creator);
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
    })])
}

fn modify(
    kind: ChatKind,
    members: &BTreeMap<UserId, Membership>,
    actor: UserId,
    add: &[UserId],
    remove: &[UserId],
    max_members: usize,
) -> Result<Vec<ChatEvent>, Rejection> {
    let Some(me) = members.get(&actor) else {
        return Err(Rejection::NotFound);
    };
    let added: Vec<UserId> = dedup_others(add, UserId::from_uuid(uuid::Uuid::nil()))
        .into_iter()
        .filter(|u| !members.contains_key(u))
        .collect();
    let mut removed: Vec<UserId> = Vec::new();
    for u in remove {
        if members.contains_key(u) && !removed.contains(u) {
            removed.push(*u);
        }
    }
    let touches_others = !added.is_empty() || removed.iter().any(|u| *u != actor);
    if touches_others && me.role != Role::Admin {
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
    const SNAPSHOT_VERSION: u32 = 1;
    fn evolve(self, event: &ChatEvent) -> Self {
        evolve(self, event)
    }
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
        }
    }

    fn send(actor: UserId) -> ChatCommand {
        ChatCommand::SendMessage {
            actor,
            message_id: MessageId::new(),
            body: MessageBody::parse("hi").unwrap(),
            reply_to: None,
        }
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

    #[derive(Debug, Clone)]
    enum Step {
        Send(usize),
        Add(usize, usize),
        Remove(usize, usize),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            (0..6usize).prop_map(Step::Send),
            (0..6usize, 0..6usize).prop_map(|(a, b)| Step::Add(a, b)),
            (0..6usize, 0..6usize).prop_map(|(a, b)| Step::Remove(a, b)),
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
                ChatEvent::MessageSent(MessageSent { message_id: MessageId::new(), sender_id: a, body: "x".into(), reply_to: None, attachments: vec![] }),
            ];
            let _ = order.iter().fold(Chat::Absent, |s, i| evolve(s, &events[*i]));
        }
    }
}
