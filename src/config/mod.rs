//! Command line and environment: what the operator can set, and the validated
//! settings the rest of the broker runs on.
//!
//! Every flag has an environment fallback so a Kubernetes pod spec can set it
//! with `env:`. Validation happens once, at start: a bad setting stops the
//! process with one line that names the setting, instead of surfacing as a
//! confusing RPC error later.

mod common;

pub use common::CommonArgs;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use std::sync::Arc;

use clap::{Args, Parser, Subcommand};
use secrecy::SecretString;
use url::Url;

use crate::auth0::{Auth0Settings, ClientCredential, KeyFileError, SigningKeyFile};
use crate::server::{BrokerSettings, ServeConfig};
use crate::tls::TlsFiles;

/// The `tokenbroker` command line.
#[derive(Debug, Parser)]
#[command(name = "tokenbroker", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// The two ways to run the broker.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run in production against a real Auth0 tenant.
    Serve(Box<ServeArgs>),
    /// Run with an embedded Auth0 emulator, a generated dev PKI and no account.
    Dev(Box<DevArgs>),
    /// Print the audit fingerprint (`token_hmac`) of a token read from stdin, to find
    /// where a leaked token was released.
    AuditHash(AuditHashArgs),
}

/// `tokenbroker audit-hash`: the investigator's side of `token_hmac`.
#[derive(Debug, Args)]
pub struct AuditHashArgs {
    /// The audit key file the broker runs with (TOKENBROKER_AUDIT_KEY_FILE).
    #[arg(long, env = "TOKENBROKER_AUDIT_KEY_FILE")]
    pub key_file: PathBuf,
}

/// `tokenbroker serve`: every setting of a production broker.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Auth0 tenant: a bare host (`tenant.eu.auth0.com`, https) or a full `http(s)://host:port` URL.
    #[arg(long, env = "AUTH0_DOMAIN")]
    pub auth0_domain: String,

    /// Client id of the Machine-to-Machine application that may call the Management API.
    #[arg(long, env = "AUTH0_CLIENT_ID")]
    pub auth0_client_id: String,

    /// Client secret of that application (prefer --auth0-client-secret-file).
    #[arg(long, env = "AUTH0_CLIENT_SECRET", hide_env_values = true)]
    pub auth0_client_secret: Option<String>,

    /// File holding the client secret (a Kubernetes secret mount); surrounding whitespace is ignored.
    #[arg(long, env = "AUTH0_CLIENT_SECRET_FILE")]
    pub auth0_client_secret_file: Option<PathBuf>,

    /// PEM RSA private key (PKCS#8 or PKCS#1) for private_key_jwt: every /oauth/token call carries a new
    /// client assertion signed with it instead of a client secret. Reloaded when the file changes.
    #[arg(long, env = "AUTH0_CLIENT_ASSERTION_KEY_FILE")]
    pub auth0_client_assertion_key_file: Option<PathBuf>,

    /// The `kid` Auth0 gave the registered public key, sent in every client assertion (optional).
    #[arg(long, env = "AUTH0_CLIENT_ASSERTION_KEY_ID")]
    pub auth0_client_assertion_key_id: Option<String>,

    /// PEM RSA private key that signs Token Vault subject tokens, when not the client assertion key.
    #[arg(long, env = "AUTH0_TOKEN_VAULT_SUBJECT_KEY_FILE")]
    pub auth0_token_vault_subject_key_file: Option<PathBuf>,

    /// The `kid` of the Privileged Worker public key, sent in every subject token (optional; with
    /// no subject key file the client assertion key's id is sent).
    #[arg(long, env = "AUTH0_TOKEN_VAULT_SUBJECT_KEY_ID")]
    pub auth0_token_vault_subject_key_id: Option<String>,

    /// Management API audience; default `{base}/api/v2/`. Set it when AUTH0_DOMAIN is a custom domain.
    #[arg(long, env = "AUTH0_AUDIENCE")]
    pub auth0_audience: Option<String>,

    /// Address of the mTLS listener (TokenBroker API, reflection, health).
    #[arg(long, env = "TOKENBROKER_LISTEN", default_value = "0.0.0.0:50051")]
    pub listen: SocketAddr,

    /// PEM certificate chain the broker presents.
    #[arg(long, env = "TOKENBROKER_TLS_CERT")]
    pub tls_cert: PathBuf,

    /// PEM private key of that certificate.
    #[arg(long, env = "TOKENBROKER_TLS_KEY")]
    pub tls_key: PathBuf,

    /// PEM bundle of the CA(s) that issue caller certificates; no other client gets past the handshake.
    #[arg(long, env = "TOKENBROKER_CLIENT_CA")]
    pub client_ca: PathBuf,

    /// Caller policy (TOML): which caller ids may have which providers' tokens.
    #[arg(long, env = "TOKENBROKER_POLICY")]
    pub policy: Option<PathBuf>,

    /// Run without a policy: every caller with a certificate from the client CA may call every RPC.
    #[arg(long, env = "TOKENBROKER_ALLOW_ANY_CALLER", value_parser = clap::builder::BoolishValueParser::new())]
    pub allow_any_caller: bool,

    /// Client ids of the apps users sign in to, comma-separated: an `id_token` must carry one
    /// as `aud`. Unset: requests with an `id_token` get FAILED_PRECONDITION.
    #[arg(long, env = "AUTH0_ID_TOKEN_AUDIENCES", value_delimiter = ',')]
    pub auth0_id_token_audiences: Vec<String>,

    #[command(flatten)]
    pub common: CommonArgs,
}

/// `tokenbroker dev`: a self-contained broker for trying it out.
#[derive(Debug, Args)]
pub struct DevArgs {
    /// Address of the broker's mTLS listener.
    #[arg(long, env = "TOKENBROKER_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,

    /// Directory for the generated dev CA, certificates and keys (reused on the next run).
    #[arg(long, env = "TOKENBROKER_DEV_DIR", default_value = ".tokenbroker-dev")]
    pub dir: PathBuf,

    #[command(flatten)]
    pub common: CommonArgs,
}

/// A setting that cannot work; the message names it and says why.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("AUTH0_DOMAIN {value:?}: {reason}")]
    Domain { value: String, reason: String },
    #[error("AUTH0_AUDIENCE {value:?}: not an absolute URL")]
    Audience { value: String },
    #[error("AUTH0_CLIENT_ID is empty")]
    EmptyClientId,
    #[error("give exactly one of AUTH0_CLIENT_SECRET and AUTH0_CLIENT_SECRET_FILE (got {given})")]
    SecretSource { given: &'static str },
    #[error("AUTH0_CLIENT_SECRET_FILE {path}: {source}")]
    SecretFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the Auth0 client secret is empty")]
    EmptySecret,
    #[error("give either a client secret (AUTH0_CLIENT_SECRET or AUTH0_CLIENT_SECRET_FILE) or AUTH0_CLIENT_ASSERTION_KEY_FILE, not both: with a client assertion key the broker holds no secret")]
    SecretAndAssertionKey,
    #[error("give one of AUTH0_CLIENT_SECRET , AUTH0_CLIENT_SECRET_FILE or AUTH0_CLIENT_ASSERTION_KEY_FILE: the broker authenticates to Auth0 with a client secret or a private_key_jwt assertion key")]
    NoClientCredential,
    #[error("{id} needs {file}: it names the key that file holds")]
    KeyIdWithoutKey {
        id: &'static str,
        file: &'static str,
    },
    #[error(transparent)]
    KeyFile(#[from] KeyFileError),
    #[error("TOKENBROKER_USER_CACHE_CAPACITY must be at least 1")]
    ZeroCapacity,
    #[error("{name} must be more than zero")]
    ZeroDuration { name: &'static str },
    #[error("{name} must be at least 1")]
    Zero { name: &'static str },
    #[error("TOKENBROKER_AUTH0_CALLER_SHARE {0}: must be more than 0 and at most 1")]
    CallerShare(f64),
    #[error("no caller policy: give TOKENBROKER_POLICY (a policy file) or, to let every caller with a client-CA certificate call every RPC, --allow-any-caller")]
    NoPolicy,
    #[error("give either TOKENBROKER_POLICY or --allow-any-caller, not both")]
    PolicyAndAllowAny,
    #[error("TOKENBROKER_REDIS_URL needs TOKENBROKER_CACHE_KEY_FILE, the same on every replica: it seals what the fleet keeps in Redis (make one with `openssl rand -base64 32`)")]
    CacheKeyMissing,
    #[error("{name} only applies with TOKENBROKER_REDIS_URL, which is not set")]
    WithoutRedis { name: &'static str },
}

impl ServeArgs {
    /// Checks every setting and reads the secret file, so bad config fails at start.
    pub fn validate(&self) -> Result<ServeConfig, ConfigError> {
        let base_url = parse_auth0_base_url(&self.auth0_domain)?;
        let audience = match &self.auth0_audience {
            Some(value) => validate_audience(value)?,
            None => format!("{base_url}/api/v2/"),
        };
        if self.auth0_client_id.trim().is_empty() {
            return Err(ConfigError::EmptyClientId);
        }
        let credential = self.client_credential()?;
        let token_vault_subject_key = self.token_vault_subject_key()?;
        let id_token = self
            .common
            .id_token_settings(&base_url, &self.auth0_id_token_audiences);
        let auth0 = Auth0Settings {
            base_url,
            audience,
            client_id: self.auth0_client_id.trim().to_owned(),
            credential,
            token_vault_subject_key,
            connect_timeout: *self.common.auth0_connect_timeout,
            request_timeout: *self.common.auth0_timeout,
        };
        let policy = match (&self.policy, self.allow_any_caller) {
            (Some(path), false) => Some(path.clone()),
            (None, true) => None,
            (None, false) => return Err(ConfigError::NoPolicy),
            (Some(_), true) => return Err(ConfigError::PolicyAndAllowAny),
        };
        Ok(ServeConfig {
            listen: self.listen,
            health_listen: self.common.health_listen,
            metrics_listen: self.common.metrics_listen,
            policy,
            run: self.common.run_settings()?,
            tls: TlsFiles {
                cert: self.tls_cert.clone(),
                key: self.tls_key.clone(),
                client_ca: self.client_ca.clone(),
            },
            broker: BrokerSettings {
                resilience: self.common.resilience_settings()?,
                auth0,
                cache: self.common.cache_settings()?,
                id_token,
                audit: self.common.audit_settings(),
                freshness: self.common.freshness_settings(),
                fleet: self.common.fleet_settings()?,
            },
        })
    }
}

impl ServeArgs {
    /// The client secret, or the client assertion key (read and checked
    /// now): exactly one of them.
    fn client_credential(&self) -> Result<ClientCredential, ConfigError> {
        let secret_given =
            self.auth0_client_secret.is_some() || self.auth0_client_secret_file.is_some();
        match (&self.auth0_client_assertion_key_file, secret_given) {
            (Some(_), true) => Err(ConfigError::SecretAndAssertionKey),
            (None, false) => Err(ConfigError::NoClientCredential),
            (Some(path), false) => Ok(ClientCredential::AssertionKey(Arc::new(
                SigningKeyFile::open(
                    "AUTH0_CLIENT_ASSERTION_KEY_FILE",
                    path,
                    self.auth0_client_assertion_key_id.clone(),
                )?,
            ))),
            (None, true) => {
                if self.auth0_client_assertion_key_id.is_some() {
                    return Err(ConfigError::KeyIdWithoutKey {
                        id: "AUTH0_CLIENT_ASSERTION_KEY_ID",
                        file: "AUTH0_CLIENT_ASSERTION_KEY_FILE",
                    });
                }
                Ok(ClientCredential::Secret(read_client_secret(
                    self.auth0_client_secret.as_deref(),
                    self.auth0_client_secret_file.as_deref(),
                )?))
            }
        }
    }

    /// The key that signs Token Vault subject tokens when it is not the
    /// client assertion key.
    fn token_vault_subject_key(&self) -> Result<Option<Arc<SigningKeyFile>>, ConfigError> {
        let Some(path) = &self.auth0_token_vault_subject_key_file else {
            if self.auth0_token_vault_subject_key_id.is_some() {
                return Err(ConfigError::KeyIdWithoutKey {
                    id: "AUTH0_TOKEN_VAULT_SUBJECT_KEY_ID",
                    file: "AUTH0_TOKEN_VAULT_SUBJECT_KEY_FILE",
                });
            }
            return Ok(None);
        };
        let key = SigningKeyFile::open(
            "AUTH0_TOKEN_VAULT_SUBJECT_KEY_FILE",
            path,
            self.auth0_token_vault_subject_key_id.clone(),
        )?;
        Ok(Some(Arc::new(key)))
    }
}

/// Accepts `tenant.auth0.com` (https implied) or `http(s)://host[:port]` and
/// returns `scheme://host[:port]` with no trailing slash.
pub fn parse_auth0_base_url(value: &str) -> Result<String, ConfigError> {
    let fail = |reason: &str| ConfigError::Domain {
        value: value.to_owned(),
        reason: reason.to_owned(),
    };
    let trimmed = value.trim();
    if trimmed.is_empty() {
        return Err(fail("is empty"));
    }
    let with_scheme = if trimmed.contains("://") {
        trimmed.to_owned()
    } else {
        format!("https://{trimmed}")
    };
    let url =
        Url::parse(&with_scheme).map_err(|e| fail(&format!("not a host name or URL ({e})")))?;
    if url.scheme() != "https" && url.scheme() != "http" {
        return Err(fail("scheme must be https (or http for a local emulator)"));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(fail("has no host"));
    }
    if url.path() != "/" || url.query().is_some() || url.fragment().is_some() {
        return Err(fail(
            "must be a bare host or scheme://host[:port], without a path",
        ));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(fail("must not carry credentials"));
    }
    Ok(url.as_str().trim_end_matches('/').to_owned())
}

fn validate_audience(value: &str) -> Result<String, ConfigError> {
    match Url::parse(value.trim()) {
        Ok(_) => Ok(value.trim().to_owned()),
        Err(_) => Err(ConfigError::Audience {
            value: value.to_owned(),
        }),
    }
}

fn read_client_secret(
    inline: Option<&str>,
    file: Option<&Path>,
) -> Result<SecretString, ConfigError> {
    let secret = match (inline, file) {
        (Some(value), None) => value.trim().to_owned(),
        (None, Some(path)) => std::fs::read_to_string(path)
            .map_err(|source| ConfigError::SecretFile {
                path: path.to_owned(),
                source,
            })?
            .trim()
            .to_owned(),
        (Some(_), Some(_)) => return Err(ConfigError::SecretSource { given: "both" }),
        (None, None) => return Err(ConfigError::SecretSource { given: "neither" }),
    };
    if secret.is_empty() {
        return Err(ConfigError::EmptySecret);
    }
    Ok(SecretString::from(secret))
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    #[test]
    fn bare_domain_means_https() {
        assert_eq!(
            parse_auth0_base_url("tenant.eu.auth0.com").unwrap(),
            "https://tenant.eu.auth0.com"
        );
    }

    #[test]
    fn full_url_with_port_is_kept_for_emulators() {
        assert_eq!(
            parse_auth0_base_url("http://127.0.0.1:8080/").unwrap(),
            "http://127.0.0.1:8080"
        );
    }

    #[test]
    fn domain_with_path_or_odd_scheme_is_refused() {
        assert!(parse_auth0_base_url("https://tenant.auth0.com/api").is_err());
        assert!(parse_auth0_base_url("ftp://tenant.auth0.com").is_err());
        assert!(parse_auth0_base_url("").is_err());
    }

    #[test]
    fn secret_file_is_trimmed_and_both_sources_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        std::fs::write(&path, "s3cret\n").unwrap();
        let secret = read_client_secret(None, Some(&path)).unwrap();
        assert_eq!(secret.expose_secret(), "s3cret");
        assert!(matches!(
            read_client_secret(Some("x"), Some(&path)),
            Err(ConfigError::SecretSource { given: "both" })
        ));
        assert!(matches!(
            read_client_secret(None, None),
            Err(ConfigError::SecretSource { given: "neither" })
        ));
    }

    /// `serve` arguments with these extra flags (domain, client id, TLS files
    /// and --allow-any-caller given).
    fn serve_args(extra: &[&str]) -> ServeArgs {
        let base = [
            "tokenbroker",
            "serve",
            "--auth0-domain=tenant.example",
            "--auth0-client-id=client",
            "--tls-cert=/c",
            "--tls-key=/k",
            "--client-ca=/ca",
            "--allow-any-caller",
        ];
        let argv = base.iter().chain(extra).copied();
        match Cli::try_parse_from(argv).expect("parses").command {
            Command::Serve(args) => *args,
            other => panic!("{other:?}"),
        }
    }

    fn key_file(dir: &tempfile::TempDir) -> String {
        let path = dir.path().join("assertion.pem");
        std::fs::write(&path, crate::emulator::keys::CLIENT_ASSERTION_KEY_2).unwrap();
        path.display().to_string()
    }

    #[test]
    fn an_assertion_key_replaces_the_secret_and_both_or_neither_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let key = format!("--auth0-client-assertion-key-file={}", key_file(&dir));
        let credential = serve_args(&[&key, "--auth0-client-assertion-key-id=kid-1"])
            .client_credential()
            .unwrap();
        let ClientCredential::AssertionKey(key_file) = credential else {
            panic!("{credential:?}")
        };
        assert_eq!(key_file.key_id(), Some("kid-1"));
        let both = serve_args(&[&key, "--auth0-client-secret=s"])
            .client_credential()
            .unwrap_err()
            .to_string();
        assert!(
            both.contains("AUTH0_CLIENT_SECRET")
                && both.contains("AUTH0_CLIENT_ASSERTION_KEY_FILE"),
            "{both}"
        );
        let neither = serve_args(&[]).client_credential().unwrap_err().to_string();
        for setting in [
            "AUTH0_CLIENT_SECRET ",
            "AUTH0_CLIENT_SECRET_FILE",
            "AUTH0_CLIENT_ASSERTION_KEY_FILE",
        ] {
            assert!(neither.contains(setting), "{neither}");
        }
    }

    #[test]
    fn a_bad_key_file_or_a_lone_key_id_fails_at_start_naming_the_setting() {
        let dir = tempfile::tempdir().unwrap();
        let bad = dir.path().join("bad.pem");
        std::fs::write(&bad, "not a key").unwrap();
        let error = serve_args(&[&format!(
            "--auth0-token-vault-subject-key-file={}",
            bad.display()
        )])
        .token_vault_subject_key()
        .unwrap_err()
        .to_string();
        assert!(
            error.starts_with("AUTH0_TOKEN_VAULT_SUBJECT_KEY_FILE "),
            "{error}"
        );
        let lone = serve_args(&[
            "--auth0-client-secret=s",
            "--auth0-client-assertion-key-id=k",
        ])
        .client_credential()
        .unwrap_err()
        .to_string();
        assert!(
            lone.starts_with("AUTH0_CLIENT_ASSERTION_KEY_ID needs"),
            "{lone}"
        );
    }

    #[test]
    fn missing_secret_file_names_the_setting() {
        let err = read_client_secret(None, Some(Path::new("/nonexistent/secret"))).unwrap_err();
        assert!(err.to_string().starts_with("AUTH0_CLIENT_SECRET_FILE"));
    }
}
