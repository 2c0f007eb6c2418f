//! The broker's 32-byte keys (the audit HMAC key, the shared-cache key): one
//! file format for all, base64 text of 32 random bytes, as
//! `openssl rand -base64 32` writes it; surrounding whitespace is ignored.

use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use secrecy::SecretBox;

/// Bytes in every key.
pub const KEY_BYTES: usize = 32;

/// Why a key file cannot be used; names the file, never its content.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not base64 text (make one with `openssl rand -base64 32`)")]
    NotBase64 { path: PathBuf },
    #[error("{path}: holds {found} bytes, a key is {KEY_BYTES} (make one with `openssl rand -base64 32`)")]
    WrongLength { path: PathBuf, found: usize },
}

/// The 32 key bytes of `path`, kept secret in memory.
pub fn read_key_file(path: &Path) -> Result<SecretBox<[u8; KEY_BYTES]>, KeyFileError> {
    let text = std::fs::read_to_string(path).map_err(|source| KeyFileError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse_key(text.trim(), path)
}

/// The 32 key bytes of base64 `text`; `path` only names the source in errors.
pub fn parse_key(text: &str, path: &Path) -> Result<SecretBox<[u8; KEY_BYTES]>, KeyFileError> {
    let bytes = STANDARD
        .decode(text.trim())
        .map_err(|_| KeyFileError::NotBase64 {
            path: path.to_owned(),
        })?;
    let key: [u8; KEY_BYTES] =
        bytes
            .as_slice()
            .try_into()
            .map_err(|_| KeyFileError::WrongLength {
                path: path.to_owned(),
                found: bytes.len(),
            })?;
    Ok(SecretBox::new(Box::new(key)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    #[test]
    fn openssl_rand_base64_32_is_a_key() {
        let key = parse_key(
            "  q83vEjRWeJCrze8SNFZ4kKvN7xI0VniQq83vEjRWeJA=\n",
            Path::new("k"),
        )
        .unwrap();
        assert_eq!(key.expose_secret()[0], 0xab);
    }

    #[test]
    fn wrong_lengths_and_text_are_refused_naming_the_file() {
        let short = parse_key("AAAA", Path::new("/etc/k"))
            .unwrap_err()
            .to_string();
        assert!(short.starts_with("/etc/k: holds 3 bytes"), "{short}");
        let text = parse_key("not base64!", Path::new("/etc/k"))
            .unwrap_err()
            .to_string();
        assert!(text.contains("not base64"), "{text}");
    }
}
