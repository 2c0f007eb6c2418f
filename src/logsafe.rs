//! Caller-supplied text on its way into a log line, an audit event or an
//! error message.
//!
//! Two rules keep a caller from forging or flooding the logs:
//! * **Escaped**: such text is recorded as a string field (`user_id = &*capped(..)`,
//!   never `%` Display), so the text format writes it Debug-quoted (`"\n"`
//!   stays two characters) and the JSON format writes a JSON string. Inside
//!   error messages it is written with `{:?}`.
//! * **Capped**: at most [`MAX_LOGGED_BYTES`] of it, with the cut marked, so a
//!   4 MB `user_id` costs 512 bytes of log, not 4 MB.

use std::borrow::Cow;

/// Longest piece of caller-supplied text that reaches a log line.
pub const MAX_LOGGED_BYTES: usize = 512;

/// `text` cut to [`MAX_LOGGED_BYTES`] on a character boundary, with
/// `…[+N bytes]` saying how much was cut; borrowed when short enough.
pub fn capped(text: &str) -> Cow<'_, str> {
    if text.len() <= MAX_LOGGED_BYTES {
        return Cow::Borrowed(text);
    }
    let mut end = MAX_LOGGED_BYTES;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    Cow::Owned(format!("{}…[+{} bytes]", &text[..end], text.len() - end))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_text_is_kept_as_is() {
        assert!(matches!(capped("github|1"), Cow::Borrowed("github|1")));
    }

    #[test]
    fn long_text_is_cut_on_a_char_boundary_and_the_cut_is_marked() {
        let text = format!("{}é{}", "a".repeat(511), "b".repeat(4_000_000));
        let cut = capped(&text);
        assert!(cut.starts_with(&"a".repeat(511)));
        assert!(
            cut.ends_with(&format!("…[+{} bytes]", 4_000_002)),
            "{}",
            &cut[500..]
        );
        assert!(cut.len() < MAX_LOGGED_BYTES + 32);
    }
}
