//! TLS allowlists by name -> rustls `ServerConfig` for the listener and `ClientConfig` for upstreams and
//! token services. One crypto provider (aws-lc-rs), cut down to the allowed suites and groups.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::{CryptoProvider, aws_lc_rs};
use rustls::{ClientConfig, RootCertStore, ServerConfig, SupportedProtocolVersion};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Mozilla's "intermediate" profile as far as rustls implements it: the three TLS 1.3 suites and the six
/// ECDHE AEAD TLS 1.2 suites (the DHE suites of that profile are not offered by rustls).
pub fn default_cipher_suites() -> Vec<String> {
    [
        "TLS13_AES_128_GCM_SHA256",
        "TLS13_AES_256_GCM_SHA384",
        "TLS13_CHACHA20_POLY1305_SHA256",
        "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
        "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
        "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
        "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384",
        "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256",
        "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256",
    ]
    .map(String::from)
    .to_vec()
}

/// The hybrid post-quantum group first, then Mozilla intermediate's X25519, P-256 and P-384.
pub fn default_groups() -> Vec<String> {
    ["X25519MLKEM768", "X25519", "secp256r1", "secp384r1"].map(String::from).to_vec()
}

/// The TLS part of the config, as written.
#[derive(Debug, Clone)]
pub struct TlsSettings {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub min_version: String,
    pub cipher_suites: Vec<String>,
    pub key_exchange_groups: Vec<String>,
    /// Client certificates are verified against this bundle when set.
    pub client_ca: Option<PathBuf>,
    /// With `client_ca`: refuse clients without a certificate.
    pub client_cert_required: bool,
}

/// A problem with one TLS key, for the config error list.
#[derive(Debug)]
pub struct Problem {
    pub key: &'static str,
    pub message: String,
}

/// The allowlist as rustls objects: shared by the listener and every outbound TLS client.
#[derive(Debug, Clone)]
pub struct CryptoPolicy {
    pub provider: Arc<CryptoProvider>,
    pub versions: Vec<&'static SupportedProtocolVersion>,
}

impl CryptoPolicy {
    pub fn from_names(
        min_version: &str,
        suites: &[String],
        groups: &[String],
    ) -> Result<CryptoPolicy, Vec<Problem>> {
        let mut problems = Vec::new();
        let versions: Vec<&'static SupportedProtocolVersion> = match min_version {
            "1.2" => vec![&rustls::version::TLS13, &rustls::version::TLS12],
            "1.3" => vec![&rustls::version::TLS13],
            other => {
                problems.push(Problem {
                    key: "min_version",
                    message: format!("unknown TLS version `{other}`; valid: \"1.2\", \"1.3\""),
                });
                vec![&rustls::version::TLS13]
            }
        };
        let base = aws_lc_rs::default_provider();
        let mut cipher_suites = Vec::new();
        for name in suites {
            match aws_lc_rs::ALL_CIPHER_SUITES.iter().find(|s| s.suite().as_str() == Some(name.as_str())) {
                Some(s) => cipher_suites.push(*s),
                None => {
                    let valid: Vec<&str> =
                        aws_lc_rs::ALL_CIPHER_SUITES.iter().filter_map(|s| s.suite().as_str()).collect();
                    problems.push(Problem {
                        key: "cipher_suites",
                        message: format!("unknown cipher suite `{name}`; valid: {}", valid.join(", ")),
                    });
                }
            }
        }
        // A suite of a version that is switched off would only hide a mistake.
        let usable = cipher_suites.iter().any(|s| versions.iter().any(|v| s.version() == *v));
        if problems.is_empty() && !usable {
            problems.push(Problem {
                key: "cipher_suites",
                message: "no cipher suite in the list is usable with the allowed TLS versions".into(),
            });
        }
        let mut kx_groups = Vec::new();
        for name in groups {
            match aws_lc_rs::ALL_KX_GROUPS.iter().find(|g| format!("{:?}", g.name()) == *name) {
                Some(g) => kx_groups.push(*g),
                None => {
                    let valid: Vec<String> =
                        aws_lc_rs::ALL_KX_GROUPS.iter().map(|g| format!("{:?}", g.name())).collect();
                    problems.push(Problem {
                        key: "key_exchange_groups",
                        message: format!("unknown key exchange group `{name}`; valid: {}", valid.join(", ")),
                    });
                }
            }
        }
        if groups.is_empty() {
            problems.push(Problem { key: "key_exchange_groups", message: "must not be empty".into() });
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        let provider = CryptoProvider { cipher_suites, kx_groups, ..base };
        Ok(CryptoPolicy { provider: Arc::new(provider), versions })
    }

    /// A client config with the same allowlist, trusting `roots`.
    pub fn client_config(&self, roots: RootCertStore, alpn: &[&[u8]]) -> Result<ClientConfig, String> {
        self.client_config_with_cert(roots, alpn, None)
    }

    /// The same, presenting `identity` (certificate chain and key PEM files) for mutual TLS.
    pub fn client_config_with_cert(
        &self,
        roots: RootCertStore,
        alpn: &[&[u8]],
        identity: Option<(&Path, &Path)>,
    ) -> Result<ClientConfig, String> {
        let builder = ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&self.versions)
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots);
        let mut cfg = match identity {
            None => builder.with_no_client_auth(),
            Some((cert, key)) => {
                let certs = load_certs(cert)?;
                let key = PrivateKeyDer::from_pem_file(key)
                    .map_err(|e| format!("cannot read a private key from {}: {e}", key.display()))?;
                builder.with_client_auth_cert(certs, key).map_err(|e| format!("client certificate: {e}"))?
            }
        };
        cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(cfg)
    }
}

/// The listener's TLS: the rustls config plus the allowlist it was built from.
#[derive(Debug, Clone)]
pub struct ServerTls {
    pub config: Arc<ServerConfig>,
    pub policy: CryptoPolicy,
}

impl ServerTls {
    pub fn build(s: &TlsSettings) -> Result<ServerTls, Vec<Problem>> {
        let policy = CryptoPolicy::from_names(&s.min_version, &s.cipher_suites, &s.key_exchange_groups);
        let certs = load_certs(&s.cert).map_err(|m| Problem { key: "cert", message: m });
        let key = PrivateKeyDer::from_pem_file(&s.key).map_err(|e| Problem {
            key: "key",
            message: format!("cannot read a private key from {}: {e}", s.key.display()),
        });
        let (policy, certs, key) = match (policy, certs, key) {
            (Ok(p), Ok(c), Ok(k)) => (p, c, k),
            (p, c, k) => {
                let mut problems = p.err().unwrap_or_default();
                problems.extend(c.err());
                problems.extend(k.err());
                return Err(problems);
            }
        };
        let builder = ServerConfig::builder_with_provider(policy.provider.clone())
            .with_protocol_versions(&policy.versions)
            .map_err(|e| vec![Problem { key: "min_version", message: e.to_string() }])?;
        let builder = match &s.client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let roots = load_roots(ca).map_err(|m| vec![Problem { key: "client_ca", message: m }])?;
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    policy.provider.clone(),
                );
                let verifier =
                    if s.client_cert_required { verifier } else { verifier.allow_unauthenticated() };
                let verifier = verifier
                    .build()
                    .map_err(|e| vec![Problem { key: "client_ca", message: format!("client CA: {e}") }])?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config = builder.with_single_cert(certs, key).map_err(|e| {
            vec![Problem { key: "key", message: format!("certificate and key do not fit: {e}") }]
        })?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(ServerTls { config: Arc::new(config), policy })
    }
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Result<Vec<_>, _> = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?
        .collect();
    let certs = certs.map_err(|e| format!("bad PEM in {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("no certificate in {}", path.display()));
    }
    Ok(certs)
}

/// A root store from a PEM bundle.
pub fn load_roots(path: &Path) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(path)? {
        roots.add(cert).map_err(|e| format!("bad CA certificate in {}: {e}", path.display()))?;
    }
    Ok(roots)
}

/// The system's roots, read once per process: each issuer client and the forwarder need them, and a
/// reload should not re-read and re-parse the system bundle that many times.
static SYSTEM_ROOTS: std::sync::LazyLock<RootCertStore> = std::sync::LazyLock::new(|| {
    let mut roots = RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        // A system bundle may hold certificates rustls cannot parse; skipping them is what every TLS
        // client does.
        let _ = roots.add(cert);
    }
    roots
});

/// The system's roots, or the roots in `ca_file` when one is configured.
pub fn roots(ca_file: Option<&Path>) -> Result<RootCertStore, String> {
    match ca_file {
        Some(p) => load_roots(p),
        None => Ok(SYSTEM_ROOTS.clone()),
    }
}

/// A bounded label for a failed handshake.
pub fn failure_reason(err: &std::io::Error) -> &'static str {
    use rustls::{Error as E, PeerIncompatible as P};
    let Some(tls) = err.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()) else {
        return match err.kind() {
            std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset => "eof",
            std::io::ErrorKind::InvalidData => "invalid_message",
            _ => "io",
        };
    };
    match tls {
        E::PeerIncompatible(P::NoCipherSuitesInCommon) => "no_shared_cipher_suite",
        E::PeerIncompatible(
            P::SupportedVersionsExtensionRequired
            | P::Tls12NotOffered
            | P::Tls12NotOfferedOrEnabled
            | P::ServerDoesNotSupportTls12Or13
            // Only clients below TLS 1.2 omit signature_algorithms, and rustls checks it first.
            | P::SignatureAlgorithmsExtensionRequired,
        ) => "protocol_version",
        E::PeerIncompatible(P::NoKxGroupsInCommon) => "no_shared_group",
        E::PeerIncompatible(_) => "incompatible",
        E::InvalidMessage(_) | E::InappropriateMessage { .. } | E::InappropriateHandshakeMessage { .. } => {
            "invalid_message"
        }
        E::AlertReceived(_) => "alert_received",
        E::InvalidCertificate(_) | E::NoCertificatesPresented => "bad_certificate",
        _ => "other",
    }
}
