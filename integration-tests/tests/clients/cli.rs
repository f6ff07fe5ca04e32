use crate::*;

fn ok(o: &std::process::Output, what: &str) -> String {
    let (stdout, stderr) = text(o);
    assert!(o.status.success(), "{what} failed:\n{stdout}\n{stderr}");
    stdout
}

fn fails(o: &std::process::Output, what: &str, needle: &str) {
    let (stdout, stderr) = text(o);
    assert!(!o.status.success(), "{what} should fail:\n{stdout}");
    assert!(stderr.contains(needle), "{what}: {needle:?} not in {stderr:?}");
}

#[tokio::test]
async fn every_client_command_and_its_failures() {
    let up = Up::start(&["--no-demo", "--workers", "2"]);
    let ep = up.endpoint();
    let e = ["--endpoint", ep.as_str()];
    let with = |args: &[&str]| -> Vec<String> {
        args.iter().chain(e.iter()).map(|s| s.to_string()).collect()
    };
    let run = |args: Vec<String>| async move {
        sllm(&args.iter().map(String::as_str).collect::<Vec<_>>()).await
    };

    let out = ok(
        &run(with(&["deploy", "m", "--min", "1", "--max", "2", "--wait", "--timeout", "30"])).await,
        "deploy --wait",
    );
    assert!(out.contains("deployed m"), "{out}");
    let models: serde_json::Value =
        serde_json::from_str(&ok(&run(with(&["models", "--output", "json"])).await, "models"))
            .unwrap();
    assert_eq!(models[0]["model"], "m");
    assert_eq!(models[0]["instances"]["ready"], 1);

    let table = ok(&run(with(&["models"])).await, "models table");
    assert!(table.starts_with("MODEL") && table.contains("m "), "{table}");

    let out = ok(&run(with(&["generate", "m", "hello", "--max-tokens", "5"])).await, "generate");
    assert_eq!(out.split_whitespace().count(), 5, "{out}");
    let json: serde_json::Value = serde_json::from_str(&ok(
        &run(with(&["generate", "m", "hello", "--max-tokens", "3", "--output", "json"])).await,
        "generate json",
    ))
    .unwrap();
    assert_eq!(json["usage"]["completion_tokens"], 3);

    ok(&run(with(&["update", "m", "--max", "3"])).await, "update");
    let status: serde_json::Value =
        serde_json::from_str(&ok(&run(with(&["status", "m", "--output", "json"])).await, "status"))
            .unwrap();
    assert_eq!(status["models"][0]["desired"], 1);
    assert!(
        status["models"][0]["last_decision"]["reason"].as_str().unwrap().contains("placed"),
        "{status}"
    );
    let workers: serde_json::Value =
        serde_json::from_str(&ok(&run(with(&["workers", "--output", "json"])).await, "workers"))
            .unwrap();
    assert_eq!(workers.as_array().unwrap().len(), 2);

    // A ServerlessLLM deploy file as it is, and bad ones with the field named.
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, body: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, body).unwrap();
        p.display().to_string()
    };
    let sllm_file = write(
        "opt.json",
        r#"{"model": "facebook/opt-1.3b", "backend": "transformers", "num_gpus": 1,
        "auto_scaling_config": {"metric": "concurrency", "target": 1, "min_instances": 0, "max_instances": 10, "keep_alive": 0},
        "backend_config": {"pretrained_model_name_or_path": "facebook/opt-1.3b", "torch_dtype": "float16"}}"#,
    );
    ok(&run(with(&["deploy", "--config", &sllm_file])).await, "deploy --config");
    let bad =
        write("bad.json", r#"{"model": "x", "auto_scaling_config": {"max_instances": "ten"}}"#);
    fails(
        &run(with(&["deploy", "--config", &bad])).await,
        "bad config",
        "auto_scaling_config.max_instances",
    );
    let odd = write("odd.json", r#"{"model": "y", "backend": "sim", "colour": "blue"}"#);
    fails(&run(with(&["deploy", "--config", &odd, "--strict"])).await, "strict config", "colour");
    let o = run(with(&["deploy", "--config", &odd])).await;
    assert!(text(&o).1.contains("warning") && text(&o).1.contains("colour"), "lenient mode warns");
    fails(
        &run(with(&["deploy", "z", "--min", "5", "--max", "1"])).await,
        "min > max",
        "spec.auto_scaling_config.min_instances",
    );
    fails(&run(with(&["deploy", "m"])).await, "duplicate", "AlreadyExists");

    fails(&run(with(&["generate", "nope", "hi"])).await, "unknown model", "NotFound");
    fails(&run(with(&["status", "nope"])).await, "unknown model status", "NotFound");
    fails(&run(with(&["delete", "nope"])).await, "unknown model delete", "NotFound");
    ok(&run(with(&["delete", "m"])).await, "delete");
    fails(
        &sllm(&["models", "--endpoint", "http://127.0.0.1:1"]).await,
        "endpoint down",
        "cannot reach sllm",
    );

    for help in [vec!["--help"], vec!["deploy", "--help"], vec!["generate", "--help"]] {
        let out = ok(&sllm(&help).await, "help");
        assert!(out.contains("Usage:"), "{out}");
    }
    let out = ok(&sllm(&["deploy", "--help"]).await, "deploy help");
    assert!(out.contains("ServerlessLLM deploy JSON") && out.contains("--wait"), "{out}");

    // Even killed outright, `sllm up` leaves no redis-server behind.
    let mut up = up;
    let pid = up.proc.pid();
    up.proc.kill();
    let mut left = String::new();
    for _ in 0..30 {
        let o = shell(&format!("pgrep -f '[s]llm-up-{pid}/redis.sock' || true")).await;
        left = text(&o).0.trim().to_string();
        if left.is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(left.is_empty(), "redis-server outlived a killed `sllm up`: {left}");
}
