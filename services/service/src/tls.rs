//! TLS with rustls: the server side of every gRPC and HTTP listener (with optional
//! client-certificate verification), and the client side for workers and the CLI dialling
//! `https://` endpoints. Certificates and keys are PEM files.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// A server's certificate chain and key, and the CA its clients' certificates must chain to
/// (none: clients are not asked for one).
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
    /// PEM CA bundle that client certificates must chain to.
    pub client_ca: Option<PathBuf>,
}

/// The loaded server side: for tonic and for the HTTP listeners.
#[derive(Clone)]
pub struct ServerTls {
    /// For `tonic::transport::Server::tls_config`.
    pub grpc: tonic::transport::ServerTlsConfig,
    /// For [`crate::Listener::with_tls`].
    pub http: Arc<rustls::ServerConfig>,
}

fn read(what: &str, path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read the {what} {}: {e}", path.display()))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs(what: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = read(what, path)?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("the {what} {} is not PEM certificates: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("the {what} {} holds no certificate", path.display()));
    }
    Ok(certs)
}

fn roots(what: &str, path: &Path) -> Result<rustls::RootCertStore, String> {
    let mut store = rustls::RootCertStore::empty();
    for c in certs(what, path)? {
        store.add(c).map_err(|e| format!("the {what} {}: {e}", path.display()))?;
    }
    Ok(store)
}

impl TlsFiles {
    /// Reads and checks the files; errors name the file and what is wrong with it.
    pub fn load(&self) -> Result<ServerTls, String> {
        let cert_pem = read("certificate", &self.cert)?;
        let key_pem = read("key", &self.key)?;
        let chain = certs("certificate", &self.cert)?;
        let key = PrivateKeyDer::from_pem_slice(&key_pem)
            .map_err(|e| format!("the key {} is not a PEM private key: {e}", self.key.display()))?;
        let builder = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?;
        let mut grpc = tonic::transport::ServerTlsConfig::new()
            .identity(tonic::transport::Identity::from_pem(&cert_pem, &key_pem));
        let builder = match &self.client_ca {
            Some(ca) => {
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots("client CA", ca)?),
                    provider(),
                )
                .build()
                .map_err(|e| format!("the client CA {}: {e}", ca.display()))?;
                grpc = grpc.client_ca_root(tonic::transport::Certificate::from_pem(read(
                    "client CA",
                    ca,
                )?));
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let mut http = builder
            .with_single_cert(chain, key)
            .map_err(|e| format!("the certificate and key do not make an identity: {e}"))?;
        http.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(ServerTls { grpc, http: Arc::new(http) })
    }
}

/// The client side: the CA that server certificates must chain to (none: the bundled web
/// roots), and a certificate and key to present when the server asks for one.
#[derive(Debug, Clone, Default)]
pub struct ClientTls {
    /// PEM CA bundle.
    pub ca: Option<PathBuf>,
    /// PEM client certificate chain.
    pub cert: Option<PathBuf>,
    /// PEM client key.
    pub key: Option<PathBuf>,
}

impl ClientTls {
    /// The tonic configuration; errors name the file.
    pub fn tonic(&self) -> Result<tonic::transport::ClientTlsConfig, String> {
        let mut cfg = tonic::transport::ClientTlsConfig::new();
        cfg = match &self.ca {
            Some(ca) => {
                certs("CA", ca)?;
                cfg.ca_certificate(tonic::transport::Certificate::from_pem(read("CA", ca)?))
            }
            None => cfg.with_webpki_roots(),
        };
        match (&self.cert, &self.key) {
            (Some(c), Some(k)) => {
                certs("client certificate", c)?;
                Ok(cfg.identity(tonic::transport::Identity::from_pem(
                    read("client certificate", c)?,
                    read("client key", k)?,
                )))
            }
            (None, None) => Ok(cfg),
            _ => Err("a client certificate needs its key, and a key its certificate".into()),
        }
    }

    /// `endpoint` with this TLS configuration when its scheme is `https`.
    pub fn apply(
        &self,
        endpoint: tonic::transport::Endpoint,
    ) -> Result<tonic::transport::Endpoint, String> {
        if endpoint.uri().scheme_str() == Some("https") {
            endpoint.tls_config(self.tonic()?).map_err(|e| e.to_string())
        } else {
            Ok(endpoint)
        }
    }
}
