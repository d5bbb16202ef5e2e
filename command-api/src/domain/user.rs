//! The user aggregate: registration, the set of active devices (at most five), whom the user
//! blocks, and the user's own settings per chat.

use std::collections::{BTreeMap, BTreeSet};

use parley_nats::Aggregate;
use parley_schemas::events::{
    ChatSettingsChanged, DeviceAdded, DeviceRemoved, UserBlocked, UserRegistered, UserUnblocked,
};
use parley_schemas::{
    ChatId, DeviceId, DeviceName, DisplayName, Handle, NotifyLevel, Platform, UserEvent, UserId,
};
use serde::{Deserialize, Serialize};

use super::Rejection;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum User {
    #[default]
    Absent,
    Registered {
        /// Every device ever added: `true` while active. Removed ones stay so that a repeated
        /// removal is recognised as done rather than unknown.
        devices: BTreeMap<DeviceId, bool>,
        /// Users this one blocks. (Absent from snapshots taken before blocks existed, when
        /// it could only be empty.)
        #[serde(default)]
        blocked: BTreeSet<UserId>,
        /// This user's own settings in the chats where they changed them.
        #[serde(default)]
        chat_settings: BTreeMap<ChatId, ChatSettings>,
    },
}

/// A member's own settings in one chat; the default until they change them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatSettings {
    pub muted: bool,
    pub notify: NotifyLevel,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UserCommand {
    Register {
        user_id: UserId,
        handle: Handle,
        display_name: DisplayName,
    },
    AddDevice {
        device_id: DeviceId,
        device_name: DeviceName,
        platform: Option<Platform>,
        max_devices: usize,
    },
    RemoveDevice {
        device_id: DeviceId,
    },
    /// `actor` blocks `user`; the aggregate is the actor's.
    Block {
        actor: UserId,
        user: UserId,
        /// Whether `user` is registered (read from their aggregate by the caller).
        user_exists: bool,
    },
    Unblock {
        actor: UserId,
        user: UserId,
        user_exists: bool,
    },
    /// Only the given fields change. The caller checked that the user is a member of the chat.
    ChangeChatSettings {
        chat_id: ChatId,
        muted: Option<bool>,
        notify: Option<NotifyLevel>,
    },
}

impl User {
    pub fn active_devices(&self) -> usize {
        match self {
            User::Registered { devices, .. } => devices.values().filter(|a| **a).count(),
            User::Absent => 0,
        }
    }

    /// Whether this user blocks `other`.
    pub fn blocks(&self, other: UserId) -> bool {
        matches!(self, User::Registered { blocked, .. } if blocked.contains(&other))
    }

    /// This user's settings in `chat` (the defaults until changed).
    pub fn chat_settings(&self, chat: ChatId) -> ChatSettings {
        match self {
            User::Registered { chat_settings, .. } => {
                chat_settings.get(&chat).copied().unwrap_or_default()
            }
            User::Absent => ChatSettings::default(),
        }
    }
}

pub fn decide(state: &User, cmd: &UserCommand) -> Result<Vec<UserEvent>, Rejection> {
    match (state, cmd) {
        (
            User::Absent,
            UserCommand::Register {
                user_id,
                handle,
                display_name,
            },
        ) => Ok(vec![UserEvent::Registered(UserRegistered {
            user_id: *user_id,
            handle: handle.as_str().to_owned(),
            display_name: display_name.as_str().to_owned(),
        })]),
        // Ids are minted per command, so this is a retry of the same registration.
        (User::Registered { .. }, UserCommand::Register { .. }) => Ok(Vec::new()),
        (User::Absent, _) => Err(Rejection::NotFound),
        (
            User::Registered { devices, .. },
            UserCommand::AddDevice {
                device_id,
                device_name,
                platform,
                max_devices,
            },
        ) => {
            if devices.contains_key(device_id) {
                return Ok(Vec::new());
            }
            if state.active_devices() >= *max_devices {
                return Err(Rejection::Conflict(
                    "the user already has the maximum of active devices",
                ));
            }
            Ok(vec![UserEvent::DeviceAdded(DeviceAdded {
                device_id: *device_id,
                device_name: device_name.as_str().to_owned(),
                platform: platform.as_ref().map(|p| p.as_str().to_owned()),
            })])
        }
        (User::Registered { devices, .. }, UserCommand::RemoveDevice { device_id }) => {
            match devices.get(device_id) {
                None => Err(Rejection::NotFound),
                Some(false) => Ok(Vec::new()),
                Some(true) => Ok(vec![UserEvent::DeviceRemoved(DeviceRemoved {
                    device_id: *device_id,
                })]),
            }
        }
        (
            User::Registered { blocked, .. },
            UserCommand::Block {
                actor,
                user,
                user_exists,
            },
        ) => {
            check_block_target(*actor, *user, *user_exists)?;
            if blocked.contains(user) {
                return Ok(Vec::new());
            }
            Ok(vec![UserEvent::Blocked(UserBlocked { user_id: *user })])
        }
        (
            User::Registered { blocked, .. },
            UserCommand::Unblock {
                actor,
                user,
                user_exists,
            },
        ) => {
            check_block_target(*actor, *user, *user_exists)?;
            if !blocked.contains(user) {
                return Ok(Vec::new());
            }
            Ok(vec![UserEvent::Unblocked(UserUnblocked { user_id: *user })])
        }
        (
            User::Registered { .. },
            UserCommand::ChangeChatSettings {
                chat_id,
                muted,
                notify,
            },
        ) => {
            let now = state.chat_settings(*chat_id);
            let next = ChatSettings {
                muted: muted.unwrap_or(now.muted),
                notify: notify.unwrap_or(now.notify),
            };
            if next == now {
                return Ok(Vec::new());
            }
            Ok(vec![UserEvent::ChatSettingsChanged(ChatSettingsChanged {
                chat_id: *chat_id,
                muted: next.muted,
                notify: next.notify,
            })])
        }
    }
}

fn check_block_target(actor: UserId, user: UserId, exists: bool) -> Result<(), Rejection> {
    if actor == user {
        return Err(Rejection::Invalid("you cannot block yourself".into()));
    }
    if !exists {
        return Err(Rejection::NotFound);
    }
    Ok(())
}

pub fn evolve(state: User, event: &UserEvent) -> User {
    match (state, event) {
        (User::Absent, UserEvent::Registered(_)) => User::Registered {
            devices: BTreeMap::new(),
            blocked: BTreeSet::new(),
            chat_settings: BTreeMap::new(),
        },
        (mut state @ User::Registered { .. }, event) => {
            if let User::Registered {
                devices,
                blocked,
                chat_settings,
            } = &mut state
            {
                match event {
                    UserEvent::DeviceAdded(d) => {
                        devices.insert(d.device_id, true);
                    }
                    UserEvent::DeviceRemoved(d) => {
                        devices.insert(d.device_id, false);
                    }
                    UserEvent::Blocked(b) => {
                        blocked.insert(b.user_id);
                    }
                    UserEvent::Unblocked(b) => {
                        blocked.remove(&b.user_id);
                    }
                    UserEvent::ChatSettingsChanged(c) => {
                        chat_settings.insert(
                            c.chat_id,
                            ChatSettings {
                                muted: c.muted,
                                notify: c.notify,
                            },
                        );
                    }
                    UserEvent::Registered(_) => {}
                }
            }
            state
        }
        (state, _) => state,
    }
}

impl Aggregate for User {
    type Event = UserEvent;
    const PREFIX: &'static str = "users";
    const STREAM: &'static str = parley_nats::streams::USERS;
    const SNAPSHOT_VERSION: u32 = 1;
    fn evolve(self, event: &UserEvent) -> Self {
        evolve(self, event)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn registered() -> User {
        let cmd = UserCommand::Register {
            user_id: UserId::new(),
            handle: Handle::parse("ada").unwrap(),
            display_name: DisplayName::parse("Ada").unwrap(),
        };
        decide(&User::Absent, &cmd)
            .unwrap()
            .iter()
            .fold(User::Absent, evolve)
    }

    fn add(id: DeviceId) -> UserCommand {
        UserCommand::AddDevice {
            device_id: id,
            device_name: DeviceName::parse("phone").unwrap(),
            platform: None,
            max_devices: 5,
        }
    }

    fn apply(state: User, cmd: &UserCommand) -> Result<User, Rejection> {
        Ok(decide(&state, cmd)?.iter().fold(state, evolve))
    }

    #[test]
    fn a_sixth_active_device_is_a_conflict_until_one_is_removed() {
        let mut state = registered();
        let ids: Vec<DeviceId> = (0..5).map(|_| DeviceId::new()).collect();
        for id in &ids {
            state = apply(state, &add(*id)).unwrap();
        }
        assert!(matches!(
            decide(&state, &add(DeviceId::new())),
            Err(Rejection::Conflict(_))
        ));
        state = apply(state, &UserCommand::RemoveDevice { device_id: ids[0] }).unwrap();
        assert!(decide(&state, &add(DeviceId::new())).is_ok());
    }

    #[test]
    fn removing_an_unknown_device_is_not_found_and_removing_twice_is_a_no_op() {
        let id = DeviceId::new();
        let state = apply(registered(), &add(id)).unwrap();
        assert_eq!(
            decide(
                &state,
                &UserCommand::RemoveDevice {
                    device_id: DeviceId::new()
                }
            ),
            Err(Rejection::NotFound)
        );
        let state = apply(state, &UserCommand::RemoveDevice { device_id: id }).unwrap();
        assert_eq!(
            decide(&state, &UserCommand::RemoveDevice { device_id: id }),
            Ok(vec![])
        );
    }

    #[test]
    fn adding_the_same_device_twice_is_a_retry_and_adds_nothing() {
        let id = DeviceId::new();
        let state = apply(registered(), &add(id)).unwrap();
        assert_eq!(decide(&state, &add(id)), Ok(vec![]));
    }

    #[test]
    fn devices_of_an_unregistered_user_are_not_found() {
        assert_eq!(
            decide(&User::Absent, &add(DeviceId::new())),
            Err(Rejection::NotFound)
        );
    }

    fn block(actor: UserId, user: UserId) -> UserCommand {
        UserCommand::Block {
            actor,
            user,
            user_exists: true,
        }
    }

    fn unblock(actor: UserId, user: UserId) -> UserCommand {
        UserCommand::Unblock {
            actor,
            user,
            user_exists: true,
        }
    }

    #[test]
    fn blocking_is_recorded_once_and_unblocking_lifts_it() {
        let [me, other] = [UserId::new(), UserId::new()];
        let state = apply(registered(), &block(me, other)).unwrap();
        assert!(state.blocks(other));
        assert_eq!(decide(&state, &block(me, other)), Ok(vec![]));
        let state = apply(state, &unblock(me, other)).unwrap();
        assert!(!state.blocks(other));
        assert_eq!(decide(&state, &unblock(me, other)), Ok(vec![]));
    }

    #[test]
    fn blocking_yourself_is_invalid_and_an_unknown_user_is_not_found() {
        let me = UserId::new();
        assert!(matches!(
            decide(&registered(), &block(me, me)),
            Err(Rejection::Invalid(_))
        ));
        let unknown = UserCommand::Block {
            actor: me,
            user: UserId::new(),
            user_exists: false,
        };
        assert_eq!(decide(&registered(), &unknown), Err(Rejection::NotFound));
    }

    #[test]
    fn chat_settings_change_only_the_given_fields_and_a_repeat_changes_nothing() {
        let chat = ChatId::new();
        let mute = UserCommand::ChangeChatSettings {
            chat_id: chat,
            muted: Some(true),
            notify: None,
        };
        let events = decide(&registered(), &mute).unwrap();
        assert_eq!(
            events,
            vec![UserEvent::ChatSettingsChanged(ChatSettingsChanged {
                chat_id: chat,
                muted: true,
                notify: NotifyLevel::All,
            })]
        );
        let state = events.iter().fold(registered(), evolve);
        assert_eq!(decide(&state, &mute), Ok(vec![]));
        let mentions = UserCommand::ChangeChatSettings {
            chat_id: chat,
            muted: None,
            notify: Some(NotifyLevel::Mentions),
        };
        let state = apply(state, &mentions).unwrap();
        assert_eq!(
            state.chat_settings(chat),
            ChatSettings {
                muted: true,
                notify: NotifyLevel::Mentions
            }
        );
        assert_eq!(state.chat_settings(ChatId::new()), ChatSettings::default());
    }

    #[test]
    fn a_snapshot_from_before_blocks_and_settings_still_loads() {
        let old = r#"{"Registered":{"devices":{}}}"#;
        let state: User = serde_json::from_str(old).unwrap();
        assert!(!state.blocks(UserId::new()));
    }

    proptest! {
        #[test]
        fn never_more_than_five_active_devices(ops in proptest::collection::vec((any::<bool>(), 0..8usize), 0..80)) {
            let ids: Vec<DeviceId> = (0..8).map(|_| DeviceId::new()).collect();
            let mut state = registered();
            for (is_add, i) in ops {
                let cmd = if is_add { add(ids[i]) } else { UserCommand::RemoveDevice { device_id: ids[i] } };
                if let Ok(next) = apply(state.clone(), &cmd) { state = next; }
                prop_assert!(state.active_devices() <= 5);
            }
        }
    }
}
