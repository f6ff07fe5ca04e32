use crate::*;

/// grpcurl 1.8 (reflection v1alpha) lists and describes every service with its comments,
/// checks health, deploys a model and streams a generation.
#[tokio::test]
async fn grpcurl_is_a_first_class_client() {
    let up = Up::start(&["--no-demo", "--workers", "1"]);
    let (g, a) = ("grpcurl -plaintext", up.grpc.as_str());
    let (list, err) = text(&shell(&format!("{g} {a} list")).await);
    for s in [
        "sllm.v1.ModelRegistry",
        "sllm.v1.WorkerRegistry",
        "sllm.v1.Scaler",
        "sllm.v1.Dispatch",
        "grpc.health.v1.Health",
    ] {
        assert!(list.lines().any(|l| l == s), "{s} not listed:\n{list}\n{err}");
    }
    let (describe, _) = text(&shell(&format!("{g} {a} describe sllm.v1.ModelRegistry")).await);
    assert!(
        describe.contains("Deploys, updates and removes model deployments"),
        "comments shown:\n{describe}"
    );
    let (msg, _) = text(&shell(&format!("{g} {a} describe sllm.v1.AutoScalingConfig")).await);
    assert!(msg.contains("Instances kept even with no demand"), "{msg}");

    for service in
        ["sllm.v1.ModelRegistry", "sllm.v1.WorkerRegistry", "sllm.v1.Scaler", "sllm.v1.Dispatch"]
    {
        let (health, err) = text(
            &shell(&format!(
                "{g} -d '{{\"service\":\"{service}\"}}' {a} grpc.health.v1.Health/Check"
            ))
            .await,
        );
        assert!(health.contains("SERVING"), "{service}: {health}{err}");
    }

    let deploy = r#"{"spec":{"model":"grpcurl-model","backend":"sim","num_gpus":1,"auto_scaling_config":{"target":1,"min_instances":0,"max_instances":1}}}"#;
    let o = shell(&format!("{g} -d '{deploy}' {a} sllm.v1.ModelRegistry/Deploy")).await;
    let (out, err) = text(&o);
    assert!(o.status.success() && out.contains("\"version\": \"1\""), "{out}{err}");

    let generate =
        r#"{"model":"grpcurl-model","prompt":"hi","params":{"max_tokens":4},"progress":true}"#;
    let o = shell(&format!("{g} -d '{generate}' {a} sllm.v1.Dispatch/Generate")).await;
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}{err}");
    // Four tokens, in as many chunks as the stream carried (waiting chunks are sent as one).
    let tokens: u32 = out
        .split("\"tokens\": ")
        .skip(1)
        .filter_map(|rest| rest.split(|c: char| !c.is_ascii_digit()).next()?.parse::<u32>().ok())
        .sum();
    assert_eq!(tokens, 4, "{out}");
    assert!(out.contains("STAGE_QUEUED") && out.contains("\"finished\""), "{out}");

    // A refusal comes back with its code and message.
    let o =
        shell(&format!("{g} -d '{{\"model\":\"missing\"}}' {a} sllm.v1.ModelRegistry/Get")).await;
    let (_, err) = text(&o);
    assert!(!o.status.success() && err.contains("NotFound") && err.contains("missing"), "{err}");
}
