//! How people meet sllm, tested with the real binaries and clients: `sllm up` as the README
//! runs it, every CLI command with its failure paths, the Python SDK, and grpcurl.

#![allow(clippy::unwrap_used)]

mod cli;
mod embeddings;
mod grpcurl;
mod quickstart;
mod sdk;
mod serverlessllm;
mod tokens_and_ranks;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use sllm_integration_tests::Proc;

/// A running `sllm up` on free ports.
pub struct Up {
    pub proc: Proc,
    pub grpc: String,
    pub openai: String,
}

impl Up {
    pub fn start(extra: &[&str]) -> Up {
        let mut args = vec![
            "up",
            "--grpc-addr",
            "127.0.0.1:0",
            "--openai-addr",
            "127.0.0.1:0",
            "--metrics-addr",
            "127.0.0.1:0",
            "--time-scale",
            "0.05",
        ];
        args.extend_from_slice(extra);
        let (proc, _) = Proc::sllm(&args, &[], "Press Ctrl-C to stop.").unwrap();
        Self::from(proc)
    }

    /// The README's own command, `scripts/up` (with free ports, so it can run beside anything).
    pub fn readme() -> Up {
        let script = root().join("scripts/up");
        let proc = Proc::spawn(
            std::process::Command::new(script).args([
                "--grpc-addr",
                "127.0.0.1:0",
                "--openai-addr",
                "127.0.0.1:0",
                "--metrics-addr",
                "127.0.0.1:0",
            ]),
            "Press Ctrl-C to stop.",
            Duration::from_secs(300),
        )
        .unwrap();
        Self::from(proc)
    }

    fn from(proc: Proc) -> Up {
        let out = proc.output();
        let grpc = out
            .lines()
            .find_map(|l| l.trim().strip_prefix("gRPC (every service):"))
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|| panic!("no gRPC address in:\n{out}"));
        let openai = out
            .lines()
            .find_map(|l| l.trim().strip_prefix("OpenAI API:"))
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|| panic!("no OpenAI address in:\n{out}"));
        Up { proc, grpc, openai }
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.grpc)
    }
}

/// POSTs `body` to `path` on the OpenAI port with curl: the status, the `x-request-id` header
/// and the body.
pub async fn post_json(
    up: &Up,
    path: &str,
    body: &serde_json::Value,
) -> (u16, String, serde_json::Value) {
    let base = up.openai.trim_end_matches("/v1");
    let posted = sllm_integration_tests::curl_post(&format!("{base}{path}"), body).await;
    let answer =
        serde_json::from_str(&posted.body).unwrap_or_else(|e| panic!("{e}: {}", posted.body));
    (posted.status, posted.header("x-request-id").to_string(), answer)
}

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// PATH with the sllm binary and the venv's tools (grpcurl) first.
pub fn path() -> String {
    let bin = sllm_integration_tests::sllm_bin().unwrap();
    format!(
        "{}:{}:{}",
        bin.parent().unwrap().display(),
        root().join(".venv/bin").display(),
        std::env::var("PATH").unwrap_or_default()
    )
}

/// Runs `sllm args…` to completion.
pub async fn sllm(args: &[&str]) -> Output {
    let bin = sllm_integration_tests::sllm_bin().unwrap();
    tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(bin).args(args).output(),
    )
    .await
    .expect("sllm finished within 60 s")
    .unwrap()
}

/// Runs a shell command line (as a user would paste it).
pub async fn shell(line: &str) -> Output {
    tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new("sh").arg("-c").arg(line).env("PATH", path()).output(),
    )
    .await
    .expect("finished within 60 s")
    .unwrap()
}

pub fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}
