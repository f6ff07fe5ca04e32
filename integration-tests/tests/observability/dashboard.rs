//! The Grafana dashboard (`deploy/grafana/sllm-dashboard.json`) against a running cluster: after
//! a cold start and a few requests, every metric its queries name is on some process's
//! `/metrics`, with the labels they select and group by; and it has a panel for each view an
//! operator looks for.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde_json::Value;
use sllm_integration_tests::{OtlpReceiver, eventually};

use crate::{deploy_cold, generate, mesh, scrape};

const DASHBOARD: &str =
    concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/grafana/sllm-dashboard.json");

/// The views the dashboard must have, each a part of some panel's title (lower case).
const VIEWS: &[&str] = &[
    "requests/s",
    "error ratio",
    "time to first token",
    "request duration",
    "cold starts per minute",
    "cold-start stage",
    "queue depth",
    "queue wait",
    "instances by state",
    "desired vs actual",
    "workers",
    "lease losses",
    "retries",
    "tokens/s",
    "redis command latency",
    "redis errors",
    "trace spans",
];

/// Labels Prometheus adds to every series when it scrapes: never on `/metrics` itself.
const TARGET_LABELS: &[&str] = &["instance", "job"];

/// What one PromQL expression refers to.
#[derive(Default, Debug)]
struct Refs {
    /// Metric names (`sllm_…`), as written (histograms with their `_bucket`/`_sum`/`_count`).
    metrics: BTreeSet<String>,
    /// (metric, label) for every label matcher of a selector.
    matched: BTreeSet<(String, String)>,
    /// Labels of `by (…)` and `without (…)`.
    grouped: BTreeSet<String>,
}

fn is_ident_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_' || c == ':'
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

/// A small PromQL tokenizer: identifiers outside string literals; an `sllm_` identifier is a
/// metric, followed perhaps by `{label op "value", …}`; `by`/`without` by `(label, …)`.
fn refs(expr: &str) -> Refs {
    let chars: Vec<char> = expr.chars().collect();
    let mut out = Refs::default();
    let mut i = 0;
    let skip_string = |i: &mut usize| {
        let quote = chars[*i];
        *i += 1;
        while *i < chars.len() && chars[*i] != quote {
            if chars[*i] == '\\' {
                *i += 1;
            }
            *i += 1;
        }
        *i += 1;
    };
    let ident = |i: &mut usize| -> String {
        let start = *i;
        while *i < chars.len() && is_ident(chars[*i]) {
            *i += 1;
        }
        chars[start..*i].iter().collect()
    };
    let skip_space = |i: &mut usize| {
        while *i < chars.len() && chars[*i].is_whitespace() {
            *i += 1;
        }
    };
    while i < chars.len() {
        let c = chars[i];
        if c == '"' || c == '\'' {
            skip_string(&mut i);
        } else if c == '$' {
            // A Grafana variable ($__rate_interval, $model): not PromQL.
            i += 1;
            ident(&mut i);
        } else if is_ident_start(c) {
            let word = ident(&mut i);
            skip_space(&mut i);
            if word.starts_with("sllm_") {
                out.metrics.insert(word.clone());
                if i < chars.len() && chars[i] == '{' {
                    i += 1;
                    while i < chars.len() && chars[i] != '}' {
                        if is_ident_start(chars[i]) {
                            let label = ident(&mut i);
                            out.matched.insert((word.clone(), label));
                        } else if chars[i] == '"' || chars[i] == '\'' {
                            skip_string(&mut i);
                        } else {
                            i += 1;
                        }
                    }
                }
            } else if (word == "by" || word == "without") && i < chars.len() && chars[i] == '(' {
                i += 1;
                while i < chars.len() && chars[i] != ')' {
                    if is_ident_start(chars[i]) {
                        out.grouped.insert(ident(&mut i));
                    } else {
                        i += 1;
                    }
                }
            }
        } else if c.is_ascii_digit() {
            // A number (0.95, 1e-9), not an identifier.
            while i < chars.len() && (is_ident(chars[i]) || chars[i] == '.') {
                i += 1;
            }
        } else {
            i += 1;
        }
    }
    out
}

/// Every panel, rows' collapsed panels included.
fn panels(dashboard: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    let mut todo: Vec<&Value> =
        dashboard["panels"].as_array().expect("the dashboard has panels").iter().collect();
    while let Some(p) = todo.pop() {
        if let Some(nested) = p["panels"].as_array() {
            todo.extend(nested);
        }
        out.push(p);
    }
    out
}

/// (where, PromQL) of every query: panel targets and template variables.
fn expressions(dashboard: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for p in panels(dashboard) {
        let title = p["title"].as_str().unwrap_or_default().to_string();
        for t in p["targets"].as_array().into_iter().flatten() {
            if let Some(e) = t["expr"].as_str() {
                out.push((format!("panel {title:?}"), e.to_string()));
            }
        }
    }
    for v in dashboard["templating"]["list"].as_array().into_iter().flatten() {
        let name = v["name"].as_str().unwrap_or_default();
        for q in [&v["definition"], &v["query"], &v["query"]["query"]] {
            if let Some(e) = q.as_str().filter(|_| v["type"] == "query") {
                out.push((format!("variable {name:?}"), e.to_string()));
            }
        }
    }
    out
}

/// Series name -> the label names it is exposed with, over every scrape.
fn exposed(
    scrapes: &[std::collections::HashMap<String, f64>],
) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for series in scrapes.iter().flat_map(|s| s.keys()) {
        let (name, labels) = series.split_once('{').unwrap_or((series, "}"));
        let entry = out.entry(name.to_string()).or_default();
        // `a="x",b="y"}`: a label name runs up to its `=`; its value is a quoted string.
        let mut rest = labels;
        while let Some((label, after)) = rest.split_once("=\"") {
            entry.insert(label.trim_start_matches(',').to_string());
            let mut escaped = false;
            let end = after
                .char_indices()
                .find(|&(_, c)| {
                    let closes = c == '"' && !escaped;
                    escaped = c == '\\' && !escaped;
                    closes
                })
                .map_or(after.len(), |(i, _)| i + 1);
            rest = &after[end..];
        }
    }
    out
}

/// What the dashboard refers to that the scrapes do not expose, one line each.
fn missing(
    queries: &[(String, String)],
    exposed: &BTreeMap<String, BTreeSet<String>>,
) -> Vec<String> {
    let mut out = Vec::new();
    for (place, expr) in queries {
        let r = refs(expr);
        for m in &r.metrics {
            if !exposed.contains_key(m) {
                out.push(format!("{place}: metric {m} is on no /metrics"));
            }
        }
        for (m, label) in &r.matched {
            if exposed.get(m).is_some_and(|labels| !labels.contains(label)) {
                out.push(format!("{place}: {m} has no label {label}"));
            }
        }
        for label in &r.grouped {
            let on_some =
                r.metrics.iter().any(|m| exposed.get(m).is_some_and(|l| l.contains(label)));
            if !on_some && !TARGET_LABELS.contains(&label.as_str()) {
                out.push(format!("{place}: groups by {label}, which none of its metrics has"));
            }
        }
    }
    out
}

#[test]
fn the_tokenizer_finds_metrics_matchers_and_groupings() {
    let r = refs(
        r#"histogram_quantile(0.95, sum by (le, stage) (rate(sllm_a_seconds_bucket{model=~"$model", x!="a}b"}[$__rate_interval]))) / on() sum(sllm_b_total) * 1e-9"#,
    );
    assert_eq!(
        r.metrics.iter().map(String::as_str).collect::<Vec<_>>(),
        ["sllm_a_seconds_bucket", "sllm_b_total"]
    );
    assert_eq!(r.matched.iter().map(|(_, l)| l.as_str()).collect::<Vec<_>>(), ["model", "x"]);
    assert_eq!(r.grouped.iter().map(String::as_str).collect::<Vec<_>>(), ["le", "stage"]);
    let scraped = std::collections::HashMap::from([
        (r#"sllm_a_seconds_bucket{model="m",stage="x,\"y\"",le="0.1"}"#.to_string(), 1.0),
        ("sllm_b_total".to_string(), 1.0),
    ]);
    let exposed = exposed(&[scraped]);
    assert_eq!(
        exposed["sllm_a_seconds_bucket"].iter().map(String::as_str).collect::<Vec<_>>(),
        ["le", "model", "stage"]
    );
    let q = |e: &str| vec![("here".to_string(), e.to_string())];
    assert_eq!(
        missing(&q("sum by (model) (sllm_a_seconds_bucket)"), &exposed),
        Vec::<String>::new()
    );
    assert_eq!(missing(&q("sllm_a_seconds_bucket{x=\"1\"}"), &exposed).len(), 1, "unknown label");
    assert_eq!(missing(&q("sum by (tier) (sllm_b_total)"), &exposed).len(), 1, "unknown grouping");
    assert_eq!(
        missing(&q("rate(sllm_a_seconds[5m])"), &exposed).len(),
        1,
        "a histogram's bare name"
    );
}

#[test]
fn the_dashboard_has_every_view_and_every_panel_queries_sllm() {
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(DASHBOARD).unwrap())
        .expect("the dashboard is JSON");
    assert!(dashboard["schemaVersion"].as_u64().unwrap() >= 36);
    let vars: Vec<&Value> = dashboard["templating"]["list"].as_array().unwrap().iter().collect();
    assert!(
        vars.iter().any(|v| v["type"] == "datasource" && v["query"] == "prometheus"),
        "a datasource variable lets it run on any Prometheus datasource"
    );
    let queries = expressions(&dashboard);
    let names: BTreeSet<String> = queries.iter().flat_map(|(_, e)| refs(e).metrics).collect();
    assert!(names.len() >= 15, "only {} distinct sllm metrics: {names:?}", names.len());
    let panels = panels(&dashboard);
    for p in panels.iter().filter(|p| p["type"] != "row") {
        let title = p["title"].as_str().unwrap_or_default();
        let targets = p["targets"].as_array().map(Vec::as_slice).unwrap_or_default();
        assert!(
            targets.iter().any(|t| t["expr"].as_str().is_some_and(|e| e.contains("sllm_"))),
            "panel {title:?} queries no sllm metric"
        );
        assert_eq!(
            p["datasource"]["uid"], "${datasource}",
            "panel {title:?} uses the datasource variable"
        );
    }
    for view in VIEWS {
        assert!(
            panels.iter().any(|p| p["type"] != "row"
                && p["title"].as_str().is_some_and(|t| t.to_lowercase().contains(view))),
            "no panel for {view:?}"
        );
    }
}

#[tokio::test]
async fn every_metric_the_dashboard_queries_is_served_by_a_running_cluster() {
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(DASHBOARD).unwrap()).unwrap();
    let queries = expressions(&dashboard);
    assert!(!queries.is_empty());

    let otlp = OtlpReceiver::start().await.unwrap();
    let m = mesh(&otlp, "grpc").await;
    deploy_cold(&m.grpc).await;
    eventually(Duration::from_secs(10), "the worker attached to Dispatch", || async {
        let control = scrape(&m.control_metrics).await;
        (control.get("sllm_dispatch_attached_workers") == Some(&1.0)).then_some(())
    })
    .await
    .unwrap();

    let cold = generate(&m.grpc, "00-1bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").await;
    assert!(cold.0.queue_us > 0, "the first request waited for a cold start");
    for _ in 0..3 {
        generate(&m.grpc, "00-2bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").await;
    }

    // The stages of that cold start, and everything the dashboard asks for.
    let required = [
        r#"sllm_scaler_cold_starts_total{model="m",tier="disk"}"#,
        r#"sllm_scaler_cold_start_stage_seconds_count{model="m",stage="placing"}"#,
        r#"sllm_scaler_cold_start_stage_seconds_count{model="m",stage="pending"}"#,
        r#"sllm_scaler_cold_start_stage_seconds_count{model="m",stage="loading"}"#,
    ];
    let last = std::cell::RefCell::new(Vec::new());
    let served = eventually(Duration::from_secs(20), "every dashboard metric", || async {
        let control = scrape(&m.control_metrics).await;
        let worker = scrape(&m.worker_metrics).await;
        let mut gaps = missing(&queries, &exposed(&[control.clone(), worker]));
        for series in required {
            if control.get(series).is_none_or(|v| *v < 1.0) {
                gaps.push(format!("series {series} is not at least 1"));
            }
        }
        let done = gaps.is_empty();
        *last.borrow_mut() = gaps;
        done.then_some(control)
    })
    .await;
    let control = match served {
        Ok(c) => c,
        Err(e) => panic!("{e}:\n{}", last.borrow().join("\n")),
    };
    assert_eq!(
        control.get(r#"sllm_scaler_cold_starts_total{model="m",tier="disk"}"#),
        Some(&1.0),
        "one cold start, however many requests"
    );
    assert_eq!(control.get(r#"sllm_registry_workers_lost_total{reason="expired"}"#), Some(&0.0));
    assert_eq!(control.get("sllm_scaler_lease_lost_total"), Some(&0.0));
}
