//! Hostile headers against the real binary: a crafted `grpc-timeout`, `traceparent` or
//! `authorization` gets a clear status (the field named), never a panic or a dropped
//! connection — the same connection keeps serving afterwards.

use std::os::unix::ffi::OsStrExt;

use sllm_api::v1 as pb;
use sllm_integration_tests::{JOIN_SECRET, Proc, RedisServer};
use tonic::Code;
use tonic::metadata::AsciiMetadataValue;

use crate::{INFER, with_key};

fn raw(bytes: &[u8]) -> AsciiMetadataValue {
    AsciiMetadataValue::try_from(bytes).unwrap()
}

fn generate(headers: &[(&'static str, &[u8])], key: bool) -> tonic::Request<pb::GenerateRequest> {
    let req = pb::GenerateRequest {
        model: "no-such-model".into(),
        input: Some(pb::generate_request::Input::Prompt("hi".into())),
        timeout_ms: u64::MAX,
        ..Default::default()
    };
    let mut r = with_key(req, key.then_some(INFER));
    for (name, value) in headers {
        r.metadata_mut().insert(*name, raw(value));
    }
    r
}

#[tokio::test]
async fn hostile_headers_get_a_clear_status_and_the_connection_lives_on() {
    let redis = RedisServer::start().unwrap();
    let keys = format!("{INFER}:inference");
    let (proc, _) = Proc::sllm(
        &["serve", "all", "--redis-url", &redis.url(), "--grpc-addr", "127.0.0.1:0"],
        &[
            ("SLLM_JOIN_SECRET", JOIN_SECRET),
            ("SLLM_API_KEYS", &keys),
            ("SLLM_OPENAI_ADDR", "127.0.0.1:0"),
            ("SLLM_METRICS_ADDR", "off"),
            ("SLLM_RATE_LIMIT", "1000"),
        ],
        "openai api listening on",
    )
    .unwrap();
    let out = proc.output();
    let find = |p: &str| out.lines().find_map(|l| l.strip_prefix(p)).unwrap().trim().to_string();
    let grpc = format!("http://{}", find("sllm: serving gRPC on"));
    let http = format!("http://{}", find("sllm: openai api listening on"));
    let channel = tonic::transport::Endpoint::from_shared(grpc).unwrap().connect().await.unwrap();
    let mut client = pb::dispatch_client::DispatchClient::new(channel.clone());

    // grpc-timeout beyond the spec's 8 digits, overflowing a u64, without a unit, with an
    // unknown unit, empty, or not ASCII: INVALID_ARGUMENT naming the header.
    for value in [
        &b"18446744073709551615H"[..],
        b"999999999999999999999999S",
        b"123456789m",
        b"100",
        b"10x",
        b"H",
        b"",
        b"-5S",
        b"1\xffS",
    ] {
        let err = client.generate(generate(&[("grpc-timeout", value)], true)).await.unwrap_err();
        let shown = String::from_utf8_lossy(value);
        assert_eq!(err.code(), Code::InvalidArgument, "{shown:?}: {err:?}");
        assert!(err.message().contains("grpc-timeout"), "{shown:?}: {}", err.message());
    }
    // The longest timeout the spec allows (about 11,000 years) is no deadline at all, as is a
    // timeout_ms of u64::MAX: the request goes on to be judged on its model.
    let err = client.generate(generate(&[("grpc-timeout", b"99999999H")], true)).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");

    // A traceparent of any shape is ignored.
    for value in [
        &b"00-zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz-zzzzzzzzzzzzzzzz-01"[..],
        b"ff-00000000000000000000000000000000-0000000000000000-00",
        b"00-\xff\xfe",
        b"-------------------------------------------------------",
        b"",
    ] {
        let err = client.generate(generate(&[("traceparent", value)], true)).await.unwrap_err();
        assert_eq!(err.code(), Code::NotFound, "{:?}: {err:?}", String::from_utf8_lossy(value));
    }

    // authorization with bytes that are not ASCII, or not the Bearer scheme: UNAUTHENTICATED
    // saying what is wrong.
    for (value, says) in [
        (&b"Bearer \xff\xfe\xfd"[..], "ASCII"),
        (b"\xc3\xa9", "ASCII"),
        (b"Basic YWxhZGRpbjpvcGVuc2VzYW1l", "Bearer"),
        (b"Bearer", "Bearer"),
        (b"Bearer       ", "Bearer"),
    ] {
        let err = client.generate(generate(&[("authorization", value)], false)).await.unwrap_err();
        let shown = String::from_utf8_lossy(value);
        assert_eq!(err.code(), Code::Unauthenticated, "{shown:?}: {err:?}");
        assert!(err.message().contains(says), "{shown:?}: {}", err.message());
    }
    // The scheme in any case.
    let bearer = format!("BEARER {INFER}");
    let err = client
        .generate(generate(&[("authorization", bearer.as_bytes())], false))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");

    // The same connection still serves.
    let mut models = pb::model_registry_client::ModelRegistryClient::new(channel);
    models.list(with_key(pb::ListRequest {}, Some(INFER))).await.unwrap();

    // The OpenAI API: the same headers give 401 in OpenAI's shape, or are ignored.
    let curl = |headers: Vec<Vec<u8>>| {
        let mut cmd = tokio::process::Command::new("curl");
        cmd.args(["-s", "-w", "\n%{http_code}", "-H", "Content-Type: application/json"]);
        for h in &headers {
            cmd.arg("-H").arg(std::ffi::OsStr::from_bytes(h));
        }
        cmd.args(["-d", r#"{"model":"no-such-model","prompt":"x"}"#])
            .arg(format!("{http}/v1/completions"));
        async move {
            let o = cmd.output().await.unwrap();
            String::from_utf8_lossy(&o.stdout).into_owned()
        }
    };
    for header in [&b"Authorization: Bearer \xff\xfe"[..], b"Authorization: Token abc"] {
        let body = curl(vec![header.to_vec()]).await;
        assert!(body.ends_with("401") && body.contains("invalid_api_key"), "{body}");
    }
    let key = format!("Authorization: Bearer {INFER}").into_bytes();
    for trace in [&b"traceparent: 00-\xff-\xff-\xff"[..], b"traceparent: zz", b"grpc-timeout: 1H"] {
        let body = curl(vec![key.clone(), trace.to_vec()]).await;
        assert!(body.ends_with("404") && body.contains("no-such-model"), "{body}");
    }
    drop(proc);
}
