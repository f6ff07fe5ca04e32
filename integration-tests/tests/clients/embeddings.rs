//! Embeddings through sllm: the official `openai` client's `embeddings.create` and gRPC
//! `Embed`, against a simulated embedding model that starts from zero on the first call.

use sllm_api::v1 as pb;

use crate::*;

#[tokio::test]
async fn openai_embeddings_and_grpc_embed() {
    let up = Up::start(&["--no-demo", "--workers", "1"]);
    let ep = up.endpoint();
    let o = sllm(&["deploy", "emb/minilm", "--endpoint", &ep]).await;
    assert!(o.status.success(), "{}", text(&o).1);

    // gRPC first: this call starts the model from zero.
    let channel =
        tonic::transport::Channel::from_shared(ep.clone()).unwrap().connect().await.unwrap();
    let mut client = pb::dispatch_client::DispatchClient::new(channel);
    let embed = |input: Vec<&str>, dimensions: Option<u32>| pb::EmbedRequest {
        model: "emb/minilm".into(),
        input: input.into_iter().map(str::to_string).collect(),
        dimensions,
        timeout_ms: 30_000,
    };
    let r = client.embed(embed(vec!["hello world", "other"], None)).await.unwrap().into_inner();
    assert_eq!(r.embeddings.len(), 2);
    assert_eq!(r.model, "emb/minilm");
    assert_eq!(r.prompt_tokens, 3);
    let v = &r.embeddings[0].values;
    assert_eq!(v.len(), 384);
    let norm: f32 = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    assert!((norm - 1.0).abs() < 1e-4, "{norm}");
    assert_ne!(r.embeddings[0].values, r.embeddings[1].values);
    let again = client.embed(embed(vec!["hello world"], None)).await.unwrap().into_inner();
    assert_eq!(&again.embeddings[0].values, v, "the same text, the same vector");
    let short = client.embed(embed(vec!["x"], Some(8))).await.unwrap().into_inner();
    assert_eq!(short.embeddings[0].values.len(), 8);
    for (req, code, words) in [
        (embed(vec![], None), tonic::Code::InvalidArgument, "input"),
        (embed(vec!["a", ""], None), tonic::Code::InvalidArgument, "input[1]"),
        (embed(vec!["a"], Some(100_000)), tonic::Code::InvalidArgument, "dimensions"),
        (embed(vec!["a"], Some(1000)), tonic::Code::InvalidArgument, "dimensions"),
        (
            pb::EmbedRequest { model: "no/such".into(), ..embed(vec!["a"], None) },
            tonic::Code::NotFound,
            "no/such",
        ),
    ] {
        let e = client.embed(req).await.unwrap_err();
        assert_eq!(e.code(), code, "{e:?}");
        assert!(e.message().contains(words), "{words}: {}", e.message());
    }

    // The official client over HTTP.
    let out = tokio::process::Command::new(sllm_integration_tests::python().unwrap())
        .arg(root().join("integration-tests/python/embeddings_check.py"))
        .arg(&up.openai)
        .arg("emb/minilm")
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("all embeddings checks passed"),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
