//! `@handle` mentions: which handles a message body names. Pure text scanning; resolving
//! handles to users and keeping only members happen elsewhere.

use parley_schemas::Handle;

/// Most distinct handles one message may mention; the rest stay plain text.
pub const MAX_MENTIONS: usize = 50;

/// The distinct handles named as `@handle` in `body`, in order of first appearance.
///
/// A mention starts at `@` that does not follow a word character (so `ada@example.com` names
/// nobody) and runs over the longest run of word characters after it; that run must be a valid
/// handle as a whole (`@Ada` and `@ab` name nobody).
pub fn mentioned_handles(body: &str) -> Vec<Handle> {
    let is_word = |c: char| c.is_alphanumeric() || c == '_';
    let mut out: Vec<Handle> = Vec::new();
    let mut prev: Option<char> = None;
    let mut chars = body.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        if c == '@' && !prev.is_some_and(is_word) {
            let start = i + 1;
            let mut end = start;
            while let Some(&(j, n)) = chars.peek() {
                if !is_word(n) {
                    break;
                }
                end = j + n.len_utf8();
                prev = Some(n);
                chars.next();
            }
            if let Ok(handle) = Handle::parse(&body[start..end])
                && !out.contains(&handle)
            {
                out.push(handle);
                if out.len() == MAX_MENTIONS {
                    break;
                }
            }
            if end > start {
                continue;
            }
        }
        prev = Some(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(body: &str) -> Vec<String> {
        mentioned_handles(body)
            .into_iter()
            .map(String::from)
            .collect()
    }

    #[test]
    fn finds_handles_after_an_at_sign_once_each_in_order() {
        assert_eq!(
            names("@bob hi @ada_99, and @bob again (@cat)"),
            ["bob", "ada_99", "cat"]
        );
    }

    #[test]
    fn ignores_emails_invalid_handles_and_bare_at_signs() {
        assert!(names("mail ada@example.com or @ or @@ or @Ada or @ab or @é").is_empty());
        assert!(names(&format!("@{}", "a".repeat(33))).is_empty());
    }

    #[test]
    fn stops_at_the_limit() {
        let body: String = (0..80).map(|i| format!("@user{i:03} ")).collect();
        assert_eq!(mentioned_handles(&body).len(), MAX_MENTIONS);
    }
}
