//! Validated values: each has a private field and a `parse` that says what is wrong.

use std::fmt;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValueError {
    #[error("handle must match ^[a-z0-9_]{{3,32}}$")]
    Handle,
    #[error("{field} must be {min}..{max} characters, not blank")]
    Length {
        field: &'static str,
        min: usize,
        max: usize,
    },
    #[error("{0} must not contain control characters")]
    Control(&'static str),
    #[error(
        "emoji must be one emoji: 1..32 bytes, no whitespace or control characters, not plain ASCII"
    )]
    Emoji,
}

fn check_len(
    field: &'static str,
    s: &str,
    min: usize,
    max: usize,
    allow_newlines: bool,
) -> Result<(), ValueError> {
    let n = s.chars().count();
    if n < min || n > max || (min > 0 && s.trim().is_empty()) {
        return Err(ValueError::Length { field, min, max });
    }
    if s.chars()
        .any(|c| c.is_control() && !(allow_newlines && (c == '\n' || c == '\t' || c == '\r')))
    {
        return Err(ValueError::Control(field));
    }
    Ok(())
}

macro_rules! text_value {
    ($(#[$doc:meta])* $name:ident, $field:literal, $min:literal, $max:literal, $newlines:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            pub const MAX_CHARS: usize = $max;
            pub fn parse(s: impl Into<String>) -> Result<Self, ValueError> {
                let s = s.into();
                check_len($field, &s, $min, $max, $newlines)?;
                Ok(Self(s))
            }
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = ValueError;
            fn try_from(s: String) -> Result<Self, ValueError> {
                Self::parse(s)
            }
        }

        impl From<$name> for String {
            fn from(v: $name) -> String {
                v.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

text_value!(
    /// A user's public name, 1..64 characters.
    DisplayName, "display_name", 1, 64, false
);
text_value!(
    /// A message body, 1..4000 characters (Unicode scalar values), not only whitespace.
    MessageBody, "body", 1, 4000, true
);
text_value!(
    /// A group or channel title, 1..128 characters.
    ChatTitle, "title", 1, 128, false
);
text_value!(
    /// A device's name as the user sees it in their device list, 1..64 characters.
    DeviceName, "device_name", 1, 64, false
);
text_value!(
    /// A free-form platform tag (`ios`, `android`, `web`, …), 1..32 characters.
    Platform, "platform", 1, 32, false
);

/// A unique user handle: `^[a-z0-9_]{3,32}$`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(try_from = "String", into = "String")]
pub struct Handle(String);

impl Handle {
    pub fn parse(s: impl Into<String>) -> Result<Self, ValueError> {
        let s = s.into();
        let ok = (3..=32).contains(&s.len())
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if ok {
            Ok(Self(s))
        } else {
            Err(ValueError::Handle)
        }
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Handle {
    type Error = ValueError;
    fn try_from(s: String) -> Result<Self, ValueError> {
        Self::parse(s)
    }
}

impl From<Handle> for String {
    fn from(v: Handle) -> String {
        v.0
    }
}

impl fmt::Display for Handle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One reaction emoji: 1..=32 bytes of UTF-8, no whitespace or control characters, and at
/// least one non-ASCII character, so words and shortcodes (`+1`, `lol`) are refused while
/// sequences such as `👍🏽`, `👨‍👩‍👧` or `#️⃣` pass. Telling a single grapheme from several would need
/// Unicode segmentation tables; the byte bound keeps any abuse small.
#[derive(
    Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
#[serde(try_from = "String", into = "String")]
pub struct Emoji(String);

impl Emoji {
    pub const MAX_BYTES: usize = 32;
    pub fn parse(s: impl Into<String>) -> Result<Self, ValueError> {
        let s = s.into();
        let ok = !s.is_empty()
            && s.len() <= Self::MAX_BYTES
            && !s.chars().any(|c| c.is_whitespace() || c.is_control())
            && !s.is_ascii();
        if ok {
            Ok(Self(s))
        } else {
            Err(ValueError::Emoji)
        }
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Emoji {
    type Error = ValueError;
    fn try_from(s: String) -> Result<Self, ValueError> {
        Self::parse(s)
    }
}

impl From<Emoji> for String {
    fn from(v: Emoji) -> String {
        v.0
    }
}

impl fmt::Display for Emoji {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A password in transit: 8..256 characters. Never serialised, never logged.
#[derive(Clone)]
pub struct Password(String);

impl Password {
    pub fn parse(s: impl Into<String>) -> Result<Self, ValueError> {
        let s = s.into();
        let n = s.chars().count();
        if !(8..=256).contains(&n) {
            return Err(ValueError::Length {
                field: "password",
                min: 8,
                max: 256,
            });
        }
        Ok(Self(s))
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Password(***)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn handle_accepts_the_documented_alphabet_only() {
        assert!(Handle::parse("ada_99").is_ok());
        for bad in [
            "ab",
            "Ada",
            "ada-lovelace",
            "a".repeat(33).as_str(),
            "ada.x",
            "ad a",
            "",
        ] {
            assert!(Handle::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn message_body_counts_characters_not_bytes_and_refuses_blank() {
        assert!(MessageBody::parse("é".repeat(4000)).is_ok());
        assert!(MessageBody::parse("é".repeat(4001)).is_err());
        assert!(MessageBody::parse("   \n ").is_err());
        assert!(MessageBody::parse("line one\nline two").is_ok());
        assert!(MessageBody::parse("bell\u{7}").is_err());
    }

    #[test]
    fn emoji_accepts_one_emoji_sequence_and_refuses_text_blanks_and_long_runs() {
        for good in [
            "👍",
            "👍🏽",
            "👨\u{200d}👩\u{200d}👧",
            "#\u{fe0f}\u{20e3}",
            "❤\u{fe0f}",
        ] {
            assert!(Emoji::parse(good).is_ok(), "{good:?}");
        }
        for bad in ["", "+1", "lol", "👍 👍", "👍\n", "\u{7}👍", &"👍".repeat(9)] {
            assert!(Emoji::parse(bad).is_err(), "{bad:?}");
        }
        assert!(Emoji::parse("👍".repeat(8)).is_ok(), "exactly 32 bytes");
    }

    #[test]
    fn password_length_is_bounded_and_debug_hides_it() {
        assert!(Password::parse("short").is_err());
        assert!(Password::parse("x".repeat(257)).is_err());
        let p = Password::parse("correct horse").unwrap();
        assert_eq!(format!("{p:?}"), "Password(***)");
    }

    proptest! {
        #[test]
        fn handle_parse_never_panics_and_valid_ones_round_trip(s in "\\PC{0,40}") {
            if let Ok(h) = Handle::parse(s.clone()) {
                prop_assert_eq!(h.as_str(), s.as_str());
            }
        }
    }
}
