//! API keys. A key has a scope, `inference` or `admin`; clients send
//! `authorization: Bearer <key>` (gRPC metadata or HTTP header). No keys configured means no
//! check. Keys are kept only as SHA-256 digests and compared, never logged; refusals name what
//! was missing, not the key.
//!
//! What each call needs (docs/operations.md, "API keys", has the same table):
//!
//! | Call | Needs |
//! |---|---|
//! | `Dispatch/Generate`, `Embed`, `Rerank`, OpenAI `POST /v1/completions`, `/v1/chat/completions`, `/v1/responses`, `/v1/embeddings`, `/v1/rerank`, `/tokenize`, `/detokenize` | inference (or admin) |
//! | `ModelRegistry/Get`, `ModelRegistry/List`, OpenAI `GET /v1/models`, `/v1/models/{id}` | inference (or admin) |
//! | `ModelRegistry/Deploy`, `Update`, `Delete`; ServerlessLLM's `POST /register`, `/update`, `/delete` | admin |
//! | `WorkerRegistry/ListWorkers`, `GetWorker` (addresses, inventory) | admin |
//! | `Scaler/GetScaleStatus`, `ListScaleStatus`, `GetLeader` | admin |
//! | any other `sllm.v1` method (fail closed: a new RPC is admin until placed here) | admin |
//! | `WorkerRegistry/Session`, `Dispatch/Attach` (workers: join tokens instead) | nothing |
//! | `grpc.health.v1` (load balancers probe it) | nothing |
//! | gRPC reflection, `/metrics` | nothing; admin with `--protect-introspection` |
//!
//! The look-up compares the presented key's digest with every configured key's digest in
//! constant time (`subtle`), without stopping at a match, so its timing does not tell which
//! key (or how much of one) matched.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use sha2::Digest;
use subtle::{Choice, ConstantTimeEq};

/// What a key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Scope {
    /// Run inference and list or get models.
    Inference,
    /// Everything.
    Admin,
}

/// What a call needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Needed {
    /// Nothing (health, worker streams, unprotected reflection).
    Nothing,
    /// Any valid key (with two scopes, the same as [`Needed::Inference`]).
    Read,
    /// The inference scope (or admin).
    Inference,
    /// The admin scope.
    Admin,
}

/// Why a call was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// No key, or an unknown one.
    Unauthenticated(String),
    /// A valid key without the scope.
    PermissionDenied(String),
}

/// One configured key: its digest, never its text.
#[derive(Clone)]
struct Key {
    digest: [u8; 32],
    scope: Scope,
}

/// The configured keys (empty: checks are off).
#[derive(Clone, Default)]
pub struct ApiKeys(Arc<[Key]>);

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ApiKeys({} keys)", self.0.len())
    }
}

fn digest(key: &str) -> [u8; 32] {
    sha2::Sha256::digest(key.as_bytes()).into()
}

/// One `key:scope` item; `place` names where it came from in errors.
fn parse_item(item: &str, place: &str) -> Result<Key, String> {
    let (key, scope) = item.rsplit_once(':').ok_or(format!("{place} has no `:scope`"))?;
    let scope = match scope.trim() {
        "inference" => Scope::Inference,
        "admin" => Scope::Admin,
        other => return Err(format!("{place}: unknown scope {other:?} (inference, admin)")),
    };
    let key = key.trim();
    if key.len() < 16 {
        return Err(format!("{place} is shorter than 16 characters"));
    }
    Ok(Key { digest: digest(key), scope })
}

impl ApiKeys {
    /// Parses `key:scope,key:scope` (scope `inference` or `admin`); empty means no keys.
    pub fn parse(spec: &str) -> Result<ApiKeys, String> {
        let keys = spec
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .enumerate()
            .map(|(i, item)| parse_item(item, &format!("api key #{}", i + 1)))
            .collect::<Result<Vec<_>, _>>()?;
        ApiKeys::default().with(keys)
    }

    /// Parses a keys file: one `key:scope` per line; blank lines and lines starting with `#`
    /// are skipped. `source` (e.g. the file's path) names the file in errors.
    pub fn parse_lines(text: &str, source: &str) -> Result<ApiKeys, String> {
        let keys = text
            .lines()
            .enumerate()
            .map(|(i, line)| (i, line.trim()))
            .filter(|(_, line)| !line.is_empty() && !line.starts_with('#'))
            .map(|(i, line)| parse_item(line, &format!("{source} line {}", i + 1)))
            .collect::<Result<Vec<_>, _>>()?;
        ApiKeys::default().with(keys)
    }

    /// The keys of both sets; a key given twice is refused (its two scopes could differ).
    pub fn merge(&self, other: &ApiKeys) -> Result<ApiKeys, String> {
        self.clone().with(other.0.to_vec())
    }

    fn with(self, more: Vec<Key>) -> Result<ApiKeys, String> {
        let mut all = self.0.to_vec();
        for k in more {
            if all.iter().any(|e| e.digest == k.digest) {
                return Err("an API key is configured twice".into());
            }
            all.push(k);
        }
        Ok(ApiKeys(all.into()))
    }

    /// Whether keys are checked.
    pub fn enabled(&self) -> bool {
        !self.0.is_empty()
    }

    /// How many keys are configured.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether no key is configured (checks are off).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The scope of `key`, if it is configured. Every configured digest is compared, in
    /// constant time, whatever matched before.
    fn scope_of(&self, key: &str) -> Option<Scope> {
        let presented = digest(key);
        let mut found = Choice::from(0);
        let mut admin = Choice::from(0);
        for k in self.0.iter() {
            let hit = k.digest.ct_eq(&presented);
            found |= hit;
            admin |= hit & Choice::from(u8::from(k.scope == Scope::Admin));
        }
        match (bool::from(found), bool::from(admin)) {
            (false, _) => None,
            (true, true) => Some(Scope::Admin),
            (true, false) => Some(Scope::Inference),
        }
    }

    /// Checks the raw `authorization` header (gRPC metadata or HTTP) against what the call
    /// needs. Bytes that are not visible ASCII are refused as such, not read as a missing key.
    pub fn check_header(
        &self,
        header: Option<&http::HeaderValue>,
        needed: Needed,
    ) -> Result<(), Refused> {
        match header.map(http::HeaderValue::to_str) {
            None => self.check(None, needed),
            Some(Ok(text)) => self.check(Some(text), needed),
            Some(Err(_)) if self.enabled() && needed != Needed::Nothing => {
                Err(Refused::Unauthenticated(
                    "the authorization header is not ASCII text: send `Bearer <key>`".into(),
                ))
            }
            Some(Err(_)) => Ok(()),
        }
    }

    /// Checks an `authorization` header value against what the call needs.
    pub fn check(&self, authorization: Option<&str>, needed: Needed) -> Result<(), Refused> {
        if !self.enabled() || needed == Needed::Nothing {
            return Ok(());
        }
        let Some(header) = authorization else {
            return Err(Refused::Unauthenticated(
                "an API key is required: send `authorization: Bearer <key>`".into(),
            ));
        };
        let Some(key) = bearer(header) else {
            return Err(Refused::Unauthenticated(
                "the authorization header is not `Bearer <key>`".into(),
            ));
        };
        let Some(scope) = self.scope_of(key) else {
            return Err(Refused::Unauthenticated("the API key is not valid".into()));
        };
        match (needed, scope) {
            (Needed::Admin, Scope::Inference) => Err(Refused::PermissionDenied(
                "this API key has the inference scope; this call needs admin".into(),
            )),
            _ => Ok(()),
        }
    }
}

/// The caller a request's rate limit applies to: a digest of its API key (the key itself is
/// never stored or logged), or its IP address when it sent none.
pub fn caller_id(authorization: Option<&str>, peer: Option<std::net::IpAddr>) -> String {
    let key = authorization.and_then(bearer);
    match (key, peer) {
        (Some(k), _) => format!("key-{}", &hex::encode(sha2::Sha256::digest(k.as_bytes()))[..16]),
        (None, Some(ip)) => {
            format!("ip-{}", ip.to_string().replace([':', '.'], "-"))
        }
        (None, None) => "anonymous".to_string(),
    }
}

/// The key in an `authorization: Bearer <key>` value: the scheme in any case (RFC 9110 makes
/// it case-insensitive), then spaces or tabs, then a non-empty key; None otherwise.
pub fn bearer(header: &str) -> Option<&str> {
    let header = header.trim_matches([' ', '\t']);
    let scheme = header.get(..6)?;
    let rest = header.get(6..)?;
    if !scheme.eq_ignore_ascii_case("bearer") || !rest.starts_with([' ', '\t']) {
        return None;
    }
    Some(rest.trim_matches([' ', '\t'])).filter(|k| !k.is_empty())
}

/// What a gRPC method needs, by its path (the table in the module doc). Reflection needs
/// nothing here; [`AuthLayer::protect_reflection`] raises it to admin.
pub fn needed_for_grpc(path: &str) -> Needed {
    match path {
        "/sllm.v1.Dispatch/Generate"
        | "/sllm.v1.Dispatch/Embed"
        | "/sllm.v1.Dispatch/Rerank"
        | "/sllm.v1.ModelRegistry/Get"
        | "/sllm.v1.ModelRegistry/List" => Needed::Inference,
        // Workers prove themselves with join tokens on these streams.
        "/sllm.v1.WorkerRegistry/Session" | "/sllm.v1.Dispatch/Attach" => Needed::Nothing,
        // Everything else of ours, including methods added later, fails closed.
        p if p.starts_with("/sllm.v1.") => Needed::Admin,
        _ => Needed::Nothing,
    }
}

/// Whether `path` is a gRPC reflection method (v1 or v1alpha).
pub fn is_reflection(path: &str) -> bool {
    path.starts_with("/grpc.reflection.v1.ServerReflection/")
        || path.starts_with("/grpc.reflection.v1alpha.ServerReflection/")
}

/// A tower layer checking API keys on every gRPC call of a server.
#[derive(Clone, Debug)]
pub struct AuthLayer {
    keys: ApiKeys,
    protect_reflection: bool,
}

impl AuthLayer {
    /// Checks `keys` by [`needed_for_grpc`]; reflection stays open.
    pub fn new(keys: ApiKeys) -> AuthLayer {
        AuthLayer { keys, protect_reflection: false }
    }

    /// Makes reflection need an admin key too (when keys are configured): the schema it
    /// shows is a map of every admin RPC.
    pub fn protect_reflection(mut self, protect: bool) -> AuthLayer {
        self.protect_reflection = protect;
        self
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = Auth<S>;
    fn layer(&self, inner: S) -> Auth<S> {
        Auth { keys: self.keys.clone(), protect_reflection: self.protect_reflection, inner }
    }
}

/// The service [`AuthLayer`] makes.
#[derive(Clone, Debug)]
pub struct Auth<S> {
    keys: ApiKeys,
    protect_reflection: bool,
    inner: S,
}

impl<S, B, R> tower::Service<http::Request<B>> for Auth<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>> + Send,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    R: Default + Send + 'static,
{
    type Response = http::Response<R>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let header = req.headers().get("authorization");
        let path = req.uri().path();
        let needed = if self.protect_reflection && is_reflection(path) {
            Needed::Admin
        } else {
            needed_for_grpc(path)
        };
        match self.keys.check_header(header, needed) {
            Ok(()) => Box::pin(self.inner.call(req)),
            Err(r) => {
                let status = match r {
                    Refused::Unauthenticated(m) => tonic::Status::unauthenticated(m),
                    Refused::PermissionDenied(m) => tonic::Status::permission_denied(m),
                };
                Box::pin(std::future::ready(Ok(status.into_http())))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_and_refusals() {
        let keys = ApiKeys::parse("admin-key-0123456789:admin, infer-key-0123456789:inference")
            .expect("valid");
        assert!(keys.check(Some("Bearer admin-key-0123456789"), Needed::Admin).is_ok());
        assert!(keys.check(Some("Bearer infer-key-0123456789"), Needed::Inference).is_ok());
        assert!(matches!(
            keys.check(Some("Bearer infer-key-0123456789"), Needed::Admin),
            Err(Refused::PermissionDenied(_))
        ));
        assert!(matches!(keys.check(None, Needed::Read), Err(Refused::Unauthenticated(_))));
        assert!(matches!(
            keys.check(Some("Bearer wrong"), Needed::Read),
            Err(Refused::Unauthenticated(_))
        ));
        assert!(keys.check(None, Needed::Nothing).is_ok());
        assert!(ApiKeys::default().check(None, Needed::Admin).is_ok(), "no keys: no checks");
        assert!(ApiKeys::parse("short:admin").is_err());
        assert!(ApiKeys::parse("a-long-enough-key-000:root").is_err());
    }

    #[test]
    fn the_scope_table() {
        for (path, needed) in [
            ("/sllm.v1.Dispatch/Generate", Needed::Inference),
            ("/sllm.v1.Dispatch/Embed", Needed::Inference),
            ("/sllm.v1.Dispatch/Rerank", Needed::Inference),
            ("/sllm.v1.ModelRegistry/Get", Needed::Inference),
            ("/sllm.v1.ModelRegistry/List", Needed::Inference),
            ("/sllm.v1.ModelRegistry/Deploy", Needed::Admin),
            ("/sllm.v1.ModelRegistry/Update", Needed::Admin),
            ("/sllm.v1.ModelRegistry/Delete", Needed::Admin),
            ("/sllm.v1.WorkerRegistry/ListWorkers", Needed::Admin),
            ("/sllm.v1.WorkerRegistry/GetWorker", Needed::Admin),
            ("/sllm.v1.Scaler/GetScaleStatus", Needed::Admin),
            ("/sllm.v1.Scaler/ListScaleStatus", Needed::Admin),
            ("/sllm.v1.Scaler/GetLeader", Needed::Admin),
            ("/sllm.v1.Scaler/SomethingNew", Needed::Admin),
            ("/sllm.v1.WorkerRegistry/Session", Needed::Nothing),
            ("/sllm.v1.Dispatch/Attach", Needed::Nothing),
            ("/sllm.v1.Dispatch/AttachMore", Needed::Admin),
            ("/grpc.health.v1.Health/Check", Needed::Nothing),
            ("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo", Needed::Nothing),
        ] {
            assert_eq!(needed_for_grpc(path), needed, "{path}");
        }
        assert!(is_reflection("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"));
        assert!(!is_reflection("/grpc.health.v1.Health/Check"));
    }

    #[test]
    fn keys_files_and_merging() {
        let text = "# fleet keys\n\n admin-key-0123456789:admin \ninfer-key-0123456789:inference\n";
        let keys = ApiKeys::parse_lines(text, "keys.txt").expect("valid");
        assert_eq!(keys.len(), 2);
        assert!(keys.check(Some("Bearer admin-key-0123456789"), Needed::Admin).is_ok());
        assert!(matches!(
            keys.check(Some("Bearer infer-key-0123456789"), Needed::Admin),
            Err(Refused::PermissionDenied(_))
        ));
        let err = ApiKeys::parse_lines("# c\nshort:admin\n", "keys.txt").unwrap_err();
        assert!(err.contains("keys.txt line 2"), "{err}");
        let err = ApiKeys::parse_lines("no-scope-at-all-here\n", "k").unwrap_err();
        assert!(err.contains("k line 1") && err.contains(":scope"), "{err}");
        let more = ApiKeys::parse("third-key-0123456789:inference").expect("valid");
        assert_eq!(keys.merge(&more).expect("distinct").len(), 3);
        let dup = ApiKeys::parse("admin-key-0123456789:inference").expect("valid");
        assert!(keys.merge(&dup).is_err(), "one key with two scopes");
        // A key that is a prefix or extension of a configured one does not match.
        assert!(keys.check(Some("Bearer admin-key-012345678"), Needed::Read).is_err());
        assert!(keys.check(Some("Bearer admin-key-01234567890"), Needed::Read).is_err());
    }

    #[test]
    fn bearer_values() {
        assert_eq!(bearer("Bearer k"), Some("k"));
        assert_eq!(bearer("BEARER \t k "), Some("k"));
        assert_eq!(bearer("bearer"), None);
        assert_eq!(bearer("Bearer   "), None);
        assert_eq!(bearer("Bearerk"), None);
        assert_eq!(bearer("Basic a2V5"), None);
        assert_eq!(bearer("Beaé k"), None, "a multi-byte character where the scheme ends");
        let keys = ApiKeys::parse("admin-key-0123456789:admin").expect("valid");
        let raw = http::HeaderValue::from_bytes(b"Bearer \xff\xfe").expect("obs-text is allowed");
        assert!(matches!(
            keys.check_header(Some(&raw), Needed::Read),
            Err(Refused::Unauthenticated(m)) if m.contains("ASCII")
        ));
        assert!(ApiKeys::default().check_header(Some(&raw), Needed::Read).is_ok());
    }
}
