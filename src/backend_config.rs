//! A deployment's `backend_config` as an engine's command-line flags, by one table per engine
//! (`src/engine_flags/*.tsv`, taken from each engine's own argument parser; docs/engines.md
//! explains the rules). ModelRegistry checks a deployment against it at deploy time, so a key no
//! engine takes is refused there, naming the key, and never first fails on a GPU host; the
//! worker agent turns the same config into flags with the same code.

use std::collections::HashMap;
use std::sync::LazyLock;

use serde_json::{Map, Value};

/// Engines whose flags sllm knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Engine {
    /// vLLM's `vllm serve`.
    Vllm,
    /// SGLang's `sglang.launch_server`.
    Sglang,
    /// llama.cpp's `llama-server`.
    Llamacpp,
}

impl Engine {
    /// The engine a deployment's `backend` names, if it names one.
    pub fn from_backend(backend: &str) -> Option<Engine> {
        match backend.to_ascii_lowercase().as_str() {
            "vllm" => Some(Engine::Vllm),
            "sglang" => Some(Engine::Sglang),
            "llamacpp" | "llama.cpp" | "llama_cpp" | "llama-cpp" => Some(Engine::Llamacpp),
            _ => None,
        }
    }

    /// The engine's name as users write it.
    pub fn name(self) -> &'static str {
        match self {
            Engine::Vllm => "vLLM",
            Engine::Sglang => "SGLang",
            Engine::Llamacpp => "llama.cpp",
        }
    }

    fn table(self) -> &'static HashMap<String, Kind> {
        &TABLES[match self {
            Engine::Vllm => 0,
            Engine::Sglang => 1,
            Engine::Llamacpp => 2,
        }]
    }
}

/// How a flag takes its value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A bare flag; false is its default, so false passes nothing.
    Bool,
    /// `--x` for true, `--no-x` for false.
    Negatable,
    /// One value.
    Value,
    /// A JSON document as one value.
    Json,
    /// One or more values.
    List,
}

fn parse_table(text: &str) -> HashMap<String, Kind> {
    let mut out = HashMap::new();
    for line in text.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()).skip(1) {
        let mut cols = line.split('\t');
        let (Some(flag), Some(kind)) = (cols.next(), cols.next()) else { continue };
        let kind = match kind.trim() {
            "bool" => Kind::Bool,
            "bool-negatable" => Kind::Negatable,
            "json" => Kind::Json,
            "list" => Kind::List,
            _ => Kind::Value,
        };
        out.insert(flag.trim().trim_start_matches('-').to_string(), kind);
    }
    out
}

static TABLES: LazyLock<[HashMap<String, Kind>; 3]> = LazyLock::new(|| {
    [
        parse_table(include_str!("engine_flags/vllm.tsv")),
        parse_table(include_str!("engine_flags/sglang.tsv")),
        parse_table(include_str!("engine_flags/llamacpp.tsv")),
    ]
});

/// ServerlessLLM's own keys for its transformers backend: accepted from its deploy files.
/// `device_map` and `hf_model_class` tell transformers how to load a checkpoint; a server
/// engine loads and places it itself, so they pass no flag.
const LOADER_HINTS: &[&str] = &["device_map", "hf_model_class"];

/// Flags the worker sets itself for every engine instance.
fn launcher_owned(engine: Engine, flag: &str) -> bool {
    let common = ["host", "port"];
    let own: &[&str] = match engine {
        Engine::Vllm => &["model", "served-model-name", "tensor-parallel-size"],
        Engine::Sglang => &["model-path", "served-model-name", "tp", "tp-size"],
        Engine::Llamacpp => &["model", "alias"],
    };
    common.contains(&flag) || own.contains(&flag)
}

/// A key of backend_config that cannot become a flag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyError {
    /// The key, as written in backend_config.
    pub key: String,
    /// Why.
    pub reason: String,
}

impl std::fmt::Display for KeyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "backend_config.{}: {}", self.key, self.reason)
    }
}

impl std::error::Error for KeyError {}

/// What a backend_config means for an engine.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EngineArgs {
    /// The checkpoint to load instead of the deployment's name
    /// (`pretrained_model_name_or_path`; empty means the name).
    pub model: Option<String>,
    /// The flags, in the config's key order.
    pub args: Vec<String>,
}

fn scalar(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// Turns `config` into `engine`'s flags (`None`: an engine sllm has no table for, whose
/// command the operator wrote: every key `k_name` becomes `--k-name` as it is).
pub fn engine_args(
    engine: Option<Engine>,
    config: &Map<String, Value>,
) -> Result<EngineArgs, KeyError> {
    let mut out = EngineArgs::default();
    let err = |key: &str, reason: String| KeyError { key: key.to_string(), reason };
    for (key, v) in config {
        if v.is_null() {
            continue;
        }
        match key.as_str() {
            "pretrained_model_name_or_path" => {
                let s = v.as_str().ok_or_else(|| err(key, format!("must be a string, got {v}")))?;
                out.model = (!s.is_empty()).then(|| s.to_string());
                continue;
            }
            k if LOADER_HINTS.contains(&k) => continue,
            "lora_adapters" => {
                let pairs: Vec<(String, String)> =
                    lora_adapters(config)?.into_iter().map(|a| (a.name, a.path)).collect();
                if pairs.is_empty() {
                    continue;
                }
                match engine {
                    Some(Engine::Vllm) => {
                        push_once(&mut out.args, "--enable-lora");
                        out.args.push("--lora-modules".into());
                        out.args.extend(pairs.iter().map(|(n, p)| format!("{n}={p}")));
                    }
                    Some(Engine::Sglang) => {
                        push_once(&mut out.args, "--enable-lora");
                        out.args.push("--lora-paths".into());
                        out.args.extend(pairs.iter().map(|(n, p)| format!("{n}={p}")));
                    }
                    Some(Engine::Llamacpp) => {
                        for (_, p) in &pairs {
                            out.args.push("--lora".into());
                            out.args.push(p.clone());
                        }
                        // Each request picks its adapter (by position); the base model's
                        // requests get none.
                        push_once(&mut out.args, "--lora-init-without-apply");
                    }
                    None => {
                        return Err(err(
                            key,
                            "needs an engine sllm knows (vllm, sglang, llamacpp)".into(),
                        ));
                    }
                }
                continue;
            }
            _ => {}
        }
        let flag = match (engine, key.as_str()) {
            (Some(Engine::Vllm | Engine::Sglang), "torch_dtype") => "dtype".to_string(),
            (Some(Engine::Llamacpp), "torch_dtype") => {
                return Err(err(key, "llama.cpp takes the types stored in the GGUF file".into()));
            }
            (Some(Engine::Llamacpp), "max_model_len" | "context_length") => "ctx-size".into(),
            (Some(Engine::Sglang), "max_model_len") => "context-length".into(),
            (Some(Engine::Llamacpp), "enable_lora") => {
                // llama.cpp serves the adapters it is given; there is nothing to switch on.
                if v.is_boolean() {
                    continue;
                }
                return Err(err(key, format!("must be true or false, got {v}")));
            }
            (_, "enable_lora")
                if v.as_bool() == Some(false)
                    && config
                        .get("lora_adapters")
                        .and_then(Value::as_object)
                        .is_some_and(|m| !m.is_empty()) =>
            {
                // Adapters switch LoRA on (the deploy warned that enable_lora said otherwise).
                continue;
            }
            _ => key.replace('_', "-"),
        };
        let Some(engine) = engine else {
            match v {
                Value::Bool(true) => out.args.push(format!("--{flag}")),
                Value::Bool(false) => {}
                Value::Array(items) => {
                    out.args.push(format!("--{flag}"));
                    for item in items {
                        out.args.push(scalar(item).unwrap_or_else(|| item.to_string()));
                    }
                }
                Value::Object(_) => {
                    out.args.push(format!("--{flag}"));
                    out.args.push(v.to_string());
                }
                other => {
                    out.args.push(format!("--{flag}"));
                    out.args.push(scalar(other).unwrap_or_default());
                }
            }
            continue;
        };
        if launcher_owned(engine, &flag) {
            return Err(err(key, "is set by the worker for every instance".into()));
        }
        let Some(kind) = engine.table().get(&flag).copied() else {
            return Err(err(key, format!("{} has no flag --{flag}", engine.name())));
        };
        match (kind, v) {
            (Kind::Bool, Value::Bool(true)) | (Kind::Negatable, Value::Bool(true)) => {
                out.args.push(format!("--{flag}"));
            }
            (Kind::Bool, Value::Bool(false)) => {}
            (Kind::Negatable, Value::Bool(false)) => out.args.push(format!("--no-{flag}")),
            (Kind::Bool | Kind::Negatable, other) => {
                return Err(err(
                    key,
                    format!("--{flag} is a switch: give true or false, not {other}"),
                ));
            }
            (Kind::Json, Value::Object(_) | Value::Array(_)) => {
                out.args.push(format!("--{flag}"));
                out.args.push(v.to_string());
            }
            (Kind::List, Value::Array(items)) => {
                out.args.push(format!("--{flag}"));
                for item in items {
                    let s = scalar(item).ok_or_else(|| {
                        err(key, format!("list items must be strings or numbers, got {item}"))
                    })?;
                    out.args.push(s);
                }
            }
            (_, Value::Object(_) | Value::Array(_)) => {
                return Err(err(key, format!("--{flag} takes one value, not {v}")));
            }
            (_, other) => {
                out.args.push(format!("--{flag}"));
                out.args.push(scalar(other).unwrap_or_default());
            }
        }
    }
    Ok(out)
}

/// A LoRA adapter a deployment serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Adapter {
    /// What requests name it by (`model: "base:name"`, or `lora_adapter_name`).
    pub name: String,
    /// Where its weights are, as the engine reads them (a path or a hub name).
    pub path: String,
}

/// Checks an adapter's name: 1..=64 characters from `[A-Za-z0-9._-]`, starting with a letter
/// or digit (no `/` or `:`, which name a base model and an adapter of it).
pub fn validate_adapter_name(name: &str) -> Result<(), String> {
    let ok_chars = name.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
    let first_ok = name.chars().next().is_some_and(|c| c.is_ascii_alphanumeric());
    if name.is_empty() || name.len() > 64 || !ok_chars || !first_ok {
        return Err(format!(
            "adapter name {name:?} must be 1..=64 characters from [A-Za-z0-9._-], starting with \
             a letter or digit"
        ));
    }
    Ok(())
}

/// The context length `config` starts its engine with, in tokens: `max_model_len`, or the
/// engines' own names that the deploy check lets through only for the engine whose flag they
/// are (`context_length`: SGLang's `--context-length`, llama.cpp's alias; `ctx_size`:
/// llama.cpp's `--ctx-size`); a whole number, or its digits as a string; None if unset.
pub fn max_model_len(config: &Map<String, Value>) -> Option<u64> {
    let v = ["max_model_len", "context_length", "ctx_size"].iter().find_map(|k| config.get(*k))?;
    v.as_u64().or_else(|| v.as_str().and_then(|s| s.trim().parse().ok()))
}

/// The LoRA adapters `config` names (`lora_adapters`: {name: path}), in the config's order.
pub fn lora_adapters(config: &Map<String, Value>) -> Result<Vec<Adapter>, KeyError> {
    let key = "lora_adapters";
    let err = |key: String, reason: String| KeyError { key, reason };
    let adapters = match config.get(key) {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Object(m)) => m,
        Some(v) => {
            return Err(err(key.into(), format!("must map adapter names to paths, got {v}")));
        }
    };
    let mut out = Vec::with_capacity(adapters.len());
    for (name, path) in adapters {
        validate_adapter_name(name).map_err(|r| err(format!("{key}.{name}"), r))?;
        let path = path
            .as_str()
            .filter(|p| !p.is_empty())
            .ok_or_else(|| err(format!("{key}.{name}"), format!("must be a path, got {path}")))?;
        out.push(Adapter { name: name.clone(), path: path.to_string() });
    }
    Ok(out)
}

fn push_once(args: &mut Vec<String>, flag: &str) {
    if !args.iter().any(|a| a == flag) {
        args.push(flag.to_string());
    }
}

/// ServerlessLLM's keys for its transformers backend.
const TRANSFORMERS_KEYS: &[&str] =
    &["pretrained_model_name_or_path", "device_map", "torch_dtype", "hf_model_class", "precision"];

/// Checks a deployment's backend_config for its backend at deploy time: for vllm, sglang and
/// llamacpp every key must become one of that engine's flags; for ServerlessLLM's
/// `transformers` backend only its own keys are known; other backends (sim, custom commands)
/// take any key.
pub fn check(backend: &str, config: &Map<String, Value>) -> Result<(), KeyError> {
    if let Some(engine) = Engine::from_backend(backend) {
        return engine_args(Some(engine), config).map(|_| ());
    }
    if backend.eq_ignore_ascii_case("transformers") {
        for k in config.keys() {
            if !TRANSFORMERS_KEYS.contains(&k.as_str())
                && !["lora_adapters", "enable_lora"].contains(&k.as_str())
            {
                return Err(KeyError {
                    key: k.clone(),
                    reason: format!(
                        "the transformers backend takes only {}",
                        TRANSFORMERS_KEYS.join(", ")
                    ),
                });
            }
        }
    }
    // The simulator, transformers and custom backends take adapters by name; the keys pass no
    // flag there.
    lora_adapters(config)?;
    if let Some(v) = config.get("enable_lora").filter(|v| !v.is_null() && !v.is_boolean()) {
        return Err(KeyError {
            key: "enable_lora".into(),
            reason: format!("must be true or false, got {v}"),
        });
    }
    let rest: Map<String, Value> = config
        .iter()
        .filter(|(k, _)| !["lora_adapters", "enable_lora"].contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    engine_args(None, &rest).map(|_| ())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use serde_json::json;

    use super::*;

    fn args(engine: Engine, config: Value) -> Result<EngineArgs, KeyError> {
        engine_args(Some(engine), config.as_object().unwrap())
    }

    #[test]
    fn the_tables_are_read() {
        for (engine, flag) in [
            (Engine::Vllm, "max-model-len"),
            (Engine::Sglang, "context-length"),
            (Engine::Llamacpp, "ctx-size"),
        ] {
            assert!(engine.table().len() > 100, "{engine:?}");
            assert!(engine.table().contains_key(flag), "{engine:?} {flag}");
        }
    }

    #[test]
    fn serverlessllm_keys_and_engine_flags_map_both_ways() {
        let a = args(
            Engine::Vllm,
            json!({
                "pretrained_model_name_or_path": "facebook/opt-1.3b",
                "torch_dtype": "float16",
                "device_map": "auto",
                "max_model_len": 4096,
                "enforce_eager": true,
                "trust_remote_code": false,
                "hf_overrides": {"rope_scaling": {"factor": 2}},
                "lora_adapters": {"sql": "/loras/sql"},
            }),
        )
        .unwrap();
        assert_eq!(a.model.as_deref(), Some("facebook/opt-1.3b"));
        assert_eq!(
            a.args,
            [
                "--dtype",
                "float16",
                "--max-model-len",
                "4096",
                "--enforce-eager",
                "--no-trust-remote-code",
                "--hf-overrides",
                r#"{"rope_scaling":{"factor":2}}"#,
                "--enable-lora",
                "--lora-modules",
                "sql=/loras/sql",
            ]
        );
        let a = args(
            Engine::Llamacpp,
            json!({"max_model_len": 2048, "parallel": 1, "pretrained_model_name_or_path": ""}),
        )
        .unwrap();
        assert_eq!(a.args, ["--ctx-size", "2048", "--parallel", "1"]);
        assert_eq!(a.model, None, "empty means the model's own name");
        let a = args(Engine::Sglang, json!({"max_model_len": 8192})).unwrap();
        assert_eq!(a.args, ["--context-length", "8192"]);
    }

    #[test]
    fn lora_adapters_become_each_engines_flags_and_are_checked_by_name() {
        let a = args(
            Engine::Llamacpp,
            json!({"lora_adapters": {"a": "/l/a.gguf", "b": "/l/b.gguf"}, "enable_lora": false}),
        )
        .unwrap();
        assert_eq!(
            a.args,
            ["--lora", "/l/a.gguf", "--lora", "/l/b.gguf", "--lora-init-without-apply"]
        );
        // Adapters switch LoRA on even where enable_lora says false (the deploy warns).
        let a = args(Engine::Vllm, json!({"enable_lora": false, "lora_adapters": {"a": "/a"}}))
            .unwrap();
        assert_eq!(a.args, ["--enable-lora", "--lora-modules", "a=/a"]);
        // The simulator and custom backends take adapters by name, with no flag.
        let sim = json!({"lora_adapters": {"a": "/a"}, "enable_lora": true});
        assert!(check("sim", sim.as_object().unwrap()).is_ok());
        for (config, key) in [
            (json!({"lora_adapters": {"a:b": "/p"}}), "lora_adapters.a:b"),
            (json!({"lora_adapters": {"a": ""}}), "lora_adapters.a"),
            (json!({"lora_adapters": ["a"]}), "lora_adapters"),
            (json!({"enable_lora": "yes"}), "enable_lora"),
        ] {
            assert_eq!(check("sim", config.as_object().unwrap()).unwrap_err().key, key);
        }
    }

    #[test]
    fn the_context_length_is_read_as_a_number_or_its_digits() {
        let of = |v: serde_json::Value| max_model_len(v.as_object().unwrap());
        assert_eq!(of(json!({"max_model_len": 4096})), Some(4096));
        assert_eq!(of(json!({"max_model_len": "2048"})), Some(2048));
        assert_eq!(of(json!({"context_length": 512})), Some(512));
        assert_eq!(of(json!({"ctx_size": 1024, "parallel": 1})), Some(1024));
        assert_eq!(of(json!({"max_model_len": -1})), None);
        assert_eq!(of(json!({"torch_dtype": "float16"})), None);
    }

    #[test]
    fn keys_no_engine_takes_are_refused_naming_the_key() {
        let cases = [
            (Engine::Vllm, json!({"max_model_lenght": 10}), "max_model_lenght", "no flag"),
            (Engine::Vllm, json!({"enforce_eager": "yes"}), "enforce_eager", "true or false"),
            (Engine::Vllm, json!({"max_model_len": {"a": 1}}), "max_model_len", "one value"),
            (Engine::Vllm, json!({"port": 9000}), "port", "set by the worker"),
            (Engine::Llamacpp, json!({"torch_dtype": "float16"}), "torch_dtype", "GGUF"),
            (
                Engine::Sglang,
                json!({"quantization_config": {"bits": 4}}),
                "quantization_config",
                "no flag",
            ),
            (
                Engine::Vllm,
                json!({"pretrained_model_name_or_path": 3}),
                "pretrained_model_name_or_path",
                "string",
            ),
        ];
        for (engine, config, key, words) in cases {
            let e = args(engine, config).unwrap_err();
            assert_eq!(e.key, key);
            assert!(e.to_string().contains(words), "{e}");
        }
        assert!(
            check(
                "transformers",
                json!({"torch_dtype": "float16", "device_map": "auto"}).as_object().unwrap()
            )
            .is_ok()
        );
        assert_eq!(
            check("transformers", json!({"max_num_seqs": 4}).as_object().unwrap()).unwrap_err().key,
            "max_num_seqs"
        );
        assert!(check("custom", json!({"anything": {"goes": 1}}).as_object().unwrap()).is_ok());
    }
}
