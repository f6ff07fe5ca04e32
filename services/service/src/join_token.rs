//! Worker join tokens. A token is the hex HMAC-SHA256 of the node id under the cluster's join
//! secret: one secret serves a whole fleet, each token proves exactly one node id, and the
//! registry stores no per-node credentials.

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The cluster's join secret.
#[derive(Clone)]
pub struct JoinSecret(Vec<u8>);

impl std::fmt::Debug for JoinSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JoinSecret(..)")
    }
}

impl JoinSecret {
    /// A secret from its bytes (at least 16).
    pub fn new(secret: impl Into<Vec<u8>>) -> Result<JoinSecret, String> {
        let secret = secret.into();
        if secret.len() < 16 {
            return Err(format!("join secret must be at least 16 bytes, got {}", secret.len()));
        }
        Ok(JoinSecret(secret))
    }

    fn mac(&self, node_id: &str) -> Hmac<Sha256> {
        // HMAC accepts keys of any length, so building the MAC cannot fail.
        let mut mac =
            <Hmac<Sha256> as Mac>::new_from_slice(&self.0).expect("HMAC takes keys of any length");
        mac.update(node_id.as_bytes());
        mac
    }

    /// The token that proves `node_id`.
    pub fn token_for(&self, node_id: &str) -> String {
        hex::encode(self.mac(node_id).finalize().into_bytes())
    }

    /// Whether `token` proves `node_id` (constant-time comparison).
    pub fn verify(&self, node_id: &str, token: &str) -> bool {
        match hex::decode(token.trim()) {
            Ok(bytes) => self.mac(node_id).verify_slice(&bytes).is_ok(),
            Err(_) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_proves_one_node_under_one_secret() {
        let s = JoinSecret::new("0123456789abcdef-secret").expect("long enough");
        let t = s.token_for("gpu-7");
        assert!(s.verify("gpu-7", &t));
        assert!(!s.verify("gpu-8", &t));
        assert!(!s.verify("gpu-7", "not hex"));
        assert!(!s.verify("gpu-7", ""));
        let other = JoinSecret::new("another-secret-of-16+").expect("long enough");
        assert!(!other.verify("gpu-7", &t));
        assert!(JoinSecret::new("short").is_err());
    }
}
