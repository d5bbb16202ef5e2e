//! One JSON Schema (draft 2020-12) per event type, for analysts, generated from the serde types.
//!
//! The checked-in copies live in `schemas/json/`; a test fails when one is stale. Regenerate with
//! `PARLEY_WRITE_SCHEMAS=1 cargo test -p parley-schemas`.

use schemars::{JsonSchema, schema_for};
use serde_json::{Value, json};

use crate::cloudevent::{DATA_CONTENT_TYPE, DomainEvent, SPEC_VERSION};
use crate::events::*;

/// `(event type, full CloudEvent schema)` for every event type Parley writes.
pub fn event_schemas() -> Vec<(&'static str, Value)> {
    vec![
        envelope::<ChatEvent, ChatCreated>(ChatEvent::CREATED_V1),
        envelope::<ChatEvent, ParticipantsModified>(ChatEvent::PARTICIPANTS_MODIFIED_V1),
        envelope::<ChatEvent, MessageSent>(ChatEvent::MESSAGE_SENT_V1),
        envelope::<ChatEvent, TitleChanged>(ChatEvent::TITLE_CHANGED_V1),
        envelope::<ChatEvent, RoleChanged>(ChatEvent::ROLE_CHANGED_V1),
        envelope::<ChatEvent, MessageSentV2>(ChatEvent::MESSAGE_SENT_V2),
        envelope::<ChatEvent, MessageEdited>(ChatEvent::MESSAGE_EDITED_V1),
        envelope::<ChatEvent, MessageDeleted>(ChatEvent::MESSAGE_DELETED_V1),
        envelope::<ChatEvent, Reaction>(ChatEvent::REACTION_ADDED_V1),
        envelope::<ChatEvent, Reaction>(ChatEvent::REACTION_REMOVED_V1),
        envelope::<UserEvent, UserRegistered>(UserEvent::REGISTERED_V1),
        envelope::<UserEvent, DeviceAdded>(UserEvent::DEVICE_ADDED_V1),
        envelope::<UserEvent, DeviceRemoved>(UserEvent::DEVICE_REMOVED_V1),
        envelope::<UserEvent, UserBlocked>(UserEvent::BLOCKED_V1),
        envelope::<UserEvent, UserUnblocked>(UserEvent::UNBLOCKED_V1),
        envelope::<UserEvent, ChatSettingsChanged>(UserEvent::CHAT_SETTINGS_CHANGED_V1),
        envelope::<ReceiptEvent, Delivered>(ReceiptEvent::DELIVERED_V1),
        envelope::<ReceiptEvent, DeliveredBatch>(ReceiptEvent::DELIVERED_BATCH_V1),
        envelope::<ReceiptEvent, Read>(ReceiptEvent::READ_V1),
    ]
}

fn envelope<E: DomainEvent, D: JsonSchema>(ty: &'static str) -> (&'static str, Value) {
    let mut data = schema_for!(D).to_value();
    let defs = data
        .as_object_mut()
        .and_then(|o| {
            o.remove("$schema");
            o.remove("$defs")
        })
        .unwrap_or_else(|| json!({}));
    let uuid = json!({"type": "string", "format": "uuid"});
    let schema = json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": format!("https://parley.invalid/schemas/{ty}.json"),
        "title": ty,
        "description": "A Parley event: one CloudEvents 1.0 event in structured JSON mode.",
        "type": "object",
        "required": ["specversion", "id", "source", "type", "subject", "time",
                     "datacontenttype", "sequence", "actor", "data"],
        "properties": {
            "specversion": {"const": SPEC_VERSION},
            "id": uuid,
            "source": {"const": E::SOURCE},
            "type": {"const": ty},
            "subject": uuid,
            "time": {"type": "string", "format": "date-time"},
            "datacontenttype": {"const": DATA_CONTENT_TYPE},
            "sequence": {"type": "integer", "minimum": 1,
                         "description": "The aggregate's version: contiguous from 1 per subject."},
            "actor": uuid,
            "data": data
        },
        "$defs": defs
    });
    (ty, schema)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn dir() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("json")
    }

    #[test]
    fn checked_in_json_schemas_match_the_event_types() {
        let write = std::env::var_os("PARLEY_WRITE_SCHEMAS").is_some();
        let mut stale = Vec::new();
        for (ty, schema) in event_schemas() {
            let path = dir().join(format!("{ty}.json"));
            let want = serde_json::to_string_pretty(&schema).unwrap() + "\n";
            if write {
                std::fs::create_dir_all(dir()).unwrap();
                std::fs::write(&path, &want).unwrap();
            } else if std::fs::read_to_string(&path).ok().as_deref() != Some(want.as_str()) {
                stale.push(ty);
            }
        }
        assert!(
            stale.is_empty(),
            "stale JSON Schemas {stale:?}: run PARLEY_WRITE_SCHEMAS=1 cargo test -p parley-schemas"
        );
    }

    /// `docs/events.md` shows one example per event type (a `### `type`` heading, then a json
    /// block); each must validate against its schema, formats included.
    #[test]
    fn the_documented_examples_validate_and_cover_every_type() {
        let doc = std::fs::read_to_string(
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/events.md"),
        )
        .unwrap();
        let mut examples = std::collections::BTreeMap::new();
        for section in doc.split("\n### `").skip(1) {
            let ty = section.split('`').next().unwrap().to_owned();
            let json = section
                .split("```json\n")
                .nth(1)
                .and_then(|rest| rest.split("```").next())
                .unwrap_or_else(|| panic!("{ty}: no json example"));
            let value: Value = serde_json::from_str(json)
                .unwrap_or_else(|e| panic!("{ty}: the example is not JSON: {e}"));
            assert!(examples.insert(ty.clone(), value).is_none(), "{ty} twice");
        }
        for (ty, schema) in event_schemas() {
            let example = examples
                .remove(ty)
                .unwrap_or_else(|| panic!("docs/events.md has no example of {ty}"));
            let validator = jsonschema::options()
                .should_validate_formats(true)
                .build(&schema)
                .unwrap();
            let errors: Vec<String> = validator
                .iter_errors(&example)
                .map(|e| e.to_string())
                .collect();
            assert!(
                errors.is_empty(),
                "the example of {ty} is invalid: {errors:?}"
            );
            assert_eq!(example["type"], ty);
        }
        assert!(
            examples.is_empty(),
            "examples of unknown types: {:?}",
            examples.keys()
        );
    }

    #[test]
    fn every_readable_type_has_a_schema() {
        let have: Vec<_> = event_schemas().into_iter().map(|(t, _)| t).collect();
        for ty in ChatEvent::TYPES
            .iter()
            .chain(UserEvent::TYPES)
            .chain(ReceiptEvent::TYPES)
        {
            assert!(have.contains(ty), "{ty} has no JSON Schema");
        }
    }
}
