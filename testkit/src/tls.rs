//! A throw-away certificate authority for tests: one CA and one server certificate for
//! `127.0.0.1` and `localhost`, generated in memory at start. Nothing is read from or
//! written to disk unless asked ([`TestCa::write_ca_pem`], [`TempFile`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::{
    self, ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer},
};

/// Names the server certificate is valid for.
pub const SERVER_NAMES: [&str; 2] = ["127.0.0.1", "localhost"];

/// Why a test CA could not be made.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("generating a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("building the TLS server configuration: {0}")]
    Server(#[from] rustls::Error),
}

/// A CA and a server certificate it signed, ready to serve HTTPS on loopback.
pub struct TestCa {
    ca_pem: String,
    acceptor: TlsAcceptor,
}

impl std::fmt::Debug for TestCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestCa").finish_non_exhaustive()
    }
}

impl TestCa {
    /// Generates a fresh CA (a new key every time, so two instances never trust each
    /// other's certificates) and a server certificate for [`SERVER_NAMES`].
    pub fn generate() -> Result<Self, TlsSetupError> {
        Self::generate_for(&[])
    }

    /// As [`TestCa::generate`], the server certificate also naming `extra` (IP
    /// addresses or DNS names), e.g. the address pods reach the simulator at.
    pub fn generate_for(extra: &[String]) -> Result<Self, TlsSetupError> {
        let ca_key = KeyPair::generate()?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        let mut ca_name = DistinguishedName::new();
        // A name of its own: a client that trusts another test CA then sees an unknown
        // issuer, as with any foreign CA, not a bad signature from a namesake.
        let id: String = ca_key
            .public_key_raw()
            .iter()
            .skip(1)
            .take(8)
            .map(|b| format!("{b:02x}"))
            .collect();
        ca_name.push(
            DnType::CommonName,
            format!("scg-token-operator test CA {id}"),
        );
        ca_params.distinguished_name = ca_name;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_cert = ca_params.self_signed(&ca_key)?;
        let issuer = Issuer::new(ca_params, ca_key);

        let server_key = KeyPair::generate()?;
        let names: Vec<String> = SERVER_NAMES
            .iter()
            .map(|n| n.to_string())
            .chain(extra.iter().cloned())
            .collect();
        let mut server_params = CertificateParams::new(names)?;
        let mut server_name = DistinguishedName::new();
        server_name.push(DnType::CommonName, "scg-simulator");
        server_params.distinguished_name = server_name;
        server_params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        server_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let server_cert = server_params.signed_by(&server_key, &issuer)?;

        let chain = vec![
            server_cert.der().clone(),
            CertificateDer::from(ca_cert.der().to_vec()),
        ];
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(server_key.serialize_der()));
        // An explicit provider: the process-wide default may be unset, or set by a test
        // to something else.
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(chain, key)?;
        // The simulator speaks HTTP/1.1 only.
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(TestCa {
            ca_pem: ca_cert.pem(),
            acceptor: TlsAcceptor::from(Arc::new(config)),
        })
    }

    /// The CA certificate in PEM, what a client must trust.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// Writes the CA certificate (PEM) to `path`.
    pub fn write_ca_pem(&self, path: &Path) -> std::io::Result<()> {
        std::fs::write(path, &self.ca_pem)
    }

    /// Accepts TLS connections with the server certificate.
    pub fn acceptor(&self) -> TlsAcceptor {
        self.acceptor.clone()
    }
}

/// A file in the temporary directory, removed on drop: e.g. a CA bundle for
/// `--ca-bundle`, or a broken one.
#[derive(Debug)]
pub struct TempFile {
    path: PathBuf,
}

impl TempFile {
    /// Writes `contents` to a new file whose name starts with `prefix`.
    pub fn write(prefix: &str, contents: impl AsRef<[u8]>) -> std::io::Result<Self> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        // A file left by a crashed run under a reused pid is skipped, not overwritten.
        for _ in 0..100 {
            let path = std::env::temp_dir().join(format!(
                "{prefix}-{}-{}",
                std::process::id(),
                COUNTER.fetch_add(1, Ordering::Relaxed)
            ));
            // create_new: never write through a file (or link) someone else put there.
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(mut file) => {
                    // Made first, so that a failed write still removes the file.
                    let temp = TempFile { path };
                    std::io::Write::write_all(&mut file, contents.as_ref())?;
                    return Ok(temp);
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
        Err(std::io::Error::other("could not create a temporary file"))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
