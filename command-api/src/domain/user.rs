//! The user aggregate: registration and the set of active devices (at most five).

use std::collections::BTreeMap;

use parley_nats::Aggregate;
use parley_schemas::events::{DeviceAdded, DeviceRemoved, UserRegistered};
use parley_schemas::{DeviceId, DeviceName, DisplayName, Handle, Platform, UserEvent, UserId};
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
    },
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
}

impl User {
    pub fn active_devices(&self) -> usize {
        match self {
            User::Registered { devices } => devices.values().filter(|a| **a).count(),
            User::Absent => 0,
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
            User::Registered { devices },
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
        (User::Registered { devices }, UserCommand::RemoveDevice { device_id }) => {
            match devices.get(device_id) {
                None => Err(Rejection::NotFound),
                Some(false) => Ok(Vec::new()),
                Some(true) => Ok(vec![UserEvent::DeviceRemoved(DeviceRemoved {
                    device_id: *device_id,
                })]),
            }
        }
    }
}

pub fn evolve(state: User, event: &UserEvent) -> User {
    match (state, event) {
        (User::Absent, UserEvent::Registered(_)) => User::Registered {
            devices: BTreeMap::new(),
        },
        (User::Registered { mut devices }, UserEvent::DeviceAdded(d)) => {
            devices.insert(d.device_id, true);
            User::Registered { devices }
        }
        (User::Registered { mut devices }, UserEvent::DeviceRemoved(d)) => {
            devices.insert(d.device_id, false);
            User::Registered { devices }
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
