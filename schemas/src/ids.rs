//! Typed identifiers: UUIDs in canonical lowercase text, UUIDv7 when the server mints them.
//!
//! Ids become NATS subject tokens (`chats.<chat_id>`), so parsing is strict: only the 36-char
//! hyphenated form is accepted, which can never carry `.`, `*`, `>` or whitespace.

use std::fmt;
use std::str::FromStr;

use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize};
use uuid::Uuid;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a UUID in canonical 8-4-4-4-12 form")]
pub struct IdError(pub String);

/// Parses the canonical hyphenated form only (any case); braces, URNs and bare hex are refused.
pub fn parse_canonical_uuid(s: &str) -> Result<Uuid, IdError> {
    if s.len() != 36 {
        return Err(IdError(truncate(s)));
    }
    Uuid::try_parse(s).map_err(|_| IdError(truncate(s)))
}

fn truncate(s: &str) -> String {
    s.chars().take(64).collect()
}

macro_rules! typed_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, JsonSchema)]
        #[serde(transparent)]
        pub struct $name(Uuid);

        impl $name {
            /// Mints a new time-ordered id (UUIDv7).
            #[allow(clippy::new_without_default)]
            pub fn new() -> Self {
                Self(Uuid::now_v7())
            }
            pub const fn from_uuid(uuid: Uuid) -> Self {
                Self(uuid)
            }
            pub const fn as_uuid(&self) -> &Uuid {
                &self.0
            }
            pub fn parse(s: &str) -> Result<Self, IdError> {
                parse_canonical_uuid(s).map(Self)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0.hyphenated(), f)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.0)
            }
        }

        impl FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::parse(s)
            }
        }

        impl From<$name> for Uuid {
            fn from(id: $name) -> Uuid {
                id.0
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                Self::parse(&s).map_err(serde::de::Error::custom)
            }
        }
    };
}

typed_id!(
    /// A registered user.
    UserId
);
typed_id!(
    /// One logged-in device of a user; a token belongs to exactly one.
    DeviceId
);
typed_id!(
    /// A DM, group or channel; its events live on the subject `chats.<chat_id>`.
    ChatId
);
typed_id!(
    /// A message, stable across edits and deletion.
    MessageId
);
typed_id!(
    /// A CloudEvent's `id`.
    EventId
);
typed_id!(
    /// Uploaded bytes in the `attachments` object store.
    AttachmentId
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_refuse_subject_metacharacters_and_non_canonical_forms() {
        for bad in [
            "",
            "*",
            ">",
            "a.b",
            "0190b7e2-6a4c-7b1a-9c1e-0b7f6c1d2e3f.x",
            "0190b7e2 6a4c-7b1a-9c1e-0b7f6c1d2e3f",
            "0190b7e26a4c7b1a9c1e0b7f6c1d2e3f",
            "{0190b7e2-6a4c-7b1a-9c1e-0b7f6c1d2e3f}",
            "0190b7e2-6a4c-7b1a-9c1e-0b7f6c1d2e3*",
        ] {
            assert!(ChatId::parse(bad).is_err(), "{bad:?} must be refused");
        }
    }

    #[test]
    fn ids_display_canonical_lowercase_and_round_trip() {
        let id = ChatId::parse("0190B7E2-6A4C-7B1A-9C1E-0B7F6C1D2E3F").unwrap();
        assert_eq!(id.to_string(), "0190b7e2-6a4c-7b1a-9c1e-0b7f6c1d2e3f");
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(serde_json::from_str::<ChatId>(&json).unwrap(), id);
    }

    #[test]
    fn minted_ids_are_version_7() {
        assert_eq!(UserId::new().as_uuid().get_version_num(), 7);
    }
}
