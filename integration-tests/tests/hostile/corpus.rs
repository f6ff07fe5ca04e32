//! The fuzz targets' corpora (`fuzz/corpus/<target>`: seeds, the inputs libFuzzer kept for new
//! coverage, and every crash once fixed), replayed through the very target functions on every
//! test run. `scripts/fuzz` grows them; this keeps each finding fixed.

#[path = "../../../fuzz/targets.rs"]
pub mod targets;

fn replay(target: &str, run: impl Fn(&[u8])) -> usize {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus").join(target);
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        let bytes = std::fs::read(&path).unwrap();
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(&bytes)));
        assert!(outcome.is_ok(), "{target}: {} breaks a rule", path.display());
        n += 1;
    }
    n
}

/// Like libFuzzer's `&str` targets: inputs that are not UTF-8 are skipped.
fn text(run: fn(&str)) -> impl Fn(&[u8]) {
    move |b| {
        if let Ok(s) = std::str::from_utf8(b) {
            run(s)
        }
    }
}

#[test]
fn every_fuzz_corpus_input_replays_cleanly() {
    let counts = [
        ("names", replay("names", text(targets::names))),
        ("deploy_json", replay("deploy_json", text(targets::deploy_json))),
        ("openai_body", replay("openai_body", text(targets::openai_body))),
        ("proto", replay("proto", targets::proto)),
        ("headers", replay("headers", targets::headers)),
    ];
    for (target, n) in counts {
        assert!(n > 0, "the {target} corpus is empty");
    }
}
