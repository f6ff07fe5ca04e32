//! The OTLP span exporter, built by `opentelemetry-otlp` from the standard `OTEL_EXPORTER_OTLP_*`
//! variables, and counted into sllm's trace metrics.
//!
//! What sllm adds to the SDK, and why:
//! - the transport: gRPC unless `OTEL_EXPORTER_OTLP_(TRACES_)PROTOCOL` says `http/protobuf`
//!   (sllm has always spoken gRPC to port 4317; the SDK alone would pick HTTP);
//! - TLS for an `https://` gRPC endpoint: the platform's and webpki roots, and the PEM files of
//!   `OTEL_EXPORTER_OTLP_(TRACES_)CERTIFICATE`, `…_CLIENT_CERTIFICATE` and `…_CLIENT_KEY`, which
//!   the SDK does not read;
//! - counting: spans exported, and spans lost to failed exports.

use std::time::Duration;

use opentelemetry_otlp::{WithExportConfig, WithTonicConfig};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SpanData, SpanExporter};

/// The first of the signal-specific and generic forms of an `OTEL_EXPORTER_OTLP_*` variable.
fn otlp_var(name: &str) -> Option<String> {
    [format!("OTEL_EXPORTER_OTLP_TRACES_{name}"), format!("OTEL_EXPORTER_OTLP_{name}")]
        .iter()
        .find_map(|k| std::env::var(k).ok())
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

/// Whether traces are to be exported: an endpoint is set (or `OTEL_TRACES_EXPORTER=otlp`), and
/// neither `OTEL_SDK_DISABLED=true` nor `OTEL_TRACES_EXPORTER=none` says otherwise.
pub(crate) fn wanted() -> bool {
    let disabled =
        std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.trim().eq_ignore_ascii_case("true"));
    let exporter = std::env::var("OTEL_TRACES_EXPORTER").unwrap_or_default();
    let exporter = exporter.trim();
    if disabled || exporter.eq_ignore_ascii_case("none") {
        return false;
    }
    otlp_var("ENDPOINT").is_some() || exporter.eq_ignore_ascii_case("otlp")
}

fn tls() -> Result<tonic::transport::ClientTlsConfig, String> {
    let mut tls = tonic::transport::ClientTlsConfig::new().with_enabled_roots();
    let read = |var: &str| -> Result<Option<Vec<u8>>, String> {
        match otlp_var(var) {
            None => Ok(None),
            Some(path) => std::fs::read(&path)
                .map(Some)
                .map_err(|e| format!("OTEL_EXPORTER_OTLP_{var}: cannot read {path}: {e}")),
        }
    };
    if let Some(ca) = read("CERTIFICATE")? {
        tls = tls.ca_certificate(tonic::transport::Certificate::from_pem(ca));
    }
    match (read("CLIENT_CERTIFICATE")?, read("CLIENT_KEY")?) {
        (Some(cert), Some(key)) => {
            tls = tls.identity(tonic::transport::Identity::from_pem(cert, key))
        }
        (None, None) => {}
        _ => {
            return Err("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE and OTEL_EXPORTER_OTLP_CLIENT_KEY \
                        go together"
                .into());
        }
    }
    Ok(tls)
}

/// The exporter the environment asks for; the protocol it speaks.
pub(crate) fn build() -> Result<(Counted<opentelemetry_otlp::SpanExporter>, &'static str), String> {
    let protocol = otlp_var("PROTOCOL").unwrap_or_else(|| "grpc".into());
    let (exporter, protocol) = if protocol.to_ascii_lowercase().starts_with("http/") {
        // The SDK reads the protocol (http/protobuf; http/json is not built in), endpoint,
        // headers, timeout and compression.
        (opentelemetry_otlp::SpanExporter::builder().with_http().build(), "http/protobuf")
    } else {
        let mut builder = opentelemetry_otlp::SpanExporter::builder().with_tonic();
        if otlp_var("ENDPOINT").is_some_and(|e| e.to_ascii_lowercase().starts_with("https://")) {
            builder = builder.with_tls_config(tls()?);
        }
        if otlp_var("ENDPOINT").is_none() {
            builder = builder.with_endpoint("http://localhost:4317");
        }
        (builder.build(), "grpc")
    };
    let exporter = exporter.map_err(|e| e.to_string())?;
    Ok((Counted(exporter), protocol))
}

/// An exporter that counts what it exports into `sllm_trace_spans_exported_total`, and what
/// fails into `sllm_trace_export_failures_total` and `sllm_trace_spans_dropped_total`.
#[derive(Debug)]
pub(crate) struct Counted<E>(pub E);

impl<E: SpanExporter> SpanExporter for Counted<E> {
    fn export(&self, batch: Vec<SpanData>) -> impl Future<Output = OTelSdkResult> + Send {
        let n = batch.len() as u64;
        let export = self.0.export(batch);
        async move {
            let result = export.await;
            let m = &crate::metrics::TRACES;
            match &result {
                Ok(()) => m.exported.inc_by(n),
                Err(_) => {
                    m.export_failures.inc();
                    m.dropped.inc_by(n);
                }
            }
            result
        }
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.0.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.0.force_flush()
    }

    fn set_resource(&mut self, resource: &opentelemetry_sdk::Resource) {
        self.0.set_resource(resource);
    }
}
