//! The bodies of the fuzz targets, shared by the cargo-fuzz binaries (`fuzz_targets/`) and the
//! test suite, which replays every input of `fuzz/corpus/<target>` through them on each run.
//! Each one panics only if a rule is broken: a validator accepting what it must not, a parser
//! panicking, a refusal without its field.

use prost::Message;
use sllm_api::v1 as pb;

/// Text that may become part of a Redis key.
pub fn names(s: &str) {
    use kvstore::names::{validate_address, validate_id, validate_model_name, validate_token};
    for (check, extra) in [
        (validate_model_name as fn(&'static str, &str) -> kvstore::Result<()>, "._-/"),
        (validate_id, "._-"),
        (validate_token, "_-"),
        (validate_address, ".:[]_-"),
    ] {
        match check("f", s) {
            Ok(()) => assert!(
                !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || extra.contains(c)),
                "accepted {s:?}"
            ),
            Err(kvstore::Error::Invalid { field, .. }) => assert_eq!(field, "f"),
            Err(e) => panic!("not an invalid-argument error: {e}"),
        }
    }
    if let Ok(keys) = kvstore::Keys::new(s) {
        assert_eq!(keys.root(), format!("{{{s}}}:"));
    }
}

/// A ServerlessLLM deploy JSON file, strict and lenient, and the spec it gives.
pub fn deploy_json(s: &str) {
    for strict in [true, false] {
        match service::deploy_config::parse(s, strict) {
            Ok(p) => {
                if let Err(status) = service::convert::spec_from_pb(Some(&p.spec)) {
                    assert!(status.message().starts_with("invalid spec"), "{}", status.message());
                }
            }
            Err(e) => assert!(!e.is_empty()),
        }
    }
}

/// An OpenAI completion, chat, Responses API or rerank body, or the engines' `/tokenize` and
/// `/detokenize` bodies, parsed and checked as the API does.
pub fn openai_body(s: &str) {
    let secret = service::JoinSecret::new("fuzz-secret-0123456789").expect("a long enough secret");
    let config = dispatch::DispatchConfig::new("fuzz", secret);
    let checks = [
        dispatch::openai::check_body(false, s, &config),
        dispatch::openai::check_body(true, s, &config),
        dispatch::openai::check_responses_body(s, &config),
        dispatch::openai::check_tokenize_body(s, false, &config),
        dispatch::openai::check_tokenize_body(s, true, &config),
        dispatch::openai::check_rerank_body(s, &config),
    ];
    for checked in checks {
        match checked {
            Ok(()) => {}
            Err(dispatch::DispatchError::Invalid { field, reason }) => {
                assert!(!field.is_empty() && !reason.is_empty());
            }
            Err(e) => panic!("a body check gave {e:?}"),
        }
    }
}

/// Protobuf messages off the wire, and their conversion into what kvstore stores.
pub fn proto(bytes: &[u8]) {
    let _ = pb::GenerateRequest::decode(bytes);
    let _ = pb::AttachUp::decode(bytes);
    if let Ok(d) = pb::DeployRequest::decode(bytes)
        && let Ok(spec) = service::convert::spec_from_pb(d.spec.as_ref())
    {
        assert!(spec.validate().is_ok());
    }
    if let Ok(m) = pb::WorkerMessage::decode(bytes)
        && let Some(pb::worker_message::Body::Register(r)) = m.body
        && let Some(inv) = r.inventory
    {
        if let Err(s) = service::convert::inventory_from_pb(&inv) {
            assert!(s.message().contains("inventory."), "{}", s.message());
        }
        if let Err(s) = service::convert::running_from_pb(&inv.running) {
            assert!(s.message().contains("inventory.running["), "{}", s.message());
        }
    }
}

/// Header values a client controls: `grpc-timeout`, `traceparent` and `authorization`.
pub fn headers(bytes: &[u8]) {
    // grpc-timeout: accepted exactly when it is 1 to 8 digits and a unit, at the right value.
    let grammar = bytes.len() >= 2
        && bytes.len() <= 9
        && bytes[..bytes.len() - 1].iter().all(u8::is_ascii_digit)
        && b"HMSmun".contains(&bytes[bytes.len() - 1]);
    match dispatch::parse_grpc_timeout(bytes) {
        Ok(d) => {
            assert!(grammar, "accepted grpc-timeout {bytes:?}");
            let n: u128 = std::str::from_utf8(&bytes[..bytes.len() - 1]).unwrap().parse().unwrap();
            let nanos = match bytes[bytes.len() - 1] {
                b'H' => n * 3_600_000_000_000,
                b'M' => n * 60_000_000_000,
                b'S' => n * 1_000_000_000,
                b'm' => n * 1_000_000,
                b'u' => n * 1_000,
                _ => n,
            };
            assert_eq!(d.as_nanos(), nanos, "{bytes:?}");
        }
        Err(why) => assert!(!grammar && !why.is_empty(), "refused grpc-timeout {bytes:?}"),
    }

    if let Ok(s) = std::str::from_utf8(bytes) {
        // traceparent: whatever the propagator accepts names a real span, and its canonical
        // form reads back as itself.
        if let Some(canonical) = telemetry::propagation::parse(s) {
            assert!(!canonical.contains("-00000000000000000000000000000000-"), "{s:?}");
            assert!(!canonical.contains("-0000000000000000-"), "{s:?}");
            assert_eq!(
                telemetry::propagation::parse(&canonical).as_ref(),
                Some(&canonical),
                "{s:?}"
            );
        }

        // authorization: the key is a trimmed, non-empty part of the value, and the caller id
        // made from it is safe to put in a Redis key.
        if let Some(key) = service::auth::bearer(s) {
            assert!(!key.is_empty() && s.contains(key), "{s:?}");
            assert!(!key.starts_with([' ', '\t']) && !key.ends_with([' ', '\t']), "{s:?}");
        }
        let id = service::auth::caller_id(Some(s), None);
        assert!(kvstore::names::validate_id("caller", &id).is_ok(), "{id:?} from {s:?}");
    }
    if let Ok(value) = http::HeaderValue::from_bytes(bytes) {
        let keys = service::auth::ApiKeys::parse("fuzz-key-0123456789abc:inference")
            .expect("a valid key list");
        let ok = keys.check_header(Some(&value), service::auth::Needed::Inference).is_ok();
        let expected = value
            .to_str()
            .ok()
            .and_then(service::auth::bearer)
            .is_some_and(|k| k == "fuzz-key-0123456789abc");
        assert_eq!(ok, expected, "{bytes:?}");
    }
}
