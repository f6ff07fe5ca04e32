use std::time::Duration;

use crate::*;

/// The README's quick start as written: `sllm up` shows a cold start and a streamed answer,
/// then the four examples it prints work when pasted, and Ctrl-C leaves nothing behind.
#[tokio::test]
async fn sllm_up_runs_a_cluster_and_its_printed_examples_work() {
    let mut up = Up::readme();
    let out = up.proc.output();
    assert!(out.contains("3 simulated GPU workers joined"), "{out}");
    assert!(out.contains("deployed facebook/opt-1.3b (scaled to zero)"), "{out}");
    assert!(out.contains("starting on worker"), "the cold start is shown:\n{out}");
    assert!(out.contains("done: 32 tokens"), "the answer streamed to the end:\n{out}");
    let answer = out
        .lines()
        .find(|l| l.starts_with(' ') && !l.trim_start().starts_with('['))
        .unwrap_or_default();
    assert_eq!(answer.split_whitespace().count(), 32, "{out}");

    let examples: Vec<String> = out
        .lines()
        .skip_while(|l| !l.starts_with("Try:"))
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .map(|l| l.trim().to_string())
        .collect();
    assert_eq!(examples.len(), 4, "{out}");
    for example in &examples {
        let o = shell(example).await;
        let (stdout, stderr) = text(&o);
        assert!(o.status.success(), "{example}\n{stdout}\n{stderr}");
        let words = stdout.split_whitespace().count();
        assert!(words > 3, "{example} printed too little:\n{stdout}");
        if example.contains("/chat/completions") {
            assert!(stdout.contains("data: [DONE]"), "{stdout}");
        }
        if example.contains("/responses") {
            // 16 tokens, all the limit allows: incomplete, as OpenAI's API says it.
            assert!(stdout.contains("event: response.output_text.delta"), "{stdout}");
            assert!(
                stdout
                    .trim_end()
                    .lines()
                    .rev()
                    .nth(1)
                    .is_some_and(|l| l == "event: response.incomplete"),
                "{stdout}"
            );
        }
    }

    // A second `sllm up` on the same ports refuses clearly.
    let second = sllm(&[
        "up",
        "--grpc-addr",
        &up.grpc,
        "--openai-addr",
        "127.0.0.1:0",
        "--metrics-addr",
        "127.0.0.1:0",
    ])
    .await;
    let (_, stderr) = text(&second);
    assert!(!second.status.success());
    assert!(stderr.contains("already in use") && stderr.contains("another `sllm up`"), "{stderr}");

    // Ctrl-C: everything stops, the ports are free, no redis-server is left.
    let pid = up.proc.pid();
    assert!(up.proc.interrupt(Duration::from_secs(10)), "sllm up exits on Ctrl-C");
    assert!(up.proc.exit_status().unwrap().success());
    assert!(std::net::TcpListener::bind(&up.grpc).is_ok(), "gRPC port freed");
    // The bracket keeps pgrep from matching its own command line.
    let left = shell(&format!("pgrep -f '[s]llm-up-{pid}/redis.sock' || true")).await;
    assert!(text(&left).0.trim().is_empty(), "no orphan redis-server");
    assert!(
        !std::path::Path::new(&format!("/tmp/sllm-up-{pid}")).exists(),
        "its directory is removed"
    );
}

#[tokio::test]
async fn sllm_up_explains_a_missing_redis_server() {
    let bin = sllm_integration_tests::sllm_bin().unwrap();
    let o = tokio::process::Command::new(bin)
        .args([
            "up",
            "--grpc-addr",
            "127.0.0.1:0",
            "--openai-addr",
            "127.0.0.1:0",
            "--metrics-addr",
            "127.0.0.1:0",
        ])
        .env("PATH", "/nonexistent")
        .output()
        .await
        .unwrap();
    let (_, stderr) = text(&o);
    assert!(!o.status.success());
    assert!(
        stderr.contains("redis-server is not installed")
            && stderr.contains("apt-get install redis-server"),
        "{stderr}"
    );
}
