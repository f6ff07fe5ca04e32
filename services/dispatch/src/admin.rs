//! ServerlessLLM's HTTP admin API on the OpenAI port, so its CLI (`sllm deploy`, `sllm delete`,
//! `sllm status` with `LLM_SERVER_URL` pointed here) and scripts work against sllm unchanged:
//! `POST /register` (a deploy JSON), `POST /update` (a new `auto_scaling_config`, LoRA
//! adapters to add), `POST /delete` (a model, or only its `lora_adapters`). `GET /v1/models`
//! answers in both OpenAI's shape and the one its CLI reads (see `openai.rs`).
//!
//! The routes need the admin scope. They run the ModelRegistry's own code in this process over
//! kvstore (never a call to another service), so a deployment is checked and stored exactly as
//! a gRPC Deploy stores it. Answers are FastAPI's: `{"status": …}` on success, `{"detail": …}`
//! with the matching HTTP status on failure; `warnings` lists what was read but not applied.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use model_registry::Registry;
use serde_json::{Value, json};
use service::deploy_config;
use sllm_api::v1 as pb;
use sllm_api::v1::model_registry_server::ModelRegistry;
use tonic::Code;

use crate::Dispatch;

/// A refusal in FastAPI's shape.
fn detail(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "detail": message.into() }))).into_response()
}

/// A ModelRegistry refusal as an HTTP answer.
fn refused(s: &tonic::Status) -> Response {
    let status = match s.code() {
        Code::InvalidArgument | Code::OutOfRange => StatusCode::BAD_REQUEST,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted | Code::FailedPrecondition => StatusCode::CONFLICT,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    detail(status, s.message())
}

/// The body as a JSON object; Err: what is wrong with it (a 400).
fn body_object(raw: &str) -> Result<serde_json::Map<String, Value>, String> {
    match serde_json::from_str::<Value>(raw) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err("body: must be a JSON object".into()),
        Err(e) => Err(format!("body: not JSON: {e}")),
    }
}

/// The body's `model`; Err: what is wrong with it (a 400).
fn model_of(body: &serde_json::Map<String, Value>) -> Result<String, String> {
    match body.get("model") {
        Some(Value::String(m)) if !m.is_empty() => Ok(m.clone()),
        None | Some(Value::Null) => Err("model: is required".into()),
        Some(v) => Err(format!("model: expected a string, got {v}")),
    }
}

/// Waits (at most two seconds) until this replica's listing shows a write's effect (`shown`),
/// so that a client reading right after it (ServerlessLLM's CLI lists models next) sees it.
/// The write is done either way; the table follows from the event stream.
async fn settle(d: &Dispatch, shown: impl Fn(&[String]) -> bool) {
    for _ in 0..200 {
        let ids: Vec<String> = d.listing().into_iter().map(|m| m.id).collect();
        if shown(&ids) {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

fn registry(d: &Dispatch) -> Registry {
    Registry::new(d.inner.store.clone())
}

/// `POST /register`: deploys a ServerlessLLM deploy JSON as it is (its CLI has merged it over
/// its defaults already). For a model already deployed, as there, the adapters in
/// `backend_config.lora_adapters` are added to it; with none, the answer is 409.
pub(crate) async fn register(State(d): State<Dispatch>, raw: String) -> Response {
    let body = match body_object(&raw) {
        Ok(b) => b,
        Err(m) => return detail(StatusCode::BAD_REQUEST, m),
    };
    let parsed = match deploy_config::from_json(&Value::Object(body), false) {
        Ok(p) => p,
        Err(e) => return detail(StatusCode::BAD_REQUEST, e),
    };
    let mut warnings = parsed.warnings;
    let spec = parsed.spec;
    let registry = registry(&d);
    let deployed =
        registry.deploy(tonic::Request::new(pb::DeployRequest { spec: Some(spec.clone()) })).await;
    match deployed {
        Ok(r) => {
            warnings.extend(r.into_inner().warnings);
            tracing::info!(model = %spec.model, "registered through the ServerlessLLM API");
            settle(&d, |ids| ids.contains(&spec.model)).await;
            Json(json!({ "status": "ok", "warnings": warnings })).into_response()
        }
        Err(s) if s.code() == Code::AlreadyExists => {
            let adapters = spec
                .backend_config
                .as_ref()
                .map(service::convert::struct_to_json)
                .and_then(|bc| bc.get("lora_adapters").and_then(Value::as_object).cloned())
                .unwrap_or_default();
            if adapters.is_empty() {
                return refused(&s);
            }
            let add = adapters
                .iter()
                .filter_map(|(k, v)| v.as_str().map(|p| (k.clone(), p.to_string())))
                .collect();
            let req = pb::UpdateRequest {
                model: spec.model.clone(),
                add_lora_adapters: add,
                ..Default::default()
            };
            match registry.update(tonic::Request::new(req)).await {
                Ok(_) => {
                    let wanted: Vec<String> =
                        adapters.keys().map(|a| format!("{}:{a}", spec.model)).collect();
                    settle(&d, |ids| wanted.iter().all(|w| ids.contains(w))).await;
                    warnings.push(format!(
                        "model {:?} was already deployed: only its LoRA adapters ({}) were \
                         added; its other fields are unchanged (POST /update changes \
                         auto_scaling_config)",
                        spec.model,
                        adapters.keys().cloned().collect::<Vec<_>>().join(", ")
                    ));
                    Json(json!({ "status": "ok", "warnings": warnings })).into_response()
                }
                Err(s) => refused(&s),
            }
        }
        Err(s) => refused(&s),
    }
}

/// Top-level fields `/update` reads; others are reported as not changed.
const UPDATABLE: &[&str] = &["model", "auto_scaling_config", "backend_config"];

/// `POST /update`: the given `auto_scaling_config` keys over the stored policy, and the
/// adapters of `backend_config.lora_adapters` added. Everything else a live deployment keeps;
/// each such field is named in `warnings`.
pub(crate) async fn update(State(d): State<Dispatch>, raw: String) -> Response {
    let body = match body_object(&raw) {
        Ok(b) => b,
        Err(m) => return detail(StatusCode::BAD_REQUEST, m),
    };
    let model = match model_of(&body) {
        Ok(m) => m,
        Err(m) => return detail(StatusCode::BAD_REQUEST, m),
    };
    let registry = registry(&d);
    let current =
        match registry.get(tonic::Request::new(pb::GetRequest { model: model.clone() })).await {
            Ok(c) => c.into_inner(),
            Err(s) => return refused(&s),
        };
    let mut warnings: Vec<String> = body
        .keys()
        .filter(|k| !UPDATABLE.contains(&k.as_str()))
        .map(|k| {
            format!(
                "{k}: not changed: a live deployment changes only auto_scaling_config and its \
                 LoRA adapters (delete and register it again to change the rest)"
            )
        })
        .collect();
    let mut req = pb::UpdateRequest { model: model.clone(), ..Default::default() };
    if let Some(given) = body.get("auto_scaling_config").filter(|v| !v.is_null()) {
        let Some(given) = given.as_object() else {
            return detail(
                StatusCode::BAD_REQUEST,
                format!("auto_scaling_config: expected an object, got {given}"),
            );
        };
        let a = current.spec.clone().unwrap_or_default().auto_scaling_config.unwrap_or_default();
        let mut merged = json!({
            "metric": a.metric, "target": a.target, "min_instances": a.min_instances,
            "max_instances": a.max_instances, "keep_alive": a.keep_alive,
        });
        deploy_config::deep_update(&mut merged, &Value::Object(given.clone()));
        let doc = json!({ "model": model, "auto_scaling_config": merged });
        match deploy_config::from_json(&doc, false) {
            Ok(p) => {
                warnings.extend(p.warnings);
                req.auto_scaling_config = p.spec.auto_scaling_config;
            }
            Err(e) => return detail(StatusCode::BAD_REQUEST, e),
        }
    }
    if let Some(bc) = body.get("backend_config").filter(|v| !v.is_null()) {
        let Some(bc) = bc.as_object() else {
            return detail(
                StatusCode::BAD_REQUEST,
                format!("backend_config: expected an object, got {bc}"),
            );
        };
        match sllm_api::backend_config::lora_adapters(bc) {
            Ok(adapters) => {
                req.add_lora_adapters = adapters.into_iter().map(|a| (a.name, a.path)).collect()
            }
            Err(e) => return detail(StatusCode::BAD_REQUEST, e.to_string()),
        }
        for k in bc.keys().filter(|k| !["lora_adapters", "enable_lora"].contains(&k.as_str())) {
            warnings.push(format!(
                "backend_config.{k}: not changed: a running engine keeps the settings it was \
                 started with"
            ));
        }
    }
    if req.auto_scaling_config.is_none() && req.add_lora_adapters.is_empty() {
        return detail(
            StatusCode::BAD_REQUEST,
            "auto_scaling_config: is required (or backend_config.lora_adapters to add)",
        );
    }
    req.expected_version = current.version;
    let added: Vec<String> = req.add_lora_adapters.keys().map(|a| format!("{model}:{a}")).collect();
    match registry.update(tonic::Request::new(req)).await {
        Ok(_) => {
            settle(&d, |ids| added.iter().all(|a| ids.contains(a))).await;
            Json(json!({ "status": format!("updated model {model}"), "warnings": warnings }))
                .into_response()
        }
        Err(s) => refused(&s),
    }
}

/// `POST /delete`: deletes the model, or with `lora_adapters` (names, or a name → path object
/// as ServerlessLLM's CLI may send) removes only those adapters.
pub(crate) async fn delete(State(d): State<Dispatch>, raw: String) -> Response {
    let body = match body_object(&raw) {
        Ok(b) => b,
        Err(m) => return detail(StatusCode::BAD_REQUEST, m),
    };
    let model = match model_of(&body) {
        Ok(m) => m,
        Err(m) => return detail(StatusCode::BAD_REQUEST, m),
    };
    let adapters: Option<Vec<String>> = match body.get("lora_adapters") {
        None | Some(Value::Null) => None,
        Some(Value::Object(m)) => Some(m.keys().cloned().collect()),
        Some(Value::String(s)) => Some(vec![s.clone()]),
        Some(Value::Array(items)) => {
            let mut names = Vec::with_capacity(items.len());
            for (i, item) in items.iter().enumerate() {
                match item.as_str() {
                    Some(n) => names.push(n.to_string()),
                    None => {
                        return detail(
                            StatusCode::BAD_REQUEST,
                            format!("lora_adapters[{i}]: expected an adapter name, got {item}"),
                        );
                    }
                }
            }
            Some(names)
        }
        Some(v) => {
            return detail(
                StatusCode::BAD_REQUEST,
                format!("lora_adapters: expected a list of adapter names, got {v}"),
            );
        }
    };
    if adapters.as_ref().is_some_and(Vec::is_empty) {
        return detail(
            StatusCode::BAD_REQUEST,
            "lora_adapters: is empty; name the adapters to remove, or leave it out to delete \
             the model",
        );
    }
    let req = pb::DeleteRequest {
        model: model.clone(),
        lora_adapters: adapters.clone().unwrap_or_default(),
    };
    match registry(&d).delete(tonic::Request::new(req)).await {
        Ok(_) => {
            let gone: Vec<String> = match &adapters {
                Some(a) => a.iter().map(|a| format!("{model}:{a}")).collect(),
                None => vec![model.clone()],
            };
            settle(&d, |ids| !gone.iter().any(|g| ids.contains(g))).await;
            let status = match adapters {
                Some(a) => format!("deleted LoRA adapters {} of model {model}", a.join(", ")),
                None => format!("deleted model {model}"),
            };
            Json(json!({ "status": status })).into_response()
        }
        Err(s) => refused(&s),
    }
}
