//! Worker join tokens. One secret serves a whole fleet, each token proves exactly one node id
//! until it expires, and the registry stores no per-node credentials.
//!
//! A token is ASCII: `sllm1.<node_id>.<expiry_unix_s>.<mac>`, where `mac` is the lower-case hex
//! HMAC-SHA256, under a join secret, of `sllm1\n<node_id>\n<expiry_unix_s>` (the version tag is
//! inside the MAC so no other message signed with the secret can pass as a token). Node ids may
//! contain dots, so the token is split from the right.
//!
//! Several secrets can be accepted at once ([`JoinSecrets`]): rotation adds a new secret,
//! re-issues tokens under it, then removes the old one. A worker only needs its token, never a
//! secret. Tokens of the first format (the bare hex HMAC of the node id, never expiring) are
//! refused unless the operator allows them explicitly (`--accept-legacy-join-tokens`).

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::{Choice, ConstantTimeEq};

/// The version tag every current token starts with (followed by a dot).
pub const TOKEN_PREFIX: &str = "sllm1";

/// How long a token minted without an explicit lifetime stays valid: 30 days.
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

/// Longest token read: a node id is at most 128 characters, so anything far longer is not a
/// token, and parsing it is not worth the work.
const MAX_TOKEN_LEN: usize = 512;

/// Why a join token was refused. Messages name the token, never echo it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not a token of any known shape.
    #[error("join token is malformed: {0}")]
    Malformed(&'static str),
    /// A bare HMAC of the node id (the first format), and this process refuses those.
    #[error(
        "join token has the legacy format (no expiry), which is refused: mint a new one with \
         `sllm join-token`, or start the registry and Dispatch with --accept-legacy-join-tokens"
    )]
    LegacyRefused,
    /// Not signed by any configured secret (wrong secret, a removed one, or tampered with).
    #[error("join token does not prove the node id under any configured join secret")]
    BadSignature,
    /// Genuine, but for another node.
    #[error("join token is for node {token_node:?}, not {node:?}")]
    WrongNode {
        /// The node the token names.
        token_node: String,
        /// The node that presented it.
        node: String,
    },
    /// Genuine, but past its expiry.
    #[error(
        "join token expired at {} (unix {expiry_unix_s}), {} s ago: mint a new one with \
         `sllm join-token`", utc(*.expiry_unix_s), .now_unix_s.saturating_sub(*.expiry_unix_s)
    )]
    Expired {
        /// When it expired, in seconds since the Unix epoch.
        expiry_unix_s: u64,
        /// The time it was checked at.
        now_unix_s: u64,
    },
}

impl From<TokenError> for tonic::Status {
    /// Every refusal is UNAUTHENTICATED: the caller did not prove who it is.
    fn from(e: TokenError) -> tonic::Status {
        tonic::Status::unauthenticated(e.to_string())
    }
}

/// A refusal to build a secret set.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    /// A secret too short to resist guessing.
    #[error("join secret #{index} must be at least 16 bytes, got {len}")]
    TooShort {
        /// Its position (1-based) in the list it came from.
        index: usize,
        /// Its length.
        len: usize,
    },
    /// No secret at all.
    #[error("no join secret given")]
    Empty,
}

/// One join secret: mints tokens and checks them.
#[derive(Clone)]
pub struct JoinSecret(Arc<[u8]>);

impl std::fmt::Debug for JoinSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JoinSecret(..)")
    }
}

/// Seconds since the Unix epoch now (0 for a clock set before 1970, which makes every token
/// look fresh rather than failing every worker).
pub fn now_unix_s() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl JoinSecret {
    /// A secret from its bytes (at least 16).
    pub fn new(secret: impl Into<Vec<u8>>) -> Result<JoinSecret, String> {
        Self::checked(secret.into(), 1).map_err(|e| e.to_string())
    }

    fn checked(secret: Vec<u8>, index: usize) -> Result<JoinSecret, SecretError> {
        if secret.len() < 16 {
            return Err(SecretError::TooShort { index, len: secret.len() });
        }
        Ok(JoinSecret(secret.into()))
    }

    fn mac(&self, parts: &[&[u8]]) -> Hmac<Sha256> {
        // HMAC accepts keys of any length, so building the MAC cannot fail.
        let mut mac =
            <Hmac<Sha256> as Mac>::new_from_slice(&self.0).expect("HMAC takes keys of any length");
        for p in parts {
            mac.update(p);
        }
        mac
    }

    fn current_mac(&self, node_id: &str, expiry: &str) -> Hmac<Sha256> {
        self.mac(&[TOKEN_PREFIX.as_bytes(), b"\n", node_id.as_bytes(), b"\n", expiry.as_bytes()])
    }

    /// A token proving `node_id` for [`DEFAULT_TOKEN_TTL`] from now.
    pub fn token_for(&self, node_id: &str) -> String {
        self.token_with_ttl(node_id, DEFAULT_TOKEN_TTL)
    }

    /// A token proving `node_id` for `ttl` from now.
    pub fn token_with_ttl(&self, node_id: &str, ttl: Duration) -> String {
        self.token_expiring_at(node_id, now_unix_s().saturating_add(ttl.as_secs()))
    }

    /// A token proving `node_id` until `expiry_unix_s` (seconds since the Unix epoch).
    pub fn token_expiring_at(&self, node_id: &str, expiry_unix_s: u64) -> String {
        let expiry = expiry_unix_s.to_string();
        let mac = hex::encode(self.current_mac(node_id, &expiry).finalize().into_bytes());
        format!("{TOKEN_PREFIX}.{node_id}.{expiry}.{mac}")
    }

    /// A token of the legacy format (bare HMAC of the node id, no expiry): only to test that
    /// such tokens are refused, or to let an old fleet migrate.
    pub fn legacy_token_for(&self, node_id: &str) -> String {
        hex::encode(self.mac(&[node_id.as_bytes()]).finalize().into_bytes())
    }
}

/// The join secrets a process accepts tokens under (the first one also mints), and whether it
/// accepts legacy tokens. Cheap to clone.
#[derive(Clone, Debug)]
pub struct JoinSecrets {
    secrets: Arc<[JoinSecret]>,
    accept_legacy: bool,
}

impl From<JoinSecret> for JoinSecrets {
    fn from(secret: JoinSecret) -> JoinSecrets {
        JoinSecrets { secrets: Arc::from(vec![secret]), accept_legacy: false }
    }
}

/// A token split into its fields.
struct Parsed<'a> {
    node_id: &'a str,
    expiry: &'a str,
    expiry_unix_s: u64,
    mac: [u8; 32],
}

fn parse(token: &str) -> Result<Parsed<'_>, TokenError> {
    let rest = token
        .strip_prefix(TOKEN_PREFIX)
        .and_then(|r| r.strip_prefix('.'))
        .ok_or(TokenError::Malformed("it does not start with `sllm1.`"))?;
    let (rest, mac_hex) =
        rest.rsplit_once('.').ok_or(TokenError::Malformed("it has no MAC field"))?;
    let (node_id, expiry) =
        rest.rsplit_once('.').ok_or(TokenError::Malformed("it has no expiry field"))?;
    if node_id.is_empty() {
        return Err(TokenError::Malformed("its node id is empty"));
    }
    // Digits only: `u64::from_str` would also take a leading `+`, giving one token two spellings.
    if expiry.is_empty() || expiry.len() > 20 || !expiry.bytes().all(|b| b.is_ascii_digit()) {
        return Err(TokenError::Malformed("its expiry is not a number of seconds"));
    }
    let expiry_unix_s =
        expiry.parse().map_err(|_| TokenError::Malformed("its expiry is out of range"))?;
    let mut mac = [0u8; 32];
    hex::decode_to_slice(mac_hex, &mut mac)
        .map_err(|_| TokenError::Malformed("its MAC is not 64 hex digits"))?;
    Ok(Parsed { node_id, expiry, expiry_unix_s, mac })
}

impl JoinSecrets {
    /// Secrets in order of preference (the first mints tokens); at least one.
    pub fn new(secrets: Vec<JoinSecret>) -> Result<JoinSecrets, SecretError> {
        if secrets.is_empty() {
            return Err(SecretError::Empty);
        }
        Ok(JoinSecrets { secrets: secrets.into(), accept_legacy: false })
    }

    /// Secrets from their text, in order (the first mints tokens); each at least 16 bytes.
    pub fn from_strings<S: AsRef<str>>(secrets: &[S]) -> Result<JoinSecrets, SecretError> {
        let secrets = secrets
            .iter()
            .enumerate()
            .map(|(i, s)| JoinSecret::checked(s.as_ref().as_bytes().to_vec(), i + 1))
            .collect::<Result<Vec<_>, _>>()?;
        Self::new(secrets)
    }

    /// The same secrets, accepting legacy tokens (bare HMAC, no expiry) too when `accept`.
    pub fn accept_legacy(mut self, accept: bool) -> JoinSecrets {
        self.accept_legacy = accept;
        self
    }

    /// Whether legacy tokens are accepted.
    pub fn accepts_legacy(&self) -> bool {
        self.accept_legacy
    }

    /// How many secrets are accepted.
    pub fn len(&self) -> usize {
        self.secrets.len()
    }

    /// Never true (a set has at least one secret); here because `len` is.
    pub fn is_empty(&self) -> bool {
        self.secrets.is_empty()
    }

    /// The secret this process mints tokens with (the first one).
    pub fn minting(&self) -> &JoinSecret {
        // `new` refuses an empty list, and nothing removes secrets afterwards.
        &self.secrets[0]
    }

    /// Checks that `token` proves `node_id` now.
    pub fn verify(&self, node_id: &str, token: &str) -> Result<(), TokenError> {
        self.verify_at(node_id, token, now_unix_s())
    }

    /// Checks that `token` proves `node_id` at `now_unix_s`. The MAC is checked under every
    /// secret, without stopping at the first match, in constant time per secret; only a
    /// genuine token's fields (node, expiry) are then looked at.
    pub fn verify_at(&self, node_id: &str, token: &str, now_unix_s: u64) -> Result<(), TokenError> {
        let token = token.trim();
        if token.is_empty() {
            return Err(TokenError::Malformed("it is empty"));
        }
        if token.len() > MAX_TOKEN_LEN {
            return Err(TokenError::Malformed("it is too long"));
        }
        if !token.starts_with(TOKEN_PREFIX) && token.len() == 64 {
            return self.verify_legacy(node_id, token);
        }
        let parsed = parse(token)?;
        let mut genuine = Choice::from(0);
        for s in self.secrets.iter() {
            let mac = s.current_mac(parsed.node_id, parsed.expiry).finalize().into_bytes();
            genuine |= mac.as_slice().ct_eq(&parsed.mac);
        }
        if !bool::from(genuine) {
            return Err(TokenError::BadSignature);
        }
        if parsed.node_id != node_id {
            return Err(TokenError::WrongNode {
                token_node: parsed.node_id.to_string(),
                node: node_id.to_string(),
            });
        }
        if parsed.expiry_unix_s <= now_unix_s {
            return Err(TokenError::Expired { expiry_unix_s: parsed.expiry_unix_s, now_unix_s });
        }
        Ok(())
    }

    fn verify_legacy(&self, node_id: &str, token: &str) -> Result<(), TokenError> {
        let mut presented = [0u8; 32];
        if hex::decode_to_slice(token, &mut presented).is_err() {
            return Err(TokenError::Malformed("it is neither `sllm1.…` nor 64 hex digits"));
        }
        if !self.accept_legacy {
            return Err(TokenError::LegacyRefused);
        }
        let mut genuine = Choice::from(0);
        for s in self.secrets.iter() {
            let mac = s.mac(&[node_id.as_bytes()]).finalize().into_bytes();
            genuine |= mac.as_slice().ct_eq(&presented);
        }
        if bool::from(genuine) { Ok(()) } else { Err(TokenError::BadSignature) }
    }
}

/// `YYYY-MM-DDTHH:MM:SSZ` for seconds since the Unix epoch (proleptic Gregorian calendar).
pub fn utc(unix_s: u64) -> String {
    let days = (unix_s / 86_400) as i64;
    let secs = unix_s % 86_400;
    // Howard Hinnant's days-to-civil: exact for every day a u64 of seconds can name.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    const NOW: u64 = 1_700_000_000;

    fn secret(s: &str) -> JoinSecret {
        JoinSecret::new(s).unwrap()
    }

    #[test]
    fn a_token_proves_one_node_under_one_secret_until_it_expires() {
        let s = secret("0123456789abcdef-secret");
        let set = JoinSecrets::from(s.clone());
        let t = s.token_expiring_at("gpu-7", NOW + 60);
        assert!(t.starts_with("sllm1.gpu-7.1700000060."), "{t}");
        assert_eq!(set.verify_at("gpu-7", &t, NOW), Ok(()));
        assert_eq!(set.verify_at("gpu-7", &format!(" {t}\n"), NOW), Ok(()), "file newlines");
        assert!(matches!(set.verify_at("gpu-8", &t, NOW), Err(TokenError::WrongNode { .. })));
        let expired = set.verify_at("gpu-7", &t, NOW + 60).unwrap_err();
        assert_eq!(expired, TokenError::Expired { expiry_unix_s: NOW + 60, now_unix_s: NOW + 60 });
        let message = expired.to_string();
        assert!(message.contains("expired at 2023-11-14T22:14:20Z"), "{message}");
        let other = JoinSecrets::from(secret("another-secret-of-16+"));
        assert_eq!(other.verify_at("gpu-7", &t, NOW), Err(TokenError::BadSignature));
        // A token whose expiry was pushed out no longer matches its MAC.
        let forged = t.replace(".1700000060.", ".1800000060.");
        assert_eq!(set.verify_at("gpu-7", &forged, NOW), Err(TokenError::BadSignature));
        assert!(JoinSecret::new("short").is_err());
        // The default lifetime is long.
        assert_eq!(set.verify("gpu-7", &s.token_for("gpu-7")), Ok(()));
    }

    #[test]
    fn node_ids_with_dots_round_trip() {
        let s = secret("0123456789abcdef-secret");
        let t = s.token_expiring_at("rack1.gpu.7", NOW + 1);
        assert_eq!(JoinSecrets::from(s).verify_at("rack1.gpu.7", &t, NOW), Ok(()));
    }

    #[test]
    fn rotation_accepts_every_configured_secret_and_no_removed_one() {
        let (old, new) = (secret("old-secret-0123456789"), secret("new-secret-0123456789"));
        let both = JoinSecrets::new(vec![new.clone(), old.clone()]).unwrap();
        let only_new = JoinSecrets::new(vec![new.clone()]).unwrap();
        let t_old = old.token_expiring_at("w", NOW + 10);
        let t_new = new.token_expiring_at("w", NOW + 10);
        assert_eq!(both.verify_at("w", &t_old, NOW), Ok(()));
        assert_eq!(both.verify_at("w", &t_new, NOW), Ok(()));
        assert_eq!(only_new.verify_at("w", &t_new, NOW), Ok(()));
        assert_eq!(only_new.verify_at("w", &t_old, NOW), Err(TokenError::BadSignature));
        assert_eq!(both.minting().token_expiring_at("w", NOW), new.token_expiring_at("w", NOW));
        assert_eq!(JoinSecrets::new(vec![]).unwrap_err(), SecretError::Empty);
        assert_eq!(
            JoinSecrets::from_strings(&["long-enough-secret-1", "short"]).unwrap_err(),
            SecretError::TooShort { index: 2, len: 5 }
        );
    }

    #[test]
    fn legacy_tokens_need_the_flag() {
        let s = secret("0123456789abcdef-secret");
        let legacy = s.legacy_token_for("w");
        let strict = JoinSecrets::from(s.clone());
        assert_eq!(strict.verify_at("w", &legacy, NOW), Err(TokenError::LegacyRefused));
        assert!(TokenError::LegacyRefused.to_string().contains("--accept-legacy-join-tokens"));
        let lenient = strict.clone().accept_legacy(true);
        assert_eq!(lenient.verify_at("w", &legacy, NOW), Ok(()));
        assert_eq!(lenient.verify_at("x", &legacy, NOW), Err(TokenError::BadSignature));
        assert!(matches!(
            lenient.verify_at("w", &"zz".repeat(32), NOW),
            Err(TokenError::Malformed(_))
        ));
    }

    #[test]
    fn malformed_tokens_are_refused_without_panics() {
        let set = JoinSecrets::from(secret("0123456789abcdef-secret"));
        let mac = "ab".repeat(32);
        for bad in [
            String::new(),
            "not hex".into(),
            "sllm1".into(),
            "sllm1.".into(),
            "sllm1..".into(),
            format!("sllm1.w.{mac}"),
            format!("sllm1..1.{mac}"),
            format!("sllm1.w.+1.{mac}"),
            format!("sllm1.w.-1.{mac}"),
            format!("sllm1.w.99999999999999999999.{mac}"),
            format!("sllm1.w.1.{}", "zz".repeat(32)),
            format!("sllm1.w.1.{}", "ab".repeat(31)),
            format!("sllm1.w.1.é{}", "a".repeat(63)),
            "x".repeat(10_000),
            "sllm1.é.1.é".into(),
        ] {
            assert!(
                matches!(set.verify_at("w", &bad, NOW), Err(TokenError::Malformed(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn utc_formats_known_instants() {
        assert_eq!(utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(utc(NOW), "2023-11-14T22:13:20Z");
        let _ = utc(u64::MAX);
    }
}
