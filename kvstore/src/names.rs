//! Validation of every piece of user input that becomes part of a Redis key. Nothing reaches
//! [`crate::Keys`] without passing one of these checks, so a name can never smuggle in a `:`, a
//! hash tag brace, a glob character, whitespace or an unbounded length.

use crate::error::{Error, Result};

/// Longest deployment (model) name.
pub const MAX_MODEL_NAME: usize = 200;
/// Longest worker, instance or command id.
pub const MAX_ID: usize = 128;
/// Longest worker address.
pub const MAX_ADDRESS: usize = 255;

fn check(
    field: &'static str,
    value: &str,
    max: usize,
    extra: &[char],
    allowed_desc: &str,
) -> Result<()> {
    if value.is_empty() {
        return Err(Error::invalid(field, "must not be empty"));
    }
    let len = value.chars().count();
    if len > max {
        return Err(Error::invalid(field, format!("must be at most {max} characters, got {len}")));
    }
    for (i, c) in value.chars().enumerate() {
        if !(c.is_ascii_alphanumeric() || extra.contains(&c)) {
            return Err(Error::invalid(
                field,
                format!(
                    "character {:?} at position {i} is not allowed (allowed: {allowed_desc})",
                    c
                ),
            ));
        }
    }
    Ok(())
}

fn starts_alnum(field: &'static str, value: &str) -> Result<()> {
    match value.chars().next() {
        Some(c) if c.is_ascii_alphanumeric() => Ok(()),
        _ => Err(Error::invalid(field, "must start with a letter or digit")),
    }
}

/// A deployment name such as `facebook/opt-1.3b`: 1..=200 characters from `[A-Za-z0-9._/-]`,
/// starting with a letter or digit. `:` is refused (ServerlessLLM's `name:backend` form is
/// split before it gets here).
pub fn validate_model_name(field: &'static str, name: &str) -> Result<()> {
    check(
        field,
        name,
        MAX_MODEL_NAME,
        &['.', '_', '-', '/'],
        "letters, digits, '.', '_', '-', '/'",
    )?;
    starts_alnum(field, name)
}

/// A worker (node), instance or command id: 1..=128 characters from `[A-Za-z0-9._-]`, starting
/// with a letter or digit.
pub fn validate_id(field: &'static str, id: &str) -> Result<()> {
    check(field, id, MAX_ID, &['.', '_', '-'], "letters, digits, '.', '_', '-'")?;
    starts_alnum(field, id)
}

/// A short identifier (namespace, leader role, scratch counter): 1..=64 characters from
/// `[A-Za-z0-9_-]`.
pub fn validate_token(field: &'static str, token: &str) -> Result<()> {
    check(field, token, 64, &['_', '-'], "letters, digits, '_', '-'")
}

/// A worker address: an IPv4 or IPv6 address or host name, optionally with a port; 1..=255
/// characters from `[A-Za-z0-9.:[]_-]`.
pub fn validate_address(field: &'static str, address: &str) -> Result<()> {
    check(
        field,
        address,
        MAX_ADDRESS,
        &['.', ':', '[', ']', '_', '-'],
        "letters, digits, '.', ':', '[', ']', '_', '-'",
    )
}

/// A Redis stream entry id, `<ms>-<seq>`.
pub fn validate_stream_id(field: &'static str, id: &str) -> Result<()> {
    let ok = match id.split_once('-') {
        Some((ms, seq)) => {
            !ms.is_empty()
                && !seq.is_empty()
                && ms.len() <= 20
                && seq.len() <= 20
                && ms.bytes().all(|b| b.is_ascii_digit())
                && seq.bytes().all(|b| b.is_ascii_digit())
        }
        None => false,
    };
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(field, format!("{id:?} is not a stream id <ms>-<seq>")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_names_from_the_hub_are_accepted() {
        for ok in ["facebook/opt-1.3b", "Qwen2.5-7B-Instruct", "a", "meta-llama/Llama-3.1-8B"] {
            assert!(validate_model_name("model", ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn names_that_could_break_a_key_are_refused_naming_the_field() {
        let long = "a".repeat(10 * 1024);
        for bad in ["", "opt:vllm", "a*", "{sllm}", "a b", "a\nb", "/abs", "-x", long.as_str()] {
            let err = validate_model_name("spec.model", bad).expect_err(bad);
            assert!(err.to_string().starts_with("invalid spec.model:"), "{err}");
        }
        for bad in ["w/1", "w:1", "", " w"] {
            assert!(validate_id("node_id", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn stream_ids() {
        assert!(validate_stream_id("id", "1700000000000-3").is_ok());
        for bad in ["", "1-", "-1", "a-1", "1", "1-2-3", "$", ">"] {
            assert!(validate_stream_id("id", bad).is_err(), "{bad}");
        }
    }
}
