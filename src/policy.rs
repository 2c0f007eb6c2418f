//! Who may ask for what. The policy is parsed from TOML text and answers
//! questions about a caller id; it does no IO (loading and reloading the file
//! live in `reload`), so its rules are easy to test.
//!
//! ```toml
//! [[caller]]
//! id = "spiffe://example.org/ns/prod/sa/billing"
//! providers = ["github"]          # "*" for all
//! invalidate = false              # may call InvalidateUser
//! require_id_token = false        # true: only with the user's verified ID token
//! bypass_cache = false            # true: may send bypass_cache (spends Auth0 budget)
//! ```
//! Unlisted callers are denied everything. Running with no policy at all
//! needs an explicit `--allow-any-caller`. An `id` names its kind (see
//! [`crate::caller`]): a URI (`spiffe://…`) matches only a URI SAN, a bare
//! name (or `dns:name`) only a DNS SAN, `cn:name` only a subject CN.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;

use crate::caller;
use crate::error::BrokerError;
use crate::logsafe::capped;
use crate::reload::{FileStore, ReloadableFile};

/// Providers value that means "every provider".
const ALL_PROVIDERS: &str = "*";

/// What one caller may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallerRule {
    providers: Providers,
    /// May call `InvalidateUser`.
    pub invalidate: bool,
    /// Must prove the user is present: token requests without the user's
    /// verified `id_token` are refused.
    pub require_id_token: bool,
    /// May send `bypass_cache`: each such request is an Auth0 read, so it is
    /// a privilege, refused (RPC_NOT_ALLOWED) to callers without it.
    pub bypass_cache: bool,
}

/// The set is shared, so handing a caller its rule on every RPC
/// ([`Policy::rule_for`]) copies no provider names.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Providers {
    All,
    Only(Arc<HashSet<String>>),
}

impl CallerRule {
    /// The rule of `--allow-any-caller`: everything.
    fn everything() -> Self {
        Self {
            providers: Providers::All,
            invalidate: true,
            require_id_token: false,
            bypass_cache: true,
        }
    }

    /// Whether tokens of `provider` may be released to this caller.
    pub fn allows_provider(&self, provider: &str) -> bool {
        match &self.providers {
            Providers::All => true,
            Providers::Only(providers) => providers.contains(provider),
        }
    }
}

/// The rules in force.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    mode: Mode,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Mode {
    /// `--allow-any-caller`: any certificate from the client CA may do anything.
    AllowAny,
    /// Only listed callers, each within its rule.
    Listed(HashMap<String, CallerRule>),
}

/// Why a policy file was refused; names the file, the line and the reason.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
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
struct PolicyFile {
    #[serde(default)]
    caller: Vec<CallerEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CallerEntry {
    id: toml::Spanned<String>,
    providers: toml::Spanned<Vec<String>>,
    #[serde(default)]
    invalidate: bool,
    #[serde(default)]
    require_id_token: bool,
    #[serde(default)]
    bypass_cache: bool,
}

impl Policy {
    /// Any caller with a certificate from the client CA may do anything.
    pub fn allow_any() -> Self {
        Self {
            mode: Mode::AllowAny,
        }
    }

    /// Reads and parses the policy file.
    pub fn load(path: &Path) -> Result<Self, PolicyError> {
        let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses policy TOML; `path` only names the file in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self, PolicyError> {
        let invalid = |offset: usize, reason: String| PolicyError::Invalid {
            path: path.to_owned(),
            line: line_of(text, offset),
            reason,
        };
        let file: PolicyFile = toml::from_str(text).map_err(|error| {
            let offset = error.span().map_or(0, |span| span.start);
            invalid(offset, error.message().trim().to_owned())
        })?;
        let mut callers = HashMap::new();
        for entry in file.caller {
            let id_offset = entry.id.span().start;
            let raw_id = entry.id.into_inner();
            if raw_id.trim().is_empty() {
                return Err(invalid(id_offset, "caller id is empty".to_owned()));
            }
            let id = caller::policy_id(&raw_id).map_err(|reason| invalid(id_offset, reason))?;
            let providers = parse_providers(entry.providers.get_ref())
                .map_err(|reason| invalid(entry.providers.span().start, reason))?;
            let rule = CallerRule {
                providers,
                invalidate: entry.invalidate,
                require_id_token: entry.require_id_token,
                bypass_cache: entry.bypass_cache,
            };
            if callers.insert(id, rule).is_some() {
                return Err(invalid(
                    id_offset,
                    format!("caller {raw_id:?} is listed twice"),
                ));
            }
        }
        Ok(Self {
            mode: Mode::Listed(callers),
        })
    }

    /// The caller's rule, or CALLER_UNKNOWN when the caller is not listed.
    pub fn rule_for(&self, caller: &str) -> Result<CallerRule, BrokerError> {
        match &self.mode {
            Mode::AllowAny => Ok(CallerRule::everything()),
            Mode::Listed(callers) => callers.get(caller).cloned().ok_or_else(|| {
                BrokerError::CallerUnknown(format!(
                    "caller {:?} is not in the broker's policy; ask the operator to add it",
                    capped(caller)
                ))
            }),
        }
    }

    /// How many callers are listed (`None` with `--allow-any-caller`), for logs.
    pub fn listed_callers(&self) -> Option<usize> {
        match &self.mode {
            Mode::AllowAny => None,
            Mode::Listed(callers) => Some(callers.len()),
        }
    }
}

fn parse_providers(values: &[String]) -> Result<Providers, String> {
    if values.iter().any(|value| value == ALL_PROVIDERS) {
        if values.len() > 1 {
            return Err(
                "providers: \"*\" already means all providers; list nothing else".to_owned(),
            );
        }
        return Ok(Providers::All);
    }
    if let Some(empty) = values.iter().find(|value| value.trim().is_empty()) {
        return Err(format!("providers: {empty:?} is not a provider name"));
    }
    Ok(Providers::Only(Arc::new(values.iter().cloned().collect())))
}

/// 1-based line number of a byte offset; also names lines of the connections file.
pub(crate) fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

impl ReloadableFile for Policy {
    type Error = PolicyError;

    fn load(path: &Path) -> Result<Self, PolicyError> {
        Policy::load(path)
    }

    /// No policy file: `--allow-any-caller`.
    fn without_file() -> Self {
        Policy::allow_any()
    }

    fn reloaded(&self, path: &Path) {
        tracing::info!(path = %path.display(), callers = self.listed_callers(), "policy reloaded");
        crate::stats::policy_reload(true);
    }

    fn not_reloaded(error: &PolicyError) {
        crate::stats::policy_reload(false);
        tracing::error!(%error, "policy not reloaded: keeping the previous policy");
    }
}

/// The policy in force (see [`FileStore`]); with `--allow-any-caller`
/// there is no file and nothing to reload.
pub type PolicyStore = FileStore<Policy>;

#[cfg(test)]
mod tests {
    use super::*;

    const BILLING: &str = "spiffe://example.org/ns/prod/sa/billing";

    fn parse(text: &str) -> Result<Policy, PolicyError> {
        Policy::parse(text, Path::new("policy.toml"))
    }

    #[test]
    fn listed_caller_gets_its_providers_and_nothing_else() {
        let policy = parse(&format!(
            "[[caller]]\nid = \"{BILLING}\"\nproviders = [\"github\"]\n"
        ))
        .unwrap();
        let rule = policy.rule_for(BILLING).unwrap();
        assert!(rule.allows_provider("github"));
        assert!(!rule.allows_provider("google-oauth2"));
        assert!(!rule.invalidate);
        assert!(!rule.require_id_token, "binding to an ID token is opt-in");
        assert!(
            !rule.bypass_cache,
            "bypass_cache is a privilege, off unless granted"
        );
    }

    #[test]
    fn ids_match_only_their_own_kind() {
        let policy = parse(
            "[[caller]]\nid = \"spiffe://example.org/sa/reports\"\nproviders = [\"*\"]\n\n\
             [[caller]]\nid = \"dns:billing.svc\"\nproviders = [\"*\"]\n\n\
             [[caller]]\nid = \"cn:legacy\"\nproviders = [\"*\"]\nbypass_cache = true\n",
        )
        .unwrap();
        assert!(policy.rule_for("spiffe://example.org/sa/reports").is_ok());
        assert!(policy
            .rule_for("cn:spiffe://example.org/sa/reports")
            .is_err());
        assert!(policy.rule_for("billing.svc").is_ok());
        assert!(policy.rule_for("cn:billing.svc").is_err());
        assert!(policy.rule_for("cn:legacy").unwrap().bypass_cache);
        assert!(policy.rule_for("legacy").is_err());
    }

    #[test]
    fn an_id_that_can_match_no_certificate_names_its_line() {
        let error =
            parse("[[caller]]\nid = \"a\"\nproviders = [\"*\"]\n\n[[caller]]\nid = \"legacy billing\"\nproviders = [\"*\"]\n")
                .unwrap_err()
                .to_string();
        assert!(error.starts_with("policy.toml:6:"), "{error}");
        assert!(error.contains("cn:legacy billing"), "{error}");
    }

    #[test]
    fn a_caller_can_be_made_to_send_id_tokens() {
        let policy = parse(
            "[[caller]]\nid = \"spa-backend\"\nproviders = [\"*\"]\nrequire_id_token = true\n",
        )
        .unwrap();
        assert!(policy.rule_for("spa-backend").unwrap().require_id_token);
    }

    #[test]
    fn star_means_every_provider() {
        let policy =
            parse("[[caller]]\nid = \"a\"\nproviders = [\"*\"]\ninvalidate = true\n").unwrap();
        let rule = policy.rule_for("a").unwrap();
        assert!(rule.allows_provider("anything"));
        assert!(rule.invalidate);
    }

    #[test]
    fn unlisted_caller_is_denied() {
        let policy = parse("[[caller]]\nid = \"a\"\nproviders = [\"*\"]\n").unwrap();
        assert!(matches!(
            policy.rule_for("b"),
            Err(BrokerError::CallerUnknown(_))
        ));
    }

    #[test]
    fn unknown_key_names_file_and_line() {
        let error =
            parse("[[caller]]\nid = \"a\"\nproviders = [\"*\"]\nadmin = true\n").unwrap_err();
        let text = error.to_string();
        assert!(text.starts_with("policy.toml:"), "{text}");
        assert!(text.contains("admin"), "{text}");
    }

    #[test]
    fn duplicate_id_names_the_line_of_the_second() {
        let error = parse(
            "[[caller]]\nid = \"a\"\nproviders = [\"*\"]\n\n[[caller]]\nid = \"a\"\nproviders = [\"github\"]\n",
        )
        .unwrap_err();
        assert!(error.to_string().starts_with("policy.toml:6:"), "{error}");
        assert!(error.to_string().contains("listed twice"), "{error}");
    }

    #[test]
    fn syntax_error_names_its_line() {
        let error = parse("[[caller]]\nid = \"a\"\nproviders = [\"*\"\n").unwrap_err();
        assert!(error.to_string().starts_with("policy.toml:"), "{error}");
    }

    #[test]
    fn missing_providers_is_refused() {
        assert!(parse("[[caller]]\nid = \"a\"\n").is_err());
    }

    #[test]
    fn allow_any_allows_everything() {
        let rule = Policy::allow_any().rule_for("whoever").unwrap();
        assert!(rule.allows_provider("github") && rule.invalidate);
    }
}
