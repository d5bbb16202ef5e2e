//! Decisions about one existing message of a chat: edit, delete for everyone, reactions.
//!
//! The chat aggregate holds no per-message state (a chat may hold millions of messages and its
//! snapshot must stay small), so a command carries the target message's facts, read from the
//! read model at exactly the aggregate version the command is decided at
//! (`EventStore::execute_at`): a concurrent change makes the append conflict and the command
//! is decided again on fresh facts.

use std::collections::{BTreeMap, BTreeSet};

use parley_schemas::events::{MessageDeleted, MessageEdited, Reaction, SealedBody};
use parley_schemas::{ChatEvent, Emoji, MessageId, Role, UserId};

use super::Rejection;
use super::chat::Membership;

/// Most distinct emoji one message may carry.
pub const MAX_DISTINCT_REACTIONS: usize = 20;

/// What the read model says about the message a command targets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageFacts {
    pub sender_id: UserId,
    pub deleted: bool,
    /// The distinct emoji on the message.
    pub emoji: BTreeSet<String>,
    /// The emoji the command's actor has put on it.
    pub mine: BTreeSet<String>,
}

/// A change to one existing message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MessageChange {
    /// Sender only; the new body, validated as a send's, sealed under the message's key.
    Edit { body: SealedBody },
    /// Sender or admin.
    Delete,
    /// Any member; already reacted with it changes nothing.
    React { emoji: Emoji, max_distinct: usize },
    /// Any member; not reacted with it changes nothing.
    Unreact { emoji: Emoji },
}

/// Decides `change` by `actor` on message `message_id`, whose facts are `target` (`None`: no
/// such message in this chat).
pub fn decide(
    members: &BTreeMap<UserId, Membership>,
    actor: UserId,
    message_id: MessageId,
    target: Option<&MessageFacts>,
    change: &MessageChange,
) -> Result<Vec<ChatEvent>, Rejection> {
    let Some(me) = members.get(&actor) else {
        return Err(Rejection::NotFound);
    };
    let Some(target) = target else {
        return Err(Rejection::NotFound);
    };
    match change {
        MessageChange::Edit { body } => {
            if target.sender_id != actor {
                return Err(Rejection::Forbidden("only the sender edits a message"));
            }
            if target.deleted {
                return Err(Rejection::Conflict("the message is deleted"));
            }
            Ok(vec![ChatEvent::MessageEdited(MessageEdited {
                message_id,
                sealed_body: body.clone(),
            })])
        }
        MessageChange::Delete => {
            if target.sender_id != actor && me.role != Role::Admin {
                return Err(Rejection::Forbidden(
                    "only the sender or an admin deletes a message",
                ));
            }
            if target.deleted {
                return Err(Rejection::Conflict("the message is already deleted"));
            }
            Ok(vec![ChatEvent::MessageDeleted(MessageDeleted {
                message_id,
            })])
        }
        MessageChange::React {
            emoji,
            max_distinct,
        } => {
            if target.deleted {
                return Err(Rejection::Conflict("the message is deleted"));
            }
            if target.mine.contains(emoji.as_str()) {
                return Ok(Vec::new());
            }
            if !target.emoji.contains(emoji.as_str()) && target.emoji.len() >= *max_distinct {
                return Err(Rejection::Invalid(format!(
                    "a message carries at most {max_distinct} distinct reactions"
                )));
            }
            Ok(vec![ChatEvent::ReactionAdded(Reaction {
                message_id,
                emoji: emoji.as_str().to_owned(),
                user_id: actor,
            })])
        }
        MessageChange::Unreact { emoji } => {
            if target.deleted {
                return Err(Rejection::Conflict("the message is deleted"));
            }
            if !target.mine.contains(emoji.as_str()) {
                return Ok(Vec::new());
            }
            Ok(vec![ChatEvent::ReactionRemoved(Reaction {
                message_id,
                emoji: emoji.as_str().to_owned(),
                user_id: actor,
            })])
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::domain::chat::{Chat, ChatCommand, decide as decide_chat, evolve};
    use parley_schemas::events::{ChatCreated, MemberRole};
    use parley_schemas::{ChatId, ChatKind};

    struct Given {
        chat: Chat,
        admin: UserId,
        alice: UserId,
        bob: UserId,
    }

    /// A group of an admin, alice and bob.
    fn given() -> Given {
        let (admin, alice, bob) = (UserId::new(), UserId::new(), UserId::new());
        let created = ChatEvent::Created(ChatCreated {
            chat_id: ChatId::new(),
            kind: ChatKind::Group,
            title: None,
            visibility: Default::default(),
            members: vec![
                MemberRole {
                    user_id: admin,
                    role: Role::Admin,
                },
                MemberRole {
                    user_id: alice,
                    role: Role::Member,
                },
                MemberRole {
                    user_id: bob,
                    role: Role::Member,
                },
            ],
        });
        Given {
            chat: evolve(Chat::Absent, &created),
            admin,
            alice,
            bob,
        }
    }

    fn sent_by(sender: UserId) -> MessageFacts {
        MessageFacts {
            sender_id: sender,
            deleted: false,
            emoji: BTreeSet::new(),
            mine: BTreeSet::new(),
        }
    }

    fn sealed() -> SealedBody {
        SealedBody {
            alg: "xchacha20poly1305".into(),
            nonce: "n".into(),
            ciphertext: "c".into(),
            key: None,
        }
    }

    fn when(
        g: &Given,
        actor: UserId,
        target: Option<MessageFacts>,
        change: MessageChange,
    ) -> Result<Vec<ChatEvent>, Rejection> {
        decide_chat(
            &g.chat,
            &ChatCommand::ChangeMessage {
                actor,
                message_id: MessageId::new(),
                target,
                change,
            },
        )
    }

    fn emoji(s: &str) -> Emoji {
        Emoji::parse(s).unwrap()
    }

    fn react(s: &str) -> MessageChange {
        MessageChange::React {
            emoji: emoji(s),
            max_distinct: 3,
        }
    }

    #[test]
    fn the_sender_edits_and_the_event_carries_the_sealed_body() {
        let g = given();
        let events = when(
            &g,
            g.alice,
            Some(sent_by(g.alice)),
            MessageChange::Edit { body: sealed() },
        )
        .unwrap();
        assert!(matches!(&events[..], [ChatEvent::MessageEdited(e)] if e.sealed_body == sealed()));
    }

    #[test]
    fn another_member_may_not_edit_and_a_non_member_gets_not_found() {
        let g = given();
        let edit = || MessageChange::Edit { body: sealed() };
        assert!(matches!(
            when(&g, g.bob, Some(sent_by(g.alice)), edit()),
            Err(Rejection::Forbidden(_))
        ));
        assert!(matches!(
            when(&g, g.admin, Some(sent_by(g.alice)), edit()),
            Err(Rejection::Forbidden(_))
        ));
        assert_eq!(
            when(&g, UserId::new(), Some(sent_by(g.alice)), edit()),
            Err(Rejection::NotFound)
        );
        assert_eq!(when(&g, g.alice, None, edit()), Err(Rejection::NotFound));
    }

    #[test]
    fn a_deleted_message_cannot_be_edited_reacted_to_or_deleted_again() {
        let g = given();
        let mut gone = sent_by(g.alice);
        gone.deleted = true;
        for change in [
            MessageChange::Edit { body: sealed() },
            MessageChange::Delete,
            react("👍"),
            MessageChange::Unreact {
                emoji: emoji("👍")
            },
        ] {
            assert!(
                matches!(
                    when(&g, g.alice, Some(gone.clone()), change.clone()),
                    Err(Rejection::Conflict(_))
                ),
                "{change:?}"
            );
        }
    }

    #[test]
    fn the_sender_or_an_admin_deletes_but_another_member_may_not() {
        let g = given();
        for actor in [g.alice, g.admin] {
            let events = when(&g, actor, Some(sent_by(g.alice)), MessageChange::Delete).unwrap();
            assert!(matches!(&events[..], [ChatEvent::MessageDeleted(_)]));
        }
        assert!(matches!(
            when(&g, g.bob, Some(sent_by(g.alice)), MessageChange::Delete),
            Err(Rejection::Forbidden(_))
        ));
    }

    #[test]
    fn reacting_twice_with_the_same_emoji_changes_nothing() {
        let g = given();
        let mut facts = sent_by(g.alice);
        let first = when(&g, g.bob, Some(facts.clone()), react("👍")).unwrap();
        assert!(
            matches!(&first[..], [ChatEvent::ReactionAdded(r)] if r.user_id == g.bob && r.emoji == "👍")
        );
        facts.emoji.insert("👍".into());
        facts.mine.insert("👍".into());
        assert_eq!(when(&g, g.bob, Some(facts), react("👍")), Ok(vec![]));
    }

    #[test]
    fn a_new_distinct_emoji_over_the_bound_is_invalid_but_joining_an_existing_one_is_not() {
        let g = given();
        let mut facts = sent_by(g.alice);
        facts.emoji = ["😀", "😂", "👍"].into_iter().map(String::from).collect();
        assert!(matches!(
            when(&g, g.bob, Some(facts.clone()), react("🎉")),
            Err(Rejection::Invalid(_))
        ));
        assert!(when(&g, g.bob, Some(facts), react("👍")).unwrap().len() == 1);
    }

    #[test]
    fn removing_a_reaction_one_never_made_changes_nothing() {
        let g = given();
        let mut facts = sent_by(g.alice);
        let unreact = || MessageChange::Unreact {
            emoji: emoji("👍")
        };
        assert_eq!(when(&g, g.bob, Some(facts.clone()), unreact()), Ok(vec![]));
        facts.mine.insert("👍".into());
        let events = when(&g, g.bob, Some(facts), unreact()).unwrap();
        assert!(matches!(&events[..], [ChatEvent::ReactionRemoved(r)] if r.user_id == g.bob));
    }

    #[test]
    fn message_changes_leave_the_members_alone_and_only_bump_the_version() {
        let g = given();
        let before = g.chat.clone();
        let events = when(&g, g.alice, Some(sent_by(g.alice)), MessageChange::Delete).unwrap();
        let after = events.iter().fold(g.chat.clone(), evolve);
        let (
            Chat::Live {
                members: m1,
                version: v1,
                ..
            },
            Chat::Live {
                members: m2,
                version: v2,
                ..
            },
        ) = (&before, &after)
        else {
            panic!("a live chat stays live")
        };
        assert_eq!(m1, m2);
        assert_eq!(*v2, v1 + 1);
    }
}
