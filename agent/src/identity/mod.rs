//! Fleet identity: a fleet CA, and certificates it issues to agents and operators, the role
//! carried in the certificate. `shoal ca init` makes the CA; `shoal ca issue` writes an
//! identity directory (`ca.pem`, `cert.pem`, `key.pem`) that an agent's config or an
//! operator's `--identity` points at. Private keys are written with mode 0600 and never
//! replaced silently.

pub mod sign;

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::Serialize;

/// What a certificate lets its holder do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// A host running the agent: joins the mesh.
    Agent,
    /// A person or script: may ask agents about the fleet and deploy.
    Operator,
}

impl Role {
    fn uri(self) -> &'static str {
        match self {
            Role::Agent => "urn:shoal:role:agent",
            Role::Operator => "urn:shoal:role:operator",
        }
    }
}

pub mod revocation;

const CA_CERT: &str = "ca.pem";
const CA_KEY: &str = "ca.key";

/// Creates a fleet CA in `dir` (`ca.pem`, `ca.key`). Refuses to overwrite one.
pub fn init_ca(dir: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    if dir.join(CA_KEY).exists() || dir.join(CA_CERT).exists() {
        bail!(
            "{} already holds a fleet CA; remove it first to make a new one",
            dir.display()
        );
    }
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "Shoal fleet CA");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = time_now() - std::time::Duration::from_secs(3600);
    params.not_after = time_now() + std::time::Duration::from_secs(10 * 365 * 86400);
    let cert = params.self_signed(&key)?;
    write_private(&dir.join(CA_KEY), &key.serialize_pem())?;
    write_public(&dir.join(CA_CERT), &cert.pem())?;
    Ok(dir.join(CA_CERT))
}

fn time_now() -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc()
}

/// A name is a host or operator name: letters, digits, `-`, `_`, `.`, at most 63 bytes.
pub fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        && !name.starts_with(['-', '.']);
    if !ok {
        bail!(
            "`{name}` is not a valid name (letters, digits, `-`, `_`, `.`; at most 63 characters)"
        );
    }
    Ok(())
}

/// Issues a certificate for `name` with `role` from the CA in `ca_dir`, into `out`
/// (`ca.pem`, `cert.pem`, `key.pem`).
pub fn issue(ca_dir: &Path, name: &str, role: Role, out: &Path) -> Result<()> {
    check_name(name)?;
    let ca_pem = std::fs::read_to_string(ca_dir.join(CA_CERT)).with_context(|| {
        format!(
            "reading the fleet CA certificate {}",
            ca_dir.join(CA_CERT).display()
        )
    })?;
    let ca_key = KeyPair::from_pem(
        &std::fs::read_to_string(ca_dir.join(CA_KEY)).with_context(|| {
            format!("reading the fleet CA key {}", ca_dir.join(CA_KEY).display())
        })?,
    )
    .context("the fleet CA key is not a PEM private key")?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key)
        .context("the fleet CA certificate is not a PEM certificate")?;
    if out.join("key.pem").exists() {
        bail!(
            "{} already holds an identity; remove it first to issue a new one",
            out.display()
        );
    }

    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    dn.push(
        DnType::OrganizationalUnitName,
        format!("{role:?}").to_lowercase(),
    );
    params.distinguished_name = dn;
    params.subject_alt_names = vec![
        SanType::DnsName(
            name.to_string()
                .try_into()
                .map_err(|_| anyhow!("`{name}` is not a valid DNS name"))?,
        ),
        SanType::URI(role.uri().try_into().expect("a valid URI")),
    ];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.not_before = time_now() - std::time::Duration::from_secs(3600);
    params.not_after = time_now() + std::time::Duration::from_secs(2 * 365 * 86400);
    let cert = params.signed_by(&key, &issuer)?;

    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let serial = revocation::serial_of(cert.der())
        .ok_or_else(|| anyhow!("the issued certificate does not parse"))?;
    revocation::record_issued(ca_dir, name, &serial)?;
    write_private(&out.join("key.pem"), &key.serialize_pem())?;
    write_public(&out.join("cert.pem"), &cert.pem())?;
    write_public(&out.join("ca.pem"), &ca_pem)?;
    Ok(())
}

fn write_private(path: &Path, pem: &str) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(pem.as_bytes())?;
    f.sync_all()?;
    Ok(())
}

fn write_public(path: &Path, pem: &str) -> Result<()> {
    std::fs::write(path, pem).with_context(|| format!("writing {}", path.display()))
}

/// An identity directory as `shoal ca issue` writes it, loaded for TLS.
pub struct Identity {
    pub name: String,
    pub role: Role,
    /// The holder's certificate.
    pub cert: CertificateDer<'static>,
    pub key: PrivateKeyDer<'static>,
    /// The fleet CA, which every peer must chain to.
    pub ca: CertificateDer<'static>,
}

impl Identity {
    pub fn load(dir: &Path) -> Result<Identity> {
        let read = |file: &str| {
            let path = dir.join(file);
            std::fs::read(&path).with_context(|| format!("reading {}", path.display()))
        };
        let cert = CertificateDer::from_pem_slice(&read("cert.pem")?).map_err(|e| {
            anyhow!(
                "{}: not a PEM certificate: {e}",
                dir.join("cert.pem").display()
            )
        })?;
        let ca = CertificateDer::from_pem_slice(&read("ca.pem")?).map_err(|e| {
            anyhow!(
                "{}: not a PEM certificate: {e}",
                dir.join("ca.pem").display()
            )
        })?;
        let key = PrivateKeyDer::from_pem_slice(&read("key.pem")?).map_err(|e| {
            anyhow!(
                "{}: not a PEM private key: {e}",
                dir.join("key.pem").display()
            )
        })?;
        let (name, role) =
            name_and_role(&cert).with_context(|| format!("{}", dir.join("cert.pem").display()))?;
        Ok(Identity {
            name,
            role,
            cert,
            key,
            ca,
        })
    }
}

/// The name and role a certificate (DER) carries.
pub fn name_and_role(cert_der: &[u8]) -> Result<(String, Role)> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der)
        .map_err(|e| anyhow!("not an X.509 certificate: {e}"))?;
    let name = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .ok_or_else(|| anyhow!("the certificate has no common name"))?
        .to_string();
    let mut role = None;
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::URI(uri) = n {
                role = match *uri {
                    u if u == Role::Agent.uri() => Some(Role::Agent),
                    u if u == Role::Operator.uri() => Some(Role::Operator),
                    _ => role,
                };
            }
        }
    }
    Ok((
        name.clone(),
        role.ok_or_else(|| anyhow!("the certificate of `{name}` carries no Shoal role"))?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_ca_issues_identities_that_carry_name_and_role() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca");
        init_ca(&ca).unwrap();
        assert_eq!(
            std::fs::metadata(ca.join("ca.key"))
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o600
        );
        assert!(
            init_ca(&ca)
                .unwrap_err()
                .to_string()
                .contains("already holds a fleet CA")
        );

        for (name, role) in [("edge-1", Role::Agent), ("alice", Role::Operator)] {
            let out = dir.path().join(name);
            issue(&ca, name, role, &out).unwrap();
            assert_eq!(
                std::fs::metadata(out.join("key.pem"))
                    .unwrap()
                    .permissions()
                    .mode()
                    & 0o777,
                0o600
            );
            assert_eq!(
                std::fs::read(out.join("ca.pem")).unwrap(),
                std::fs::read(ca.join("ca.pem")).unwrap()
            );
            let identity = Identity::load(&out).unwrap();
            assert_eq!((identity.name.as_str(), identity.role), (name, role));
            assert!(
                issue(&ca, name, role, &out)
                    .unwrap_err()
                    .to_string()
                    .contains("already holds an identity")
            );
        }
        assert!(issue(&ca, "bad name!", Role::Agent, &dir.path().join("x")).is_err());
        // A CA certificate carries no role: it is not an identity.
        let ca_cert =
            CertificateDer::from_pem_slice(&std::fs::read(ca.join("ca.pem")).unwrap()).unwrap();
        assert!(
            name_and_role(&ca_cert)
                .unwrap_err()
                .to_string()
                .contains("carries no Shoal role")
        );
        assert!(
            issue(
                &dir.path().join("nope"),
                "a",
                Role::Agent,
                &dir.path().join("y")
            )
            .unwrap_err()
            .to_string()
            .contains("reading the fleet CA")
        );
    }
}
