//! ServerlessLLM deploy JSON files, accepted as they are: `model`, `backend`, `num_gpus`,
//! `auto_scaling_config` {metric, target, min_instances, max_instances, keep_alive},
//! `backend_config` (with `enable_lora` and `lora_adapters`), and the `placement_config`,
//! `router_config` and `scheduler_config` sections, which sllm reads and reports as ignored
//! (its Scaler places by estimated start time; it migrates streams only off a lost or
//! draining instance, and has no per-model scheduler weights). Errors name the field; in strict mode an unknown field is an error,
//! otherwise a warning.
//!
//! ServerlessLLM's CLI never sends a file alone: it deep-merges the file over its own
//! `default_config.json` and then sets `backend_config.pretrained_model_name_or_path` to
//! `--model`. [`merge_over_defaults`] does the same, so a file deploys with the values it
//! would get there.

use serde_json::{Map, Value, json};
use sllm_api::v1 as pb;

const TOP: &[&str] = &[
    "model",
    "backend",
    "num_gpus",
    "auto_scaling_config",
    "backend_config",
    "enable_lora",
    "lora_adapters",
    "placement_config",
    "router_config",
    "scheduler_config",
];
const SCALING: &[&str] = &["metric", "target", "min_instances", "max_instances", "keep_alive"];

/// What each section sllm has no behaviour for means there, and why it is ignored.
const IGNORED: &[(&str, &str)] = &[
    (
        "placement_config",
        "sllm places each instance on the worker with the lowest estimated start time among \
         those that run the backend; it does not pin models to nodes or storage pools",
    ),
    (
        "router_config",
        "sllm moves a stream only off a lost or draining instance (Dispatch's \
         --max-migrations), never to start a model where its checkpoint is local",
    ),
    (
        "scheduler_config",
        "sllm's placement weighs checkpoint tier and measured load bandwidth itself",
    ),
];

/// ServerlessLLM's `sllm/cli/default_config.json`: what its CLI merges a deploy file over.
pub fn serverlessllm_defaults() -> Value {
    json!({
        "model": "",
        "backend": "vllm",
        "num_gpus": 1,
        "auto_scaling_config": {
            "metric": "concurrency",
            "target": 1,
            "min_instances": 0,
            "max_instances": 10,
            "keep_alive": 0
        },
        "backend_config": {
            "pretrained_model_name_or_path": "",
            "device_map": "auto",
            "torch_dtype": "float16",
            "hf_model_class": "AutoModelForCausalLM"
        }
    })
}

/// Merges `updates` into `original` as ServerlessLLM's CLI does: objects merge key by key,
/// anything else replaces.
pub fn deep_update(original: &mut Value, updates: &Value) {
    let (Value::Object(o), Value::Object(u)) = (&mut *original, updates) else {
        *original = updates.clone();
        return;
    };
    for (k, v) in u {
        match o.get_mut(k) {
            Some(existing) if existing.is_object() && v.is_object() => deep_update(existing, v),
            _ => {
                o.insert(k.clone(), v.clone());
            }
        }
    }
}

/// A deploy document as ServerlessLLM's CLI would send it: `file` (if any) merged over its
/// defaults, then `model` (if any) as both the name and the checkpoint. A `file` that is not a
/// JSON object is returned as it is, for [`from_json`] to refuse.
pub fn merge_over_defaults(file: Option<&Value>, model: Option<&str>) -> Value {
    let mut out = serverlessllm_defaults();
    if let Some(file) = file {
        if !file.is_object() {
            return file.clone();
        }
        deep_update(&mut out, file);
    }
    if let (Some(model), Some(obj)) = (model, out.as_object_mut()) {
        obj.insert("model".into(), Value::String(model.to_string()));
        // A backend_config that is not an object stays as it is, for from_json to refuse.
        if let Some(bc) = obj.get_mut("backend_config").and_then(Value::as_object_mut) {
            bc.insert("pretrained_model_name_or_path".into(), Value::String(model.to_string()));
        }
    }
    out
}

/// A parsed config file, and the warnings it gave.
#[derive(Debug, PartialEq)]
pub struct Parsed {
    /// The spec (model may be empty if the file leaves it to the command line).
    pub spec: pb::DeploymentSpec,
    /// Unknown fields (non-strict mode) and sections sllm ignores, each saying what is ignored.
    pub warnings: Vec<String>,
}

fn int(v: &Value, field: &str) -> Result<i32, String> {
    match v.as_i64() {
        Some(n) if i32::try_from(n).is_ok() => Ok(n as i32),
        // ServerlessLLM writes whole numbers as floats at times (e.g. "target": 1.0).
        None if v.as_f64().is_some_and(|f| f.fract() == 0.0 && f.abs() < i32::MAX as f64) => {
            Ok(v.as_f64().unwrap_or_default() as i32)
        }
        _ => Err(format!("{field}: expected an integer, got {v}")),
    }
}

/// Parses the text of a deploy JSON file, as it is (no defaults merged in).
pub fn parse(text: &str, strict: bool) -> Result<Parsed, String> {
    let root: Value = serde_json::from_str(text).map_err(|e| format!("not valid JSON: {e}"))?;
    from_json(&root, strict)
}

/// Parses a deploy file's text merged over ServerlessLLM's defaults, with `model` (if any)
/// set as its CLI's `--model` sets it.
pub fn parse_over_defaults(
    text: Option<&str>,
    model: Option<&str>,
    strict: bool,
) -> Result<Parsed, String> {
    let file = match text {
        Some(t) => {
            Some(serde_json::from_str::<Value>(t).map_err(|e| format!("not valid JSON: {e}"))?)
        }
        None => None,
    };
    from_json(&merge_over_defaults(file.as_ref(), model), strict)
}

/// Reads a deploy document (a file's JSON, or the body of ServerlessLLM's `POST /register`).
pub fn from_json(root: &Value, strict: bool) -> Result<Parsed, String> {
    let obj = root.as_object().ok_or("the file must hold a JSON object")?;
    let mut warnings = Vec::new();
    let unknown = |path: String, warnings: &mut Vec<String>| -> Result<(), String> {
        if strict {
            Err(format!("{path}: unknown field (strict mode)"))
        } else {
            warnings.push(format!("{path}: unknown field, ignored"));
            Ok(())
        }
    };
    for k in obj.keys() {
        if !TOP.contains(&k.as_str()) {
            unknown(k.clone(), &mut warnings)?;
        }
    }
    let mut spec = pb::DeploymentSpec::default();
    if let Some(v) = obj.get("model") {
        spec.model = v.as_str().ok_or(format!("model: expected a string, got {v}"))?.to_string();
    }
    if let Some(v) = obj.get("backend") {
        spec.backend =
            v.as_str().ok_or(format!("backend: expected a string, got {v}"))?.to_string();
    }
    spec.num_gpus = match obj.get("num_gpus") {
        Some(v) => int(v, "num_gpus")?,
        None => 1,
    };
    if let Some(v) = obj.get("auto_scaling_config") {
        let a = v.as_object().ok_or(format!("auto_scaling_config: expected an object, got {v}"))?;
        for k in a.keys() {
            if !SCALING.contains(&k.as_str()) {
                unknown(format!("auto_scaling_config.{k}"), &mut warnings)?;
            }
        }
        let mut c = pb::AutoScalingConfig {
            metric: "concurrency".into(),
            target: 1.0,
            min_instances: 0,
            max_instances: 1,
            keep_alive: 0,
        };
        if let Some(v) = a.get("metric") {
            c.metric = v
                .as_str()
                .ok_or(format!("auto_scaling_config.metric: expected a string, got {v}"))?
                .to_string();
        }
        if let Some(v) = a.get("target") {
            c.target = v
                .as_f64()
                .ok_or(format!("auto_scaling_config.target: expected a number, got {v}"))?;
        }
        if let Some(v) = a.get("min_instances") {
            c.min_instances = int(v, "auto_scaling_config.min_instances")?;
        }
        if let Some(v) = a.get("max_instances") {
            c.max_instances = int(v, "auto_scaling_config.max_instances")?;
        }
        if let Some(v) = a.get("keep_alive") {
            c.keep_alive = int(v, "auto_scaling_config.keep_alive")?;
        }
        spec.auto_scaling_config = Some(c);
    }
    let mut backend_config = match obj.get("backend_config") {
        Some(Value::Object(m)) => Some(m.clone()),
        Some(Value::Null) | None => None,
        Some(v) => return Err(format!("backend_config: expected an object, got {v}")),
    };
    // LoRA settings belong in backend_config (where ServerlessLLM's CLI puts them); written at
    // the top of a file they mean the same.
    for key in ["enable_lora", "lora_adapters"] {
        if let Some(v) = obj.get(key) {
            let bc = backend_config.get_or_insert_with(Map::new);
            if bc.get(key).is_some_and(|inner| inner != v) {
                return Err(format!(
                    "{key}: given both at the top and in backend_config, with different values"
                ));
            }
            bc.insert(key.to_string(), v.clone());
        }
    }
    if let Some(bc) = &backend_config {
        lora_warnings(bc, &mut warnings)?;
        spec.backend_config = Some(crate::convert::json_to_struct(&Value::Object(bc.clone())));
    }
    for (section, why) in IGNORED {
        match obj.get(*section) {
            None | Some(Value::Null) => {}
            Some(Value::Object(m)) if m.is_empty() => {}
            Some(Value::Object(m)) => {
                let keys: Vec<&str> = m.keys().map(String::as_str).collect();
                warnings.push(format!("{section} ({}): ignored: {why}", keys.join(", ")));
            }
            Some(v) => return Err(format!("{section}: expected an object, got {v}")),
        }
    }
    Ok(Parsed { spec, warnings })
}

/// Checks `enable_lora` and `lora_adapters` (the registry checks them again, naming the key)
/// and warns where ServerlessLLM would have behaved differently.
fn lora_warnings(bc: &Map<String, Value>, warnings: &mut Vec<String>) -> Result<(), String> {
    let enable = match bc.get("enable_lora") {
        None | Some(Value::Null) => None,
        Some(Value::Bool(b)) => Some(*b),
        Some(v) => {
            return Err(format!("backend_config.enable_lora: expected true or false, got {v}"));
        }
    };
    let adapters = sllm_api::backend_config::lora_adapters(bc).map_err(|e| e.to_string())?;
    if enable == Some(false) && !adapters.is_empty() {
        warnings.push(format!(
            "backend_config.enable_lora is false but lora_adapters names {} adapter(s): sllm \
             serves them (LoRA is on whenever adapters are given)",
            adapters.len()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// ServerlessLLM's own default_config.json shape.
    const SLLM_DEFAULT: &str = r#"{
        "model": "facebook/opt-1.3b",
        "backend": "transformers",
        "num_gpus": 1,
        "auto_scaling_config": {
            "metric": "concurrency",
            "target": 1,
            "min_instances": 0,
            "max_instances": 10,
            "keep_alive": 0
        },
        "backend_config": {
            "pretrained_model_name_or_path": "facebook/opt-1.3b",
            "device_map": "auto",
            "torch_dtype": "float16",
            "hf_model_class": "AutoModelForCausalLM"
        }
    }"#;

    #[test]
    fn serverlessllm_files_parse_unchanged() {
        let p = parse(SLLM_DEFAULT, true).expect("parses");
        assert!(p.warnings.is_empty());
        assert_eq!(p.spec.model, "facebook/opt-1.3b");
        assert_eq!(p.spec.backend, "transformers");
        let a = p.spec.auto_scaling_config.expect("present");
        assert_eq!((a.max_instances, a.target), (10, 1.0));
        let bc = crate::convert::struct_to_json(&p.spec.backend_config.expect("present"));
        assert_eq!(bc["torch_dtype"], "float16");
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (r#"{"num_gpus": "two"}"#, "num_gpus"),
            (
                r#"{"auto_scaling_config": {"max_instances": "ten"}}"#,
                "auto_scaling_config.max_instances",
            ),
            (r#"{"auto_scaling_config": {"target": "high"}}"#, "auto_scaling_config.target"),
            (r#"{"backend_config": [1]}"#, "backend_config"),
            (r#"{"model": 7}"#, "model"),
            (r#"[1, 2]"#, "JSON object"),
            (r#"{"model": "#, "not valid JSON"),
        ];
        for (text, field) in cases {
            let err = parse(text, false).expect_err(text);
            assert!(err.contains(field), "{err}");
        }
    }

    #[test]
    fn unknown_fields_warn_or_fail_in_strict_mode() {
        let text = r#"{"model": "m", "backend": "sim", "colour": "blue", "auto_scaling_config": {"speed": 1}}"#;
        let p = parse(text, false).expect("lenient");
        assert_eq!(p.warnings.len(), 2);
        let err = parse(text, true).expect_err("strict");
        assert!(err.contains("colour") && err.contains("strict"), "{err}");
    }

    /// ServerlessLLM's live-migration example, as it is in its repository.
    const SLLM_MIGRATION_EXAMPLE: &str = r#"{
        "model": "Qwen/Qwen2.5-3B-Instruct",
        "backend": "transformers",
        "num_gpus": 1,
        "auto_scaling_config": {"metric": "concurrency", "target": 1, "min_instances": 0, "max_instances": 10},
        "router_config": {"migration_delta": 20},
        "placement_config": {"local_disk": ["0", "1"], "memory_pool": ["0", "1"]},
        "backend_config": {"pretrained_model_name_or_path": "Qwen/Qwen2.5-3B-Instruct", "device_map": "auto", "torch_dtype": "float16"},
        "scheduler_config": {"alpha": 0.01, "beta": 0.1}
    }"#;

    #[test]
    fn files_merge_over_serverlessllm_defaults_as_its_cli_merges_them() {
        let p = parse_over_defaults(Some(SLLM_MIGRATION_EXAMPLE), None, true).expect("parses");
        let a = p.spec.auto_scaling_config.expect("present");
        assert_eq!((a.max_instances, a.keep_alive, a.metric.as_str()), (10, 0, "concurrency"));
        let bc = crate::convert::struct_to_json(&p.spec.backend_config.expect("present"));
        // hf_model_class comes from the defaults; the rest from the file.
        assert_eq!(bc["hf_model_class"], "AutoModelForCausalLM");
        assert_eq!(bc["pretrained_model_name_or_path"], "Qwen/Qwen2.5-3B-Instruct");
        // Every ignored section is reported, with its keys and why.
        assert_eq!(p.warnings.len(), 3, "{:?}", p.warnings);
        assert!(
            p.warnings
                .iter()
                .any(|w| w.contains("placement_config (local_disk, memory_pool): ignored"))
        );
        assert!(
            p.warnings
                .iter()
                .any(|w| w.contains("router_config (migration_delta)") && w.contains("migration"))
        );
        assert!(p.warnings.iter().any(|w| w.starts_with("scheduler_config (alpha, beta)")));

        // --model alone: the defaults, the name as the checkpoint.
        let p = parse_over_defaults(None, Some("facebook/opt-125m"), true).expect("parses");
        assert_eq!((p.spec.model.as_str(), p.spec.backend.as_str()), ("facebook/opt-125m", "vllm"));
        let bc = crate::convert::struct_to_json(&p.spec.backend_config.expect("present"));
        assert_eq!(bc["pretrained_model_name_or_path"], "facebook/opt-125m");
        assert_eq!(bc["torch_dtype"], "float16");
    }

    #[test]
    fn lora_settings_are_read_and_checked() {
        let p = parse(
            r#"{"model": "m", "backend": "vllm", "enable_lora": true,
                "lora_adapters": {"sql": "/loras/sql"}}"#,
            true,
        )
        .expect("top-level LoRA fields");
        let bc = crate::convert::struct_to_json(&p.spec.backend_config.expect("present"));
        assert_eq!(bc["lora_adapters"]["sql"], "/loras/sql");
        assert_eq!(bc["enable_lora"], true);
        let p = parse(
            r#"{"model": "m", "backend_config": {"enable_lora": false, "lora_adapters": {"a": "/a"}}}"#,
            true,
        )
        .expect("parses");
        assert!(p.warnings[0].contains("enable_lora is false"), "{:?}", p.warnings);
        for (text, words) in [
            (r#"{"backend_config": {"enable_lora": "yes"}}"#, "backend_config.enable_lora"),
            (r#"{"backend_config": {"lora_adapters": ["a"]}}"#, "backend_config.lora_adapters"),
            (
                r#"{"backend_config": {"lora_adapters": {"a": 3}}}"#,
                "backend_config.lora_adapters.a",
            ),
            (
                r#"{"backend_config": {"lora_adapters": {"a b": "/p"}}}"#,
                "backend_config.lora_adapters.a b",
            ),
            (r#"{"router_config": 3}"#, "router_config"),
            (
                r#"{"lora_adapters": {"a": "/x"}, "backend_config": {"lora_adapters": {"a": "/y"}}}"#,
                "lora_adapters: given both",
            ),
        ] {
            let err = parse(text, false).expect_err(text);
            assert!(err.contains(words), "{err}");
        }
    }
}
