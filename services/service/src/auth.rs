//! API keys. A key has a scope: `inference` (Generate and the OpenAI API, and reading state) or
//! `admin` (everything: deploy, update, delete too). Clients send `authorization: Bearer <key>`
//! (gRPC metadata or HTTP header). No keys configured means no check. Keys are compared, never
//! logged; refusals name what was missing, not the key.
//!
//! Workers do not use API keys: they prove themselves with join tokens on their own streams.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

/// What a key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Scope {
    /// Run inference and read state.
    Inference,
    /// Everything.
    Admin,
}

/// What a call needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Needed {
    /// Nothing (health, reflection, worker streams).
    Nothing,
    /// Any valid key.
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

/// The configured keys (empty: checks are off).
#[derive(Clone, Default)]
pub struct ApiKeys(Arc<HashMap<String, Scope>>);

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ApiKeys({} keys)", self.0.len())
    }
}

impl ApiKeys {
    /// Parses `key:scope,key:scope` (scope `inference` or `admin`); empty means no keys.
    pub fn parse(spec: &str) -> Result<ApiKeys, String> {
        let mut keys = HashMap::new();
        for (i, item) in spec.split(',').map(str::trim).filter(|s| !s.is_empty()).enumerate() {
            let (key, scope) =
                item.rsplit_once(':').ok_or(format!("api key #{} has no `:scope`", i + 1))?;
            let scope = match scope {
                "inference" => Scope::Inference,
                "admin" => Scope::Admin,
                other => {
                    return Err(format!(
                        "api key #{}: unknown scope {other:?} (inference, admin)",
                        i + 1
                    ));
                }
            };
            if key.len() < 16 {
                return Err(format!("api key #{} is shorter than 16 characters", i + 1));
            }
            keys.insert(key.to_string(), scope);
        }
        Ok(ApiKeys(Arc::new(keys)))
    }

    /// Whether keys are checked.
    pub fn enabled(&self) -> bool {
        !self.0.is_empty()
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
        // Compare against every key without an early exit on the first byte that differs.
        let scope = self
            .0
            .iter()
            .find(|(k, _)| constant_time_eq(k.as_bytes(), key.as_bytes()))
            .map(|(_, s)| *s);
        let Some(scope) = scope else {
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
    use sha2::Digest;
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

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// What a gRPC method needs, by its path.
pub fn needed_for_grpc(path: &str) -> Needed {
    match path {
        "/sllm.v1.ModelRegistry/Deploy"
        | "/sllm.v1.ModelRegistry/Update"
        | "/sllm.v1.ModelRegistry/Delete" => Needed::Admin,
        "/sllm.v1.Dispatch/Generate" => Needed::Inference,
        p if p.starts_with("/sllm.v1.WorkerRegistry/Session")
            || p.starts_with("/sllm.v1.Dispatch/Attach") =>
        {
            Needed::Nothing
        }
        p if p.starts_with("/sllm.v1.") => Needed::Read,
        _ => Needed::Nothing,
    }
}

/// A tower layer checking API keys on every gRPC call of a server.
#[derive(Clone, Debug)]
pub struct AuthLayer(pub ApiKeys);

impl<S> tower::Layer<S> for AuthLayer {
    type Service = Auth<S>;
    fn layer(&self, inner: S) -> Auth<S> {
        Auth { keys: self.0.clone(), inner }
    }
}

/// The service [`AuthLayer`] makes.
#[derive(Clone, Debug)]
pub struct Auth<S> {
    keys: ApiKeys,
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
        match self.keys.check_header(header, needed_for_grpc(req.uri().path())) {
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
        assert_eq!(needed_for_grpc("/sllm.v1.ModelRegistry/Deploy"), Needed::Admin);
        assert_eq!(needed_for_grpc("/sllm.v1.ModelRegistry/List"), Needed::Read);
        assert_eq!(needed_for_grpc("/sllm.v1.WorkerRegistry/Session"), Needed::Nothing);
        assert_eq!(needed_for_grpc("/grpc.health.v1.Health/Check"), Needed::Nothing);
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
