//! The Kubernetes manifests in `deploy/kubernetes`, checked offline: rendered (base, overlays,
//! every component; against `kubectl kustomize` where it is installed), validated against the
//! Kubernetes API schemas, and wired to the real binary: every flag and environment variable a
//! container passes exists in `sllm serve --help` / `sllm worker --help`, every port a probe or
//! Service names is one the process listens on, every Secret key a pod mounts is the file its
//! flag reads. The checks live in `integration-tests/python/k8s_check.py` (it needs the
//! `kubernetes-validate` package that `scripts/install-deps` puts in `.venv`); this runs it.

#![allow(clippy::unwrap_used)]

use std::path::Path;

#[test]
fn manifests_render_validate_and_match_the_binary() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/k8s_check.py");
    let sllm = sllm_integration_tests::sllm_bin().unwrap();
    let out = std::process::Command::new(sllm_integration_tests::python().unwrap())
        .arg(&script)
        .arg(&sllm)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "the manifests do not hold:\n{stdout}");
    assert!(stdout.contains("manifests: every check holds"));
}
