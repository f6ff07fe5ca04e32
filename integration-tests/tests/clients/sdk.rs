use crate::*;

/// The generated Python SDK deploys, streams a generation and deletes.
#[tokio::test]
async fn the_python_sdk_deploys_generates_and_deletes() {
    let up = Up::start(&["--no-demo", "--workers", "1"]);
    let python = sllm_integration_tests::python().unwrap();
    let script = root().join("integration-tests/python/sdk_check.py");
    let o = tokio::process::Command::new(python)
        .arg(script)
        .arg(&up.grpc)
        .env("PYTHONPATH", root().join("sdk/python"))
        .output()
        .await
        .unwrap();
    let (stdout, stderr) = text(&o);
    assert!(o.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("all sdk checks passed"), "{stdout}");
}
