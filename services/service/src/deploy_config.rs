//! ServerlessLLM deploy JSON files, accepted as they are: `model`, `backend`, `num_gpus`,
//! `auto_scaling_config` {metric, target, min_instances, max_instances, keep_alive} and
//! `backend_config`. Errors name the field; in strict mode an unknown field is an error, otherwise
//! a warning.

use serde_json::Value;
use sllm_api::v1 as pb;

const TOP: &[&str] = &["model", "backend", "num_gpus", "auto_scaling_config", "backend_config"];
const SCALING: &[&str] = &["metric", "target", "min_instances", "max_instances", "keep_alive"];

/// A parsed config file, and the warnings it gave.
#[derive(Debug, PartialEq)]
pub struct Parsed {
    /// The spec (model may be empty if the file leaves it to the command line).
    pub spec: pb::DeploymentSpec,
    /// Unknown fields ignored (non-strict mode).
    pub warnings: Vec<String>,
}

fn int(v: &Value, field: &str) -> Result<i32, String> {
    match v.as_i64() {
        Some(n) if i32::try_from(n).is_ok() => Ok(n as i32),
        _ => Err(format!("{field}: expected an integer, got {v}")),
    }
}

/// Parses the text of a deploy JSON file.
pub fn parse(text: &str, strict: bool) -> Result<Parsed, String> {
    let root: Value = serde_json::from_str(text).map_err(|e| format!("not valid JSON: {e}"))?;
    let obj = root.as_object().ok_or("the file must hold a JSON object")?;
    let mut warnings = Vec::new();
    let mut unknown = |path: String| -> Result<(), String> {
        if strict {
            Err(format!("{path}: unknown field (strict mode)"))
        } else {
            warnings.push(format!("{path}: unknown field, ignored"));
            Ok(())
        }
    };
    for k in obj.keys() {
        if !TOP.contains(&k.as_str()) {
            unknown(k.clone())?;
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
                unknown(format!("auto_scaling_config.{k}"))?;
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
    if let Some(v) = obj.get("backend_config") {
        if !v.is_object() {
            return Err(format!("backend_config: expected an object, got {v}"));
        }
        spec.backend_config = Some(crate::convert::json_to_struct(v));
    }
    Ok(Parsed { spec, warnings })
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
}
