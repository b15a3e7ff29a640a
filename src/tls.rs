//! TLS with rustls (ring provider; no aws-lc, so it cross-builds with mingw): the client
//! side of FTPS (`tls = "explicit"`, `tls_ca`, `tls_insecure`) and the server side of the
//! tills' HTTPS service (`tls_cert`, `tls_key`).
//!
//! Trust for FTPS: the webpki roots (Mozilla's list, built in) plus the certificates of
//! `tls_ca`. A `tls_ca` certificate that is the server's own certificate is trusted as is
//! (pinned: byte-identical, any name, CA flag or not — shops' self-signed certificates are
//! often made for another host name, or by `openssl req -x509` with CA:TRUE, which webpki
//! would refuse as an end-entity certificate); any other is a CA that signs the server's.

use std::path::Path;
use std::sync::Arc;

use tokio_rustls::rustls;
use tokio_rustls::rustls::client::danger::{
    HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier,
};
use tokio_rustls::rustls::client::WebPkiServerVerifier;
use tokio_rustls::rustls::crypto::CryptoProvider;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tokio_rustls::rustls::{DigitallySignedStruct, SignatureScheme};

/// The one crypto provider of this build.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The certificates of a PEM file; an error names the file.
pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: not a PEM certificate file: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{}: no certificate in it (expected -----BEGIN CERTIFICATE-----)",
            path.display()
        ));
    }
    Ok(certs)
}

/// The first private key of a PEM file (PKCS#8, PKCS#1 or SEC1); an error names the file.
pub fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| {
        format!(
            "{}: no private key in it (expected -----BEGIN PRIVATE KEY----- or similar): {e}",
            path.display()
        )
    })
}

/// The TLS client config of an FTPS endpoint.
pub fn client_config(
    ca: Option<&Path>,
    insecure: bool,
) -> Result<Arc<rustls::ClientConfig>, String> {
    let provider = provider();
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup: {e}"))?;
    let config = if insecure {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAny { provider }))
            .with_no_client_auth()
    } else {
        let mut roots = rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        };
        let mut pinned = Vec::new();
        if let Some(ca) = ca {
            for c in read_certs(ca)? {
                // A certificate webpki cannot take as an anchor is still pinned.
                let _ = roots.add(c.clone());
                pinned.push(c);
            }
        }
        let inner = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .map_err(|e| format!("TLS setup: {e}"))?;
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Pinning { pinned, inner }))
            .with_no_client_auth()
    };
    Ok(Arc::new(config))
}

/// The TLS server config of an HTTPS endpoint; errors name the file.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, String> {
    let certs = read_certs(cert)?;
    let key_der = read_key(key)?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup: {e}"))?
        .with_no_client_auth()
        .with_single_cert(certs, key_der)
        .map_err(|e| {
            format!(
                "{} and {} do not make a usable certificate and key: {e}",
                cert.display(),
                key.display()
            )
        })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// webpki verification, except that a `tls_ca` certificate presented by the server itself
/// is accepted as is.
#[derive(Debug)]
struct Pinning {
    pinned: Vec<CertificateDer<'static>>,
    inner: Arc<WebPkiServerVerifier>,
}

impl ServerCertVerifier for Pinning {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if self
            .pinned
            .iter()
            .any(|p| p.as_ref() == end_entity.as_ref())
        {
            return Ok(ServerCertVerified::assertion());
        }
        self.inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// `tls_insecure = true`: any certificate (the handshake signatures are still checked, so
/// the session is encrypted, but with whoever answers).
#[derive(Debug)]
struct AcceptAny {
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The server name for `host` (a DNS name or an IP address).
pub fn server_name(host: &str) -> Result<ServerName<'static>, String> {
    ServerName::try_from(host.to_string())
        .map_err(|e| format!("{host:?} cannot be a TLS server name: {e}"))
}

/// A listener for axum that hands out TLS connections. Handshakes run in their own tasks
/// (a slow or silent client never holds up the others) with a time limit; a failed one —
/// a till speaking plain HTTP to the HTTPS port, say — is logged (a warning the first
/// time per peer address, then at debug) and dropped.
pub struct TlsListener {
    rx: tokio::sync::mpsc::Receiver<(
        tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
        std::net::SocketAddr,
    )>,
    local: std::net::SocketAddr,
}

const HANDSHAKE_LIMIT: std::time::Duration = std::time::Duration::from_secs(15);

impl TlsListener {
    /// Starts accepting on `listener`; the accepting task ends when this is dropped.
    pub fn new(
        listener: tokio::net::TcpListener,
        config: Arc<rustls::ServerConfig>,
        endpoint: String,
    ) -> std::io::Result<TlsListener> {
        let local = listener.local_addr()?;
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        tokio::spawn(async move {
            let warned = Arc::new(std::sync::Mutex::new(std::collections::HashSet::new()));
            loop {
                let (tcp, peer) = tokio::select! {
                    _ = tx.closed() => return,
                    r = listener.accept() => match r {
                        Ok(c) => c,
                        Err(e) => {
                            // Out of file descriptors and the like: wait, as axum does.
                            tracing::debug!(endpoint = %endpoint, "accept: {e}");
                            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                            continue;
                        }
                    },
                };
                let (acceptor, tx, endpoint, warned) = (
                    acceptor.clone(),
                    tx.clone(),
                    endpoint.clone(),
                    warned.clone(),
                );
                tokio::spawn(async move {
                    let why =
                        match tokio::time::timeout(HANDSHAKE_LIMIT, acceptor.accept(tcp)).await {
                            Ok(Ok(tls)) => {
                                let _ = tx.send((tls, peer)).await;
                                return;
                            }
                            Ok(Err(e)) => e.to_string(),
                            Err(_) => format!("no handshake within {HANDSHAKE_LIMIT:?}"),
                        };
                    let first = warned
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(peer.ip());
                    if first {
                        tracing::warn!(endpoint = %endpoint, %peer, "TLS handshake failed: {why} (is the till set to http:// instead of https://, or does it not trust the certificate?); further failures from this address are logged at debug level");
                    } else {
                        tracing::debug!(endpoint = %endpoint, %peer, "TLS handshake failed: {why}");
                    }
                });
            }
        });
        Ok(TlsListener { rx, local })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(c) => c,
            // The accepting task only ends once this listener is dropped.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}
