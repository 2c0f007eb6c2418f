//! What the broker does per Auth0 connection: where a connection's tokens come
//! from and whether the broker refreshes them at the IdP. Read from the
//! operator's connections file (`--connections`), swapped whole on reload.
//!
//! ```toml
//! [[connection]]
//! name = "google-oauth2"            # the Auth0 connection name
//! source = "management-api"         # default; or "token-vault"
//! refresh = "idp"                   # default "none"; "idp": refresh at the IdP with identities[].refresh_token
//! token_url = "https://oauth2.googleapis.com/token"   # required with refresh = "idp"
//! client_id = "1234.apps.googleusercontent.com"       # the OAuth app the Auth0 connection uses
//! client_secret_file = "/var/run/secrets/google/client-secret"
//! ```
//! Unlisted connections: `source = "management-api"`, `refresh = "none"`, so
//! a broker without the file behaves as before it existed. With
//! `refresh = "none"` the IdP keys (`token_url`, …) are ignored, so an operator
//! can switch refreshing off without deleting them.
//!
//! Unlike the policy, parsing reads files: each `client_secret_file`, so a
//! file whose secret cannot be read is refused with the rest of it, at start
//! or on reload, and never fails a refresh later.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use secrecy::SecretString;
use serde::Deserialize;
use toml::Spanned;

use crate::idp::IdpClient;
use crate::policy::line_of;
use crate::reload::{FileStore, ReloadableFile};

/// Where the broker reads a connection's tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ConnectionSource {
    /// `identities[]` of the Auth0 profile, read with the Management API.
    #[default]
    ManagementApi,
    /// Auth0 Token Vault, which keeps and refreshes the tokens itself.
    TokenVault,
}

/// Whether the broker refreshes a connection's tokens itself.
#[derive(Debug, Clone)]
pub enum RefreshRule {
    /// Hand out what the source holds, however old.
    None,
    /// Refresh at the IdP with the identity's `refresh_token`, as this OAuth
    /// client: Auth0 refreshes nothing on its own, and the token on the
    /// profile lives only as long as the IdP gave it at sign-in.
    Idp(IdpClient),
}

/// What the broker does with one connection.
#[derive(Debug, Clone)]
pub struct ConnectionRule {
    /// Where its tokens come from.
    pub source: ConnectionSource,
    /// Whether the broker refreshes them.
    pub refresh: RefreshRule,
}

impl ConnectionRule {
    /// The rule of a connection the file does not list: what the broker did
    /// before connections could be configured.
    fn unlisted() -> Self {
        Self {
            source: ConnectionSource::ManagementApi,
            refresh: RefreshRule::None,
        }
    }
}

/// Every connection's rule, by Auth0 connection name.
#[derive(Debug, Clone)]
pub struct Connections {
    listed: HashMap<String, Arc<ConnectionRule>>,
    /// Answer for every name not listed; shared so [`Connections::rule_for`]
    /// can lend it like a listed one.
    unlisted: Arc<ConnectionRule>,
}

/// Why a connections file was refused; names the file, the line and the reason.
#[derive(Debug, thiserror::Error)]
pub enum ConnectionsError {
    #[error("{path}:{line}: {reason}")]
    Invalid {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConnectionsFile {
    #[serde(default)]
    connection: Vec<Spanned<ConnectionEntry>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
enum RefreshName {
    None,
    Idp,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConnectionEntry {
    name: Spanned<String>,
    #[serde(default)]
    source: Option<Spanned<ConnectionSource>>,
    #[serde(default)]
    refresh: Option<Spanned<RefreshName>>,
    #[serde(default)]
    token_url: Option<Spanned<String>>,
    #[serde(default)]
    client_id: Option<Spanned<String>>,
    #[serde(default)]
    client_secret_file: Option<Spanned<PathBuf>>,
}

/// A refusal before it knows its file: the byte offset it is about, and why.
type Refusal = (usize, String);

impl Connections {
    /// No file: every connection as unlisted.
    pub fn empty() -> Self {
        Self {
            listed: HashMap::new(),
            unlisted: Arc::new(ConnectionRule::unlisted()),
        }
    }

    /// Reads and parses the connections file (and the secret files it names).
    pub fn load(path: &Path) -> Result<Self, ConnectionsError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConnectionsError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses connections TOML, reading each `client_secret_file` it names;
    /// `path` only names the file in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConnectionsError> {
        let invalid = |(offset, reason): Refusal| ConnectionsError::Invalid {
            path: path.to_owned(),
            line: line_of(text, offset),
            reason,
        };
        let file: ConnectionsFile = toml::from_str(text).map_err(|error| {
            let offset = error.span().map_or(0, |span| span.start);
            invalid((offset, error.message().trim().to_owned()))
        })?;
        let mut connections = Self::empty();
        for entry in file.connection {
            let entry_offset = entry.span().start;
            let entry = entry.into_inner();
            let name_offset = entry.name.span().start;
            let name = entry.name.get_ref().clone();
            let rule = parse_rule(entry, entry_offset).map_err(&invalid)?;
            if connections
                .listed
                .insert(name.clone(), Arc::new(rule))
                .is_some()
            {
                let reason = format!("connection {name:?} is listed twice");
                return Err(invalid((name_offset, reason)));
            }
        }
        Ok(connections)
    }

    /// The rule for the Auth0 connection `name`; the defaults when it is not
    /// listed. Borrowed, so asking costs one hash lookup per RPC; clone the
    /// `Arc` to keep it across an `.await`.
    pub fn rule_for(&self, name: &str) -> &Arc<ConnectionRule> {
        self.listed.get(name).unwrap_or(&self.unlisted)
    }

    /// How many connections are listed, for logs.
    pub fn listed(&self) -> usize {
        self.listed.len()
    }

    /// How many listed connections are refreshed at their IdP, for logs.
    pub fn refreshed_at_idp(&self) -> usize {
        let refreshed = |rule: &&Arc<ConnectionRule>| matches!(rule.refresh, RefreshRule::Idp(_));
        self.listed.values().filter(refreshed).count()
    }
}

/// The rule of one entry, or why it is refused; `entry_offset` is where the
/// entry starts, for keys that are missing.
fn parse_rule(entry: ConnectionEntry, entry_offset: usize) -> Result<ConnectionRule, Refusal> {
    if entry.name.get_ref().trim().is_empty() {
        let reason = "connection name is empty".to_owned();
        return Err((entry.name.span().start, reason));
    }
    let source = entry
        .source
        .as_ref()
        .map_or(ConnectionSource::default(), |source| *source.get_ref());
    let refresh = match entry.refresh.as_ref().map(Spanned::get_ref) {
        None | Some(RefreshName::None) => RefreshRule::None,
        Some(RefreshName::Idp) => RefreshRule::Idp(parse_idp_client(&entry, entry_offset)?),
    };
    if source == ConnectionSource::TokenVault && matches!(refresh, RefreshRule::Idp(_)) {
        let offset = entry
            .refresh
            .as_ref()
            .map_or(entry_offset, |r| r.span().start);
        let reason = "refresh = \"idp\" does not go with source = \"token-vault\": Token Vault refreshes its tokens itself".to_owned();
        return Err((offset, reason));
    }
    Ok(ConnectionRule { source, refresh })
}

/// The OAuth client of a `refresh = "idp"` entry: every key present, the URL
/// absolute http(s), the secret file readable and not empty.
fn parse_idp_client(entry: &ConnectionEntry, entry_offset: usize) -> Result<IdpClient, Refusal> {
    let token_url = required(&entry.token_url, "token_url", entry_offset)?;
    check_token_url(token_url.get_ref()).map_err(|reason| (token_url.span().start, reason))?;
    let client_id = required(&entry.client_id, "client_id", entry_offset)?;
    if client_id.get_ref().trim().is_empty() {
        return Err((client_id.span().start, "client_id is empty".to_owned()));
    }
    let secret_file = required(
        &entry.client_secret_file,
        "client_secret_file",
        entry_offset,
    )?;
    let client_secret =
        read_secret(secret_file.get_ref()).map_err(|reason| (secret_file.span().start, reason))?;
    Ok(IdpClient {
        token_url: token_url.get_ref().clone(),
        client_id: client_id.get_ref().clone(),
        client_secret,
    })
}

/// `value`, or a refusal at the entry saying `key` is needed with `refresh = "idp"`.
fn required<'a, T>(
    value: &'a Option<Spanned<T>>,
    key: &str,
    entry_offset: usize,
) -> Result<&'a Spanned<T>, Refusal> {
    value.as_ref().ok_or_else(|| {
        let reason = format!("{key} is required with refresh = \"idp\"");
        (entry_offset, reason)
    })
}

/// The broker posts refresh tokens and its client secret to this URL, so it
/// must name a server: an absolute http or https URL with a host.
fn check_token_url(text: &str) -> Result<(), String> {
    let refuse = |why: &str| format!("token_url {text:?} {why}");
    let url = url::Url::parse(text).map_err(|error| refuse(&format!("is not a URL: {error}")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(refuse("is not an http or https URL"));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(refuse("names no host"));
    }
    Ok(())
}

/// The client secret in `path`, without surrounding whitespace (secret files
/// usually end in a newline). The reason names the file, never its content.
fn read_secret(path: &Path) -> Result<SecretString, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|error| format!("client_secret_file {}: {error}", path.display()))?;
    let secret = text.trim();
    if secret.is_empty() {
        return Err(format!("client_secret_file {} is empty", path.display()));
    }
    Ok(SecretString::from(secret.to_owned()))
}

impl ReloadableFile for Connections {
    type Error = ConnectionsError;

    /// Reads the file and its secret files.
    fn load(path: &Path) -> Result<Self, ConnectionsError> {
        Connections::load(path)
    }

    /// Without `--connections`: no connection listed.
    fn without_file() -> Self {
        Connections::empty()
    }

    fn reloaded(&self, path: &Path) {
        tracing::info!(
            path = %path.display(),
            connections = self.listed(),
            refreshed_at_idp = self.refreshed_at_idp(),
            "connections reloaded"
        );
        crate::stats::connections_reload(true);
    }

    fn not_reloaded(error: &ConnectionsError) {
        crate::stats::connections_reload(false);
        tracing::error!(%error, "connections not reloaded: keeping the previous ones");
    }
}

/// The connections in force (see [`FileStore`]); without `--connections`
/// none is listed and nothing is reloaded.
pub type ConnectionsStore = FileStore<Connections>;

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;
    use std::io::Write;

    const GOOGLE: &str = "google-oauth2";

    /// A secret file holding `content`, kept while the handle lives.
    fn secret_file(content: &str) -> tempfile::NamedTempFile {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(content.as_bytes()).unwrap();
        file
    }

    fn parse(text: &str) -> Result<Connections, ConnectionsError> {
        Connections::parse(text, Path::new("connections.toml"))
    }

    /// An `idp` entry for `name` with `extra` lines appended, reading `secret`.
    fn idp_entry(name: &str, secret: &Path, extra: &str) -> String {
        format!(
            "[[connection]]\nname = \"{name}\"\nrefresh = \"idp\"\ntoken_url = \"https://oauth2.googleapis.com/token\"\nclient_id = \"1234.apps.googleusercontent.com\"\nclient_secret_file = \"{}\"\n{extra}",
            secret.display()
        )
    }

    fn error(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    #[test]
    fn an_idp_entry_gives_its_client_with_the_trimmed_secret() {
        let secret = secret_file("s3cr3t-value\n");
        let connections = parse(&idp_entry(GOOGLE, secret.path(), "")).unwrap();
        let rule = connections.rule_for(GOOGLE);
        assert_eq!(rule.source, ConnectionSource::ManagementApi);
        let RefreshRule::Idp(client) = &rule.refresh else {
            panic!("{rule:?}")
        };
        assert_eq!(client.token_url, "https://oauth2.googleapis.com/token");
        assert_eq!(client.client_id, "1234.apps.googleusercontent.com");
        assert_eq!(client.client_secret.expose_secret(), "s3cr3t-value");
        assert_eq!(
            (connections.listed(), connections.refreshed_at_idp()),
            (1, 1)
        );
    }

    #[test]
    fn unlisted_connections_and_an_empty_file_get_the_defaults() {
        for connections in [Connections::empty(), parse("").unwrap()] {
            let rule = connections.rule_for("github");
            assert_eq!(rule.source, ConnectionSource::ManagementApi);
            assert!(matches!(rule.refresh, RefreshRule::None));
        }
    }

    #[test]
    fn a_listed_entry_defaults_to_management_api_without_refresh() {
        let connections = parse("[[connection]]\nname = \"github\"\n").unwrap();
        let rule = connections.rule_for("github");
        assert_eq!(rule.source, ConnectionSource::ManagementApi);
        assert!(matches!(rule.refresh, RefreshRule::None));
        let vault = parse("[[connection]]\nname = \"github\"\nsource = \"token-vault\"\n").unwrap();
        assert_eq!(
            vault.rule_for("github").source,
            ConnectionSource::TokenVault
        );
    }

    #[test]
    fn refresh_none_ignores_idp_keys_and_reads_no_secret_file() {
        let text = "[[connection]]\nname = \"x\"\nrefresh = \"none\"\ntoken_url = \"not a url\"\nclient_secret_file = \"/nonexistent/secret\"\n";
        let connections = parse(text).unwrap();
        assert!(matches!(
            connections.rule_for("x").refresh,
            RefreshRule::None
        ));
    }

    #[test]
    fn the_secret_never_shows_in_debug() {
        let secret = secret_file("s3cr3t-value");
        let connections = parse(&idp_entry(GOOGLE, secret.path(), "")).unwrap();
        let store = ConnectionsStore::fixed(connections.clone());
        for text in [
            format!("{connections:?}"),
            format!("{:?}", store.current().rule_for(GOOGLE)),
        ] {
            assert!(!text.contains("s3cr3t-value"), "{text}");
        }
    }

    #[test]
    fn an_unknown_key_names_its_line() {
        let text = error("[[connection]]\nname = \"x\"\nscope = \"all\"\n");
        assert!(text.starts_with("connections.toml:3:"), "{text}");
        assert!(text.contains("scope"), "{text}");
    }

    #[test]
    fn an_unknown_source_or_refresh_value_names_its_line() {
        let text = error("[[connection]]\nname = \"x\"\nsource = \"vault\"\n");
        assert!(text.starts_with("connections.toml:3:"), "{text}");
        let text = error("[[connection]]\nname = \"x\"\nrefresh = \"auth0\"\n");
        assert!(text.starts_with("connections.toml:3:"), "{text}");
    }

    #[test]
    fn each_idp_key_is_required_with_refresh_idp() {
        let secret = secret_file("s");
        let full = idp_entry(GOOGLE, secret.path(), "");
        for key in ["token_url", "client_id", "client_secret_file"] {
            let without: String = full
                .lines()
                .filter(|line| !line.starts_with(key))
                .map(|line| format!("{line}\n"))
                .collect();
            let text = error(&format!("[[connection]]\nname = \"a\"\n\n{without}"));
            assert!(text.starts_with("connections.toml:4:"), "{key}: {text}");
            assert!(
                text.contains(&format!("{key} is required")),
                "{key}: {text}"
            );
        }
    }

    #[test]
    fn refresh_idp_on_a_token_vault_connection_is_refused() {
        let secret = secret_file("s");
        let text = error(&idp_entry(
            GOOGLE,
            secret.path(),
            "source = \"token-vault\"\n",
        ));
        assert!(text.starts_with("connections.toml:3:"), "{text}");
        assert!(text.contains("token-vault"), "{text}");
    }

    #[test]
    fn a_name_listed_twice_names_the_line_of_the_second() {
        let text = error("[[connection]]\nname = \"x\"\n\n[[connection]]\nname = \"x\"\n");
        assert!(text.starts_with("connections.toml:5:"), "{text}");
        assert!(text.contains("listed twice"), "{text}");
    }

    #[test]
    fn an_empty_name_is_refused() {
        let text = error("[[connection]]\nname = \" \"\n");
        assert!(text.starts_with("connections.toml:2:"), "{text}");
    }

    #[test]
    fn token_url_must_be_an_absolute_http_url() {
        let secret = secret_file("s");
        let entry = idp_entry(GOOGLE, secret.path(), "");
        for bad in [
            "/token",
            "ftp://idp.example/token",
            "file:///etc/passwd",
            "https://",
        ] {
            let text = error(&entry.replace("https://oauth2.googleapis.com/token", bad));
            assert!(text.starts_with("connections.toml:4:"), "{bad}: {text}");
            assert!(text.contains("token_url"), "{bad}: {text}");
        }
        let plain = entry.replace("https://oauth2.googleapis.com", "http://127.0.0.1:8080");
        assert!(parse(&plain).is_ok(), "http is allowed, for emulators");
    }

    #[test]
    fn an_empty_client_id_is_refused() {
        let secret = secret_file("s");
        let entry = idp_entry(GOOGLE, secret.path(), "");
        let text = error(&entry.replace("1234.apps.googleusercontent.com", ""));
        assert!(text.starts_with("connections.toml:5:"), "{text}");
    }

    #[test]
    fn an_unreadable_or_empty_secret_file_names_both_files() {
        let missing = Path::new("/nonexistent/google/client-secret");
        let text = error(&idp_entry(GOOGLE, missing, ""));
        assert!(text.starts_with("connections.toml:6:"), "{text}");
        assert!(text.contains("/nonexistent/google/client-secret"), "{text}");

        let empty = secret_file(" \n");
        let text = error(&idp_entry(GOOGLE, empty.path(), ""));
        assert!(text.starts_with("connections.toml:6:"), "{text}");
        assert!(text.contains(&empty.path().display().to_string()), "{text}");
        assert!(text.contains("empty"), "{text}");
    }

    #[test]
    fn a_syntax_error_names_its_line() {
        let text = error("[[connection]]\nname = \"x\n");
        assert!(text.starts_with("connections.toml:2:"), "{text}");
    }

    #[test]
    fn a_store_without_a_file_is_empty_and_reloads_nothing() {
        let store = ConnectionsStore::open(None).unwrap();
        assert!(store.path().is_none());
        store.reload();
        assert_eq!(store.current().listed(), 0);
    }

    #[test]
    fn reload_takes_a_good_file_and_keeps_the_old_one_on_a_bad_file() {
        let secret = secret_file("s");
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(idp_entry(GOOGLE, secret.path(), "").as_bytes())
            .unwrap();
        let store = ConnectionsStore::open(Some(file.path())).unwrap();
        assert_eq!(store.path(), Some(file.path()));
        assert_eq!(store.current().refreshed_at_idp(), 1);

        std::fs::write(file.path(), "[[connection]]\nname = \"github\"\n").unwrap();
        store.reload();
        assert_eq!(store.current().refreshed_at_idp(), 0);
        assert_eq!(store.current().listed(), 1);

        std::fs::write(file.path(), "[[connection]]\nbogus = 1\n").unwrap();
        store.reload();
        assert_eq!(store.current().listed(), 1, "the previous file stays");
        assert!(store.current().rule_for("github").source == ConnectionSource::ManagementApi);
    }

    #[test]
    fn an_unreadable_connections_file_is_refused_naming_it() {
        let error = ConnectionsStore::open(Some(Path::new("/nonexistent/connections.toml")))
            .err()
            .unwrap()
            .to_string();
        assert!(
            error.starts_with("/nonexistent/connections.toml:"),
            "{error}"
        );
    }
}
