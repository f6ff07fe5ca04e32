//! A ServerlessLLM user moving to sllm: its example deploy files deployed unchanged, its CLI's
//! forms typed into `sllm`, and the HTTP requests its own CLI sends replayed against sllm's
//! OpenAI port. The cluster is `sllm serve all` and a real `sllm worker --engine vllm` whose
//! `vllm` is a stand-in that records its command line and serves as the simulator.

use std::collections::HashMap;
use std::path::PathBuf;

use sllm_integration_tests::{JOIN_SECRET, Proc, RedisServer};

use crate::*;

struct Cluster {
    _redis: RedisServer,
    _serve: Proc,
    _worker: Proc,
    grpc: String,
    openai: String,
    /// One line per engine started: the stand-in `vllm`'s arguments.
    args_file: PathBuf,
    _dir: tempfile::TempDir,
}

impl Cluster {
    async fn start() -> Cluster {
        let redis = RedisServer::start().unwrap();
        let (serve, _) = Proc::sllm(
            &[
                "serve",
                "all",
                "--redis-url",
                &redis.url(),
                "--grpc-addr",
                "127.0.0.1:0",
                "--openai-addr",
                "127.0.0.1:0",
                "--metrics-addr",
                "127.0.0.1:0",
            ],
            &[("SLLM_JOIN_SECRET", JOIN_SECRET)],
            "metrics on",
        )
        .unwrap();
        let out = serve.output();
        let find =
            |p: &str| out.lines().find_map(|l| l.strip_prefix(p)).unwrap().trim().to_string();
        let grpc = format!("http://{}", find("sllm: serving gRPC on"));
        let openai = find("sllm: openai api listening on");
        let openai = if openai.starts_with("http") { openai } else { format!("http://{openai}") };

        let dir = tempfile::tempdir().unwrap();
        let args_file = dir.path().join("vllm-args");
        let fake = dir.path().join("vllm");
        std::fs::write(
            &fake,
            format!(
                "#!/bin/sh\n\
                 # A stand-in for `vllm serve`: records its command line, then serves as the simulator.\n\
                 echo \"$*\" >> '{args}'\n\
                 name=; port=; loras=\n\
                 while [ $# -gt 0 ]; do\n\
                   case \"$1\" in\n\
                     --served-model-name) name=$2; shift ;;\n\
                     --port) port=$2; shift ;;\n\
                     --lora-modules) while [ $# -gt 1 ] && [ \"${{2#--}}\" = \"$2\" ]; do loras=\"$loras $2\"; shift; done ;;\n\
                   esac\n\
                   shift\n\
                 done\n\
                 exec '{sllm}' sim-engine --port \"$port\" --model \"$name\" --load-ms 50 --decode-ms 1 ${{loras:+--lora-modules $loras}}\n",
                args = args_file.display(),
                sllm = sllm_integration_tests::sllm_bin().unwrap().display(),
            ),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
        let path =
            format!("{}:{}", dir.path().display(), std::env::var("PATH").unwrap_or_default());
        let (worker, _) = Proc::sllm(
            &[
                "worker",
                "--backend",
                "engine",
                "--engine",
                "vllm",
                "--registry",
                &grpc,
                "--node-id",
                "gpu-1",
                "--gpus",
                "2",
                "--stop-grace-s",
                "1",
            ],
            &[("SLLM_JOIN_SECRET", JOIN_SECRET), ("PATH", &path)],
            "started",
        )
        .unwrap();
        Cluster {
            _redis: redis,
            _serve: serve,
            _worker: worker,
            grpc,
            openai,
            args_file,
            _dir: dir,
        }
    }

    /// `sllm args… --endpoint <cluster>`.
    async fn sllm(&self, args: &[&str]) -> std::process::Output {
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["--endpoint", &self.grpc]);
        sllm(&all).await
    }

    /// Every stored deployment by name, as `sllm models --output json` shows it.
    async fn stored(&self) -> HashMap<String, serde_json::Value> {
        let o = self.sllm(&["models", "--output", "json"]).await;
        let (stdout, stderr) = text(&o);
        assert!(o.status.success(), "{stderr}");
        let list: Vec<serde_json::Value> = serde_json::from_str(&stdout).unwrap();
        list.into_iter().map(|d| (d["model"].as_str().unwrap().to_string(), d)).collect()
    }

    /// The arguments the engine of `model` was started with (waiting for it to start).
    async fn engine_args(&self, model: &str) -> String {
        let prefix = format!("serve {model} --served-model-name {model} ");
        sllm_integration_tests::eventually(
            std::time::Duration::from_secs(20),
            "the engine started",
            || async {
                let all = std::fs::read_to_string(&self.args_file).unwrap_or_default();
                all.lines().find(|l| l.starts_with(&prefix)).map(str::to_string)
            },
        )
        .await
        .unwrap()
    }
}

fn fixture(path: &str) -> String {
    root().join("integration-tests/fixtures/serverlessllm").join(path).display().to_string()
}

fn ok(o: &std::process::Output, what: &str) -> (String, String) {
    let (stdout, stderr) = text(o);
    assert!(o.status.success(), "{what} failed:\n{stdout}\n{stderr}");
    (stdout, stderr)
}

#[tokio::test]
async fn serverlessllm_deploy_files_deploy_unchanged() {
    // The defaults sllm merges files over are ServerlessLLM's own file.
    let defaults: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("sllm/cli/default_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(service::deploy_config::serverlessllm_defaults(), defaults);

    let c = Cluster::start().await;
    let files = [
        "examples/embedding/transformers_embed_config.json",
        "examples/embedding/vllm_embed_config.json",
        "examples/live_migration/config-qwen-1.5b.json",
        "examples/live_migration/config-qwen-3b.json",
        "examples/storage_aware_scheduling/config-opt-1.3b.json",
        "examples/storage_aware_scheduling/config-opt-2.7b.json",
    ];
    let mut warned = HashMap::new();
    for f in files {
        let (_, stderr) = ok(&c.sllm(&["deploy", "--config", &fixture(f)]).await, f);
        warned.insert(f, stderr);
    }
    // What sllm does not do is said, section by section, and nothing else is warned about.
    let w = &warned["examples/live_migration/config-qwen-3b.json"];
    assert!(w.contains("placement_config (local_disk, memory_pool): ignored"), "{w}");
    assert!(
        w.contains("router_config (migration_delta): ignored: sllm moves a stream only off a lost or draining instance"),
        "{w}"
    );
    assert!(w.contains("scheduler_config (alpha, beta): ignored"), "{w}");
    let w = &warned["examples/storage_aware_scheduling/config-opt-1.3b.json"];
    assert!(w.contains("placement_config (target_nodes): ignored"), "{w}");
    assert!(!warned["examples/embedding/vllm_embed_config.json"].contains("warning"));

    let stored = c.stored().await;
    assert_eq!(stored.len(), 6, "{stored:?}");
    // The file over ServerlessLLM's defaults: keep_alive and hf_model_class come from them.
    let e5 = &stored["intfloat/e5-mistral-7b-instruct"];
    assert_eq!(e5["backend"], "vllm");
    assert_eq!(e5["num_gpus"], 1);
    assert_eq!(
        e5["auto_scaling_config"],
        serde_json::json!({"metric": "concurrency", "target": 1.0, "min_instances": 0, "max_instances": 10, "keep_alive": 0})
    );
    assert_eq!(
        e5["backend_config"],
        serde_json::json!({
            "pretrained_model_name_or_path": "intfloat/e5-mistral-7b-instruct",
            "device_map": "auto",
            "torch_dtype": "float16",
            "hf_model_class": "AutoModelForCausalLM",
            "enforce_eager": true,
            "enable_prefix_caching": false,
        })
    );
    let minilm = &stored["sentence-transformers/all-MiniLM-L12-v2"];
    assert_eq!(minilm["backend"], "transformers");
    assert_eq!(minilm["auto_scaling_config"]["keep_alive"], 0);
    assert_eq!(minilm["backend_config"]["hf_model_class"], "AutoModel");
    assert_eq!(minilm["backend_config"]["torch_dtype"], "float32");
    assert_eq!(stored["Qwen/Qwen2.5-3B-Instruct"]["auto_scaling_config"]["max_instances"], 10);

    // A request starts the vLLM deployment; its engine gets the file's settings as flags.
    ok(
        &c.sllm(&["generate", "intfloat/e5-mistral-7b-instruct", "hello", "--max-tokens", "3"])
            .await,
        "generate",
    );
    let args = c.engine_args("intfloat/e5-mistral-7b-instruct").await;
    // (backend_config travels as a protobuf Struct, whose keys come in name order.)
    assert!(
        args.ends_with(
            "--tensor-parallel-size 1 --no-enable-prefix-caching --enforce-eager --dtype float16"
        ),
        "{args}"
    );

    // ServerlessLLM's CLI form with adapters: the engine serves them from its start.
    ok(
        &c.sllm(&[
            "deploy",
            "--model",
            "facebook/opt-125m",
            "--num-gpus",
            "2",
            "--target",
            "2",
            "--min-instances",
            "0",
            "--max-instances",
            "3",
            "--enable-lora",
            "--lora-adapters",
            "demo-lora1=crumb/FLAN-OPT-125M-LoRA",
            "demo-lora2=GrantC/alpaca-opt-125m-lora",
        ])
        .await,
        "deploy --model",
    );
    let opt = &c.stored().await["facebook/opt-125m"];
    assert_eq!((opt["num_gpus"].as_i64(), opt["backend"].as_str()), (Some(2), Some("vllm")));
    assert_eq!(opt["auto_scaling_config"]["target"], 2.0);
    assert_eq!(opt["auto_scaling_config"]["max_instances"], 3);
    assert_eq!(opt["backend_config"]["pretrained_model_name_or_path"], "facebook/opt-125m");
    assert_eq!(opt["backend_config"]["enable_lora"], true);
    ok(&c.sllm(&["generate", "facebook/opt-125m", "hello", "--max-tokens", "2"]).await, "generate");
    let args = c.engine_args("facebook/opt-125m").await;
    assert!(
        args.ends_with(
            "--tensor-parallel-size 2 --enable-lora --lora-modules \
             demo-lora1=crumb/FLAN-OPT-125M-LoRA demo-lora2=GrantC/alpaca-opt-125m-lora --dtype \
             float16"
        ),
        "{args}"
    );
}

#[tokio::test]
async fn serverlessllm_cli_forms_work_beside_sllm_ones() {
    let c = Cluster::start().await;
    let (stdout, _) = ok(&c.sllm(&["status"]).await, "status, nothing deployed");
    assert_eq!(stdout.trim(), "No models currently deployed.");
    for m in ["a/one", "a/two", "a/three"] {
        ok(&c.sllm(&["deploy", m, "--max-instances", "2"]).await, "short form with a long flag");
    }
    ok(
        &c.sllm(&[
            "deploy",
            "--model",
            "b/base",
            "--backend",
            "sim",
            "--lora-adapters",
            "x=/l/x,y=/l/y",
        ])
        .await,
        "deploy --model with adapters",
    );
    let (stdout, _) = ok(&c.sllm(&["status"]).await, "status");
    assert_eq!(
        stdout,
        "Model status retrieved successfully:\n- a/one\n- a/three\n- a/two\n- b/base\n"
    );
    let (stdout, _) = ok(&c.sllm(&["status", "--detail"]).await, "status --detail");
    assert!(stdout.contains("scaler leader") && stdout.contains("a/two: desired 0"), "{stdout}");

    // Adapters added and removed on the live deployment.
    ok(&c.sllm(&["update", "b/base", "--lora-adapters", "z=/l/z"]).await, "update adds");
    let (stdout, _) = ok(
        &c.sllm(&["delete", "b/base", "--lora-adapters", "x", "y=/l/y"]).await,
        "delete adapters",
    );
    assert!(stdout.contains("removed LoRA adapter(s) x, y from b/base"), "{stdout}");
    let stored = c.stored().await;
    assert_eq!(stored["b/base"]["state"], "active");
    assert_eq!(
        stored["b/base"]["backend_config"]["lora_adapters"],
        serde_json::json!({"z": "/l/z"})
    );
    let o = c.sllm(&["delete", "b/base", "--lora-adapters", "nope"]).await;
    assert!(
        !o.status.success() && text(&o).1.contains("no LoRA adapter \"nope\" (it has: z)"),
        "{}",
        text(&o).1
    );
    let o = c.sllm(&["delete", "a/one", "a/two", "--lora-adapters", "x"]).await;
    assert!(!o.status.success() && text(&o).1.contains("adapters of one model"), "{}", text(&o).1);
    let o = c.sllm(&["deploy", "--model", "c/m", "--lora-adapters", "bad"]).await;
    assert!(
        !o.status.success() && text(&o).1.contains("\"bad\" is not NAME=PATH"),
        "{}",
        text(&o).1
    );
    let o = c
        .sllm(&["deploy", "--model", "c/m", "--lora-adapters", "a:b=/p", "--backend", "sim"])
        .await;
    assert!(!o.status.success() && text(&o).1.contains("lora_adapters.a:b"), "{}", text(&o).1);

    // Several models at once; one that is not there fails the command, naming it, and the
    // others are deleted all the same.
    let o = c.sllm(&["delete", "a/one", "nope/none", "a/two"]).await;
    let (stdout, stderr) = text(&o);
    assert!(!o.status.success());
    assert!(stderr.contains("1 of 3 not deleted: nope/none (NotFound"), "{stderr}");
    assert!(stdout.contains("deleting a/one") && stdout.contains("deleting a/two"), "{stdout}");
    let left: Vec<String> = c
        .stored()
        .await
        .into_iter()
        .filter(|(_, d)| d["state"] == "active")
        .map(|(m, _)| m)
        .collect();
    assert_eq!(left.len(), 2, "{left:?}");
}

#[tokio::test]
async fn serverlessllm_http_api_answers_its_own_cli() {
    let c = Cluster::start().await;
    let out = tokio::process::Command::new(sllm_integration_tests::python().unwrap())
        .arg(root().join("integration-tests/python/serverlessllm_cli_replay.py"))
        .arg(&c.openai)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("all ServerlessLLM CLI checks passed"),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // What the replayed requests left, read through sllm's own API.
    let stored = c.stored().await;
    let opt = &stored["facebook/opt-125m"];
    assert_eq!(opt["auto_scaling_config"]["max_instances"], 3);
    assert_eq!(opt["auto_scaling_config"]["min_instances"], 0, "update kept the rest");
    assert_eq!(
        opt["backend_config"]["lora_adapters"],
        serde_json::json!({"demo-lora2": "GrantC/alpaca-opt-125m-lora"})
    );
}

#[tokio::test]
async fn lora_adapters_are_served_loaded_on_demand_and_listed() {
    let c = Cluster::start().await;
    ok(
        &c.sllm(&[
            "deploy",
            "--model",
            "base/m",
            "--keep-alive",
            "300",
            "--lora-adapters",
            "a1=/loras/a1",
        ])
        .await,
        "deploy with an adapter",
    );
    // Adapters named every way a client names them; the first request starts the model from
    // zero (an adapter's demand is its base model's).
    let replay = |step: &'static str| {
        let c = &c;
        async move {
            let out = tokio::process::Command::new(sllm_integration_tests::python().unwrap())
                .arg(root().join("integration-tests/python/lora_check.py"))
                .arg(&c.openai)
                .arg(step)
                .output()
                .await
                .unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
            assert!(
                out.status.success() && stdout.contains(&format!("{step} checks passed")),
                "{stdout}\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    };
    replay("started").await;
    let started = c.engine_args("base/m").await;
    assert!(started.contains("--enable-lora --lora-modules a1=/loras/a1"), "{started}");

    // An adapter added to the live deployment: the running engine loads it when a request
    // first names it, and is not restarted.
    ok(&c.sllm(&["update", "base/m", "--lora-adapters", "a2=/loras/a2"]).await, "add a2");
    replay("added").await;
    let engines = std::fs::read_to_string(&c.args_file).unwrap();
    assert_eq!(engines.lines().filter(|l| l.starts_with("serve base/m ")).count(), 1, "{engines}");
    let port = started.split("--port ").nth(1).unwrap().split(' ').next().unwrap();
    let engine_models = || async move {
        let o = shell(&format!("curl -s http://127.0.0.1:{port}/v1/models")).await;
        let v: serde_json::Value = serde_json::from_str(&text(&o).0).unwrap();
        v["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(engine_models().await, ["base/m", "a1", "a2"], "the engine loaded a2 at run time");

    // gRPC names an adapter the same way.
    let (base, _) = ok(
        &c.sllm(&["generate", "base/m", "hello", "--max-tokens", "6", "--temperature", "0"]).await,
        "generate base",
    );
    let (a2, _) = ok(
        &c.sllm(&["generate", "base/m:a2", "hello", "--max-tokens", "6", "--temperature", "0"])
            .await,
        "generate a2",
    );
    assert_ne!(base, a2);
    let o = c.sllm(&["generate", "base/m:zz", "hello"]).await;
    assert!(text(&o).1.contains("has no LoRA adapter \"zz\" (it has: a1, a2)"), "{}", text(&o).1);

    // Removed: refused at once.
    ok(&c.sllm(&["delete", "base/m", "--lora-adapters", "a1"]).await, "remove a1");
    replay("removed").await;
    // An adapter name two deployments share must be named with its base.
    ok(
        &c.sllm(&["deploy", "other/m", "--backend", "sim", "--lora-adapters", "a2=/x"]).await,
        "another model with an a2",
    );
    let o = c.sllm(&["generate", "a2", "hello"]).await;
    assert!(
        text(&o).1.contains("\"a2\" belongs to several models (base/m, other/m)")
            || text(&o).1.contains("\"a2\" belongs to several models (other/m, base/m)"),
        "{}",
        text(&o).1
    );
    // ... and the engine unloads it.
    sllm_integration_tests::eventually(
        std::time::Duration::from_secs(10),
        "the engine unloaded a1",
        || async { (engine_models().await == ["base/m", "a2"]).then_some(()) },
    )
    .await
    .unwrap();
}
