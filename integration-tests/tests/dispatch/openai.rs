use std::time::Duration;

use crate::*;

/// The official `openai` Python package against /v1: models, completions and chat, streaming
/// and not, and its error classes for an unknown model, a model no worker can hold and a full
/// queue.
#[tokio::test]
async fn the_official_openai_client_works_unchanged() {
    let c = Cluster::start_with(|d| d.max_queue = 1).await;
    let mut sim = fast_sim();
    // "stuck" loads for ever: its requests stay queued.
    sim.hang_load.insert("stuck".into());
    let _w = c.worker("w1", sim).await;
    c.deploy("m", 1, 1).await;
    c.deploy("cold", 0, 1).await;
    c.deploy("stuck", 0, 1).await;
    c.store
        .create_deployment(&kvstore::DeploymentSpec {
            model: "never".into(),
            backend: "sim".into(),
            num_gpus: 64, // no worker can ever hold it
            autoscaling: kvstore::AutoScaling::default(),
            backend_config: String::new(),
        })
        .await
        .unwrap();
    // Started with a context of 16 tokens, which its card says and its engine keeps.
    let mut short = sllm_integration_tests::sim_deployment("short", 1, 1);
    short.backend_config = r#"{"max_model_len": 16}"#.into();
    c.store.create_deployment(&short).await.unwrap();
    c.ready("m", 1).await;
    c.ready("short", 1).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let python = sllm_integration_tests::python().unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/python/openai_compat.py");
    let out = tokio::process::Command::new(python)
        .arg(script)
        .arg(c.dispatch.openai_base())
        .arg(expected_text(7, "Say hi", 8))
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "openai client checks failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("all openai checks passed"), "{stdout}");
}
