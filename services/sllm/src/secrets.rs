//! Credentials from files, so none has to appear on a command line (where `ps` and shell
//! history show it): join secrets, API keys and join tokens. Errors name the flag and the path,
//! never the content.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use service::JoinSecrets;
use service::auth::ApiKeys;

/// Reads `path` for `flag`, warning when other users may read it too.
fn read(flag: &str, path: &Path) -> Result<String> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{flag}: cannot read {}", path.display()))?;
    // Group access is fine when the group is this process's own: a Kubernetes Secret volume
    // with an fsGroup gives its files to the pod's group, mode 0440 at least. (`/proc/self`
    // belongs to the process's effective user and group.)
    let own_group = std::fs::metadata("/proc/self").map(|m| m.gid()).ok();
    if let Ok(meta) = std::fs::metadata(path)
        && (meta.permissions().mode() & 0o007 != 0
            || (meta.permissions().mode() & 0o070 != 0 && Some(meta.gid()) != own_group))
    {
        tracing::warn!(
            file = %path.display(),
            "{flag}: the file is readable by other users; `chmod 600` it"
        );
    }
    Ok(text)
}

/// The lines of a credentials file that hold something: trimmed, without blank lines and
/// `#` comments.
fn lines(text: &str) -> impl Iterator<Item = &str> {
    text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#'))
}

/// The join secrets from `--join-secret` (one) or `--join-secret-file` (one per line, the first
/// mints; blank lines and `#` comments skipped); None when neither is given.
pub fn join_secrets(inline: Option<&str>, file: Option<&Path>) -> Result<Option<JoinSecrets>> {
    let secrets: Vec<String> = match (inline, file) {
        (Some(_), Some(_)) => bail!("give --join-secret or --join-secret-file, not both"),
        (Some(s), None) => vec![s.to_string()],
        (None, Some(path)) => {
            let text = read("--join-secret-file", path)?;
            let secrets: Vec<String> = lines(&text).map(str::to_string).collect();
            if secrets.is_empty() {
                bail!("--join-secret-file {} holds no secret", path.display());
            }
            secrets
        }
        (None, None) => return Ok(None),
    };
    let flag = if file.is_some() { "--join-secret-file" } else { "--join-secret" };
    JoinSecrets::from_strings(&secrets).map(Some).with_context(|| flag.to_string())
}

/// The API keys from `--api-keys` (`key:scope,...`) and `--api-keys-file` (one `key:scope` per
/// line, `#` comments), together.
pub fn api_keys(inline: &str, file: Option<&Path>) -> Result<ApiKeys> {
    let keys = ApiKeys::parse(inline).map_err(|e| anyhow::anyhow!("--api-keys: {e}"))?;
    let Some(path) = file else { return Ok(keys) };
    let text = read("--api-keys-file", path)?;
    let from_file = ApiKeys::parse_lines(&text, &path.display().to_string())
        .map_err(|e| anyhow::anyhow!("--api-keys-file: {e}"))?;
    if from_file.is_empty() {
        bail!("--api-keys-file {} holds no key", path.display());
    }
    keys.merge(&from_file).map_err(|e| anyhow::anyhow!("--api-keys and --api-keys-file: {e}"))
}

/// The join token in `path` (`--join-token-file`): its first line that holds something.
pub fn join_token(path: &Path) -> Result<String> {
    let text = read("--join-token-file", path)?;
    match lines(&text).next() {
        Some(token) => Ok(token.to_string()),
        None => bail!("--join-token-file {} holds no token", path.display()),
    }
}

/// A lifetime like `30d`, `12h`, `90m`, `1h 30m` (humantime's units) or a bare number of
/// seconds; at least a second.
pub fn parse_ttl(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let d = if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        text.parse().map(Duration::from_secs).map_err(|_| format!("{text:?} is too long"))?
    } else {
        humantime::parse_duration(text)
            .map_err(|e| format!("{text:?} is not a lifetime like 30d or 12h: {e}"))?
    };
    // Tokens carry whole seconds.
    if d < Duration::from_secs(1) {
        return Err("a lifetime must be at least a second".into());
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn lifetimes() {
        assert_eq!(parse_ttl("30d"), Ok(Duration::from_secs(30 * 86_400)));
        assert_eq!(parse_ttl("12h"), Ok(Duration::from_secs(12 * 3600)));
        assert_eq!(parse_ttl("90m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_ttl("60"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_ttl("1w"), Ok(Duration::from_secs(7 * 86_400)));
        assert_eq!(parse_ttl("1.5h"), Ok(Duration::from_secs(5400)));
        for bad in ["", "0", "0d", "d", "-1d", "10ms", "99999999999999999999d"] {
            assert!(parse_ttl(bad).is_err(), "{bad:?}");
        }
    }

    struct Dir(std::path::PathBuf);
    impl Dir {
        fn path(&self) -> &Path {
            &self.0
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn files() {
        let dir = std::env::temp_dir().join(format!("sllm-secrets-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let dir = Dir(dir);
        let secrets = dir.path().join("secrets");
        std::fs::write(&secrets, "# new\nnew-secret-0123456789\n\nold-secret-0123456789\n")
            .unwrap();
        let s = join_secrets(None, Some(&secrets)).unwrap().unwrap();
        assert_eq!(s.len(), 2);
        assert!(join_secrets(Some("x"), Some(&secrets)).is_err());
        assert!(join_secrets(None, None).unwrap().is_none());
        std::fs::write(&secrets, "# nothing\n").unwrap();
        assert!(join_secrets(None, Some(&secrets)).is_err());
        let missing = dir.path().join("missing");
        let err = join_secrets(None, Some(&missing)).unwrap_err();
        assert!(format!("{err:#}").contains("--join-secret-file"), "{err:#}");

        let keys = dir.path().join("keys");
        std::fs::write(&keys, "# admins\nadmin-key-0123456789:admin\n").unwrap();
        let k = api_keys("infer-key-0123456789:inference", Some(&keys)).unwrap();
        assert_eq!(k.len(), 2);
        std::fs::write(&keys, "admin-key-0123456789:root\n").unwrap();
        let err = api_keys("", Some(&keys)).unwrap_err();
        assert!(format!("{err:#}").contains("line 1"), "{err:#}");

        let token = dir.path().join("token");
        std::fs::write(&token, "\nsllm1.w.1.ab\n").unwrap();
        assert_eq!(join_token(&token).unwrap(), "sllm1.w.1.ab");
    }
}
