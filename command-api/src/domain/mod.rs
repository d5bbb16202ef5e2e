//! The write model: pure `decide` and `evolve` per aggregate. No I/O, no clocks, no randomness:
//! a command carries every fact it needs (actor, pre-minted ids, limits).

pub mod chat;
pub mod media;
pub mod mentions;
pub mod message;
pub mod user;

/// Why a command was refused. The HTTP layer maps each kind to one status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    /// Unknown, or not the caller's to see (never leaks existence).
    #[error("not found")]
    NotFound,
    /// A member without the right.
    #[error("forbidden: {0}")]
    Forbidden(&'static str),
    /// Conflicts with the aggregate's state.
    #[error("conflict: {0}")]
    Conflict(&'static str),
    /// Semantically invalid.
    #[error("invalid: {0}")]
    Invalid(String),
}
