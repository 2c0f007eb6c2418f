//! A validated Auth0 user id, so nothing downstream has to re-check it.

use std::fmt;

/// Longest user id accepted; Auth0's own ids are far shorter, and a bound keeps
/// cache keys and log lines small.
pub const MAX_USER_ID_BYTES: usize = 512;

/// An Auth0 user id that is non-empty, at most [`MAX_USER_ID_BYTES`], free of
/// control characters and not a dot segment (`.`/`..` would be normalised away
/// by URL handling and reach another Management API endpoint).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct UserId(String);

/// Why a user id was refused; shown to the caller as INVALID_ARGUMENT.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidUserId {
    #[error("user_id is empty")]
    Empty,
    #[error("user_id is {0} bytes; at most 512 are allowed")]
    TooLong(usize),
    #[error("user_id contains a control character")]
    ControlCharacter,
    #[error("user_id must not be \".\" or \"..\"")]
    DotSegment,
}

impl UserId {
    /// Validates `raw` as it came from the caller.
    pub fn parse(raw: &str) -> Result<Self, InvalidUserId> {
        if raw.is_empty() {
            return Err(InvalidUserId::Empty);
        }
        if raw.len() > MAX_USER_ID_BYTES {
            return Err(InvalidUserId::TooLong(raw.len()));
        }
        if raw.chars().any(char::is_control) {
            return Err(InvalidUserId::ControlCharacter);
        }
        if raw == "." || raw == ".." {
            return Err(InvalidUserId::DotSegment);
        }
        Ok(Self(raw.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ids_with_pipes_slashes_spaces_and_at() {
        assert!(UserId::parse("oauth2|corp|team/ops lead@example.com").is_ok());
    }

    #[test]
    fn refuses_empty_long_control_and_dot_segments() {
        assert_eq!(UserId::parse(""), Err(InvalidUserId::Empty));
        assert_eq!(
            UserId::parse(&"a".repeat(513)),
            Err(InvalidUserId::TooLong(513))
        );
        assert!(UserId::parse(&"a".repeat(512)).is_ok());
        assert_eq!(
            UserId::parse("auth0|a\nb"),
            Err(InvalidUserId::ControlCharacter)
        );
        assert_eq!(UserId::parse(".."), Err(InvalidUserId::DotSegment));
        assert_eq!(UserId::parse("."), Err(InvalidUserId::DotSegment));
    }
}
