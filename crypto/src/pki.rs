//! X.509 material for the control plane: a per-cluster CA and the
//! certificates it issues (etcd server, apiserver, admin, and one client
//! certificate per remote cluster whose CN is its etcd user).
//!
//! A CA is persisted as two PEM strings and reloaded by rebuilding its
//! issuer parameters from its name, so later commands (connect) issue under
//! the same CA that `enable` created.

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("certificate {what}: {source}")]
    Rcgen {
        what: String,
        #[source]
        source: rcgen::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

fn rc(what: impl Into<String>) -> impl FnOnce(rcgen::Error) -> Error {
    let what = what.into();
    move |source| Error::Rcgen { what, source }
}

/// What a leaf certificate may be used for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usage {
    Server,
    Client,
    /// Both (etcd peers, apiservers that also dial etcd).
    ServerAndClient,
}

/// An issued certificate and its private key, PEM.
#[derive(Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print private keys.
        f.debug_struct("Issued")
            .field("key_pem", &"<redacted>")
            .finish_non_exhaustive()
    }
}

/// A certificate authority.
pub struct Ca {
    name: String,
    cert_pem: String,
    key: KeyPair,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

fn ca_params(name: &str) -> Result<CertificateParams> {
    let mut p = CertificateParams::new(Vec::<String>::new()).map_err(rc("CA parameters"))?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    dn.push(DnType::OrganizationName, "clustermesh");
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ok(p)
}

impl Ca {
    /// A new CA named `name` (its CN), e.g. `clustermesh-ca-c1`.
    pub fn generate(name: &str) -> Result<Self> {
        let key = KeyPair::generate().map_err(rc("CA key"))?;
        let cert = ca_params(name)?
            .self_signed(&key)
            .map_err(rc("CA self-signature"))?;
        Ok(Self {
            name: name.to_owned(),
            cert_pem: cert.pem(),
            key,
        })
    }

    /// Reloads a CA written by [`Ca::generate`] (same name).
    pub fn load(name: &str, cert_pem: &str, key_pem: &str) -> Result<Self> {
        let key = KeyPair::from_pem(key_pem).map_err(rc("CA key PEM"))?;
        Ok(Self {
            name: name.to_owned(),
            cert_pem: cert_pem.to_owned(),
            key,
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// Issues a leaf certificate with common name `cn` and the given subject
    /// alternative names (IP addresses or DNS names).
    pub fn issue(&self, cn: &str, sans: &[&str], usage: Usage) -> Result<Issued> {
        let what = format!("for {cn}");
        let mut p =
            CertificateParams::new(sans.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>())
                .map_err(rc(what.clone()))?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, cn);
        p.distinguished_name = dn;
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        p.extended_key_usages = match usage {
            Usage::Server => vec![ExtendedKeyUsagePurpose::ServerAuth],
            Usage::Client => vec![ExtendedKeyUsagePurpose::ClientAuth],
            Usage::ServerAndClient => vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
        };
        let key = KeyPair::generate().map_err(rc(what.clone()))?;
        let issuer = Issuer::new(ca_params(&self.name)?, &self.key);
        let cert = p.signed_by(&key, &issuer).map_err(rc(what))?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}
