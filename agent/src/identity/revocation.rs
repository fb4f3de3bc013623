//! Revocation: the fleet CA's list of certificates no longer trusted, as a standard X.509
//! CRL signed by the CA, numbered so that a newer list replaces an older one.
//!
//! - The CA side: `shoal ca issue` records every serial it issues, by name, in
//!   `CA_DIR/issued.json`; `shoal ca revoke` adds the serials of a name (or one serial) to
//!   `CA_DIR/revoked.json` and writes `CA_DIR/revocations.crl` (PEM) with the next number.
//! - The agent side: [`RevocationList::verify`] accepts a list only if the fleet CA signed
//!   it; agents keep the newest, hand it to rustls (checked at every handshake) and close
//!   live connections of revoked certificates (`mesh/revocation.rs`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use rcgen::{
    CertificateRevocationListParams, Issuer, KeyIdMethod, KeyPair, RevocationReason,
    RevokedCertParams, SerialNumber,
};
use rustls_pki_types::CertificateRevocationListDer;
use rustls_pki_types::pem::PemObject;
use serde::{Deserialize, Serialize};

use crate::durable::write_whole;

/// The largest revocation list an agent accepts, in bytes.
pub const MAX_LIST_BYTES: usize = 512 * 1024;

const ISSUED: &str = "issued.json";
const REVOKED: &str = "revoked.json";
/// The list an operator publishes (`shoal ca publish-revocations`).
pub const LIST_FILE: &str = "revocations.crl";

/// What a CA directory remembers of the certificates it issued.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Issued {
    /// Name → the serials (hex) issued to it.
    pub names: BTreeMap<String, BTreeSet<String>>,
}

/// The CA's revocations.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Revoked {
    number: u64,
    /// Serial (hex) → the name it was issued to, if known.
    serials: BTreeMap<String, Option<String>>,
}

fn read_or_default<T: Default + for<'de> Deserialize<'de>>(path: &Path) -> Result<T> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .with_context(|| format!("{} is not what `shoal ca` writes", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(T::default()),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Records that `serial` was issued to `name`, in the CA directory.
pub fn record_issued(ca_dir: &Path, name: &str, serial: &[u8]) -> Result<()> {
    let path = ca_dir.join(ISSUED);
    let mut issued: Issued = read_or_default(&path)?;
    issued
        .names
        .entry(name.to_string())
        .or_default()
        .insert(hex::encode(serial));
    write_whole(&path, &serde_json::to_vec_pretty(&issued)?)
}

/// What to revoke.
pub enum Target<'a> {
    /// Every certificate the CA issued to this name.
    Name(&'a str),
    /// One certificate, by its serial in hex.
    Serial(&'a str),
}

/// Revokes `target` with the CA in `ca_dir` and writes the new list. Returns its path, its
/// number and the serials it added.
pub fn revoke(ca_dir: &Path, target: Target<'_>) -> Result<(PathBuf, u64, Vec<String>)> {
    let issued: Issued = read_or_default(&ca_dir.join(ISSUED))?;
    let mut revoked: Revoked = read_or_default(&ca_dir.join(REVOKED))?;
    let added: Vec<(String, Option<String>)> = match target {
        Target::Name(name) => {
            let serials = issued.names.get(name).ok_or_else(|| {
                anyhow!(
                    "the CA in {} has no record of issuing a certificate to `{name}`; revoke it by serial (--serial HEX)",
                    ca_dir.display()
                )
            })?;
            serials
                .iter()
                .map(|s| (s.clone(), Some(name.to_string())))
                .collect()
        }
        Target::Serial(hex_serial) => {
            let serial = hex_serial.trim().to_ascii_lowercase();
            if serial.is_empty() || serial.len() > 40 || hex::decode(&serial).is_err() {
                bail!("`{hex_serial}` is not a certificate serial in hex (at most 20 bytes)");
            }
            let name = issued
                .names
                .iter()
                .find(|(_, s)| s.contains(&serial))
                .map(|(n, _)| n.clone());
            vec![(serial, name)]
        }
    };
    let new: Vec<String> = added
        .iter()
        .filter(|(s, _)| !revoked.serials.contains_key(s))
        .map(|(s, _)| s.clone())
        .collect();
    revoked.serials.extend(added);
    revoked.number = revoked
        .number
        .checked_add(1)
        .ok_or_else(|| anyhow!("the revocation list number is exhausted"))?;

    let ca_pem = std::fs::read_to_string(ca_dir.join("ca.pem"))
        .with_context(|| format!("reading {}", ca_dir.join("ca.pem").display()))?;
    let ca_key = KeyPair::from_pem(
        &std::fs::read_to_string(ca_dir.join("ca.key"))
            .with_context(|| format!("reading {}", ca_dir.join("ca.key").display()))?,
    )
    .context("the fleet CA key is not a PEM private key")?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key)
        .context("the fleet CA certificate is not a PEM certificate")?;
    let now = time::OffsetDateTime::now_utc();
    let params = CertificateRevocationListParams {
        this_update: now,
        next_update: now + std::time::Duration::from_secs(10 * 365 * 86400),
        crl_number: SerialNumber::from(revoked.number),
        issuing_distribution_point: None,
        revoked_certs: revoked
            .serials
            .keys()
            .map(|s| RevokedCertParams {
                serial_number: SerialNumber::from(hex::decode(s).expect("hex checked")),
                revocation_time: now,
                reason_code: Some(RevocationReason::KeyCompromise),
                invalidity_date: None,
            })
            .collect(),
        key_identifier_method: KeyIdMethod::Sha256,
    };
    let crl = params.signed_by(&issuer)?;
    write_whole(&ca_dir.join(REVOKED), &serde_json::to_vec_pretty(&revoked)?)?;
    let path = ca_dir.join(LIST_FILE);
    write_whole(&path, crl.pem()?.as_bytes())?;
    Ok((path, revoked.number, new))
}

/// A revocation list the fleet CA signed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RevocationList {
    /// Higher replaces lower.
    pub number: u64,
    /// The revoked serials (big-endian bytes, no leading zeros).
    pub serials: BTreeSet<Vec<u8>>,
    /// The list as signed (DER), for rustls and for passing on.
    pub der: Vec<u8>,
}

/// Why a revocation list was refused.
#[derive(Debug, thiserror::Error)]
pub enum ListError {
    #[error("the revocation list is {0} bytes, over the limit of {MAX_LIST_BYTES}")]
    TooLarge(usize),
    #[error("not a revocation list (X.509 CRL): {0}")]
    Malformed(String),
    #[error("the revocation list is not signed by this fleet's CA")]
    NotFromTheFleetCa,
}

/// Reads a list in PEM or DER, as `shoal ca revoke` writes it.
pub fn read_list_file(path: &Path) -> Result<Vec<u8>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    if bytes.len() > MAX_LIST_BYTES {
        bail!(ListError::TooLarge(bytes.len()));
    }
    Ok(match CertificateRevocationListDer::from_pem_slice(&bytes) {
        Ok(der) => der.as_ref().to_vec(),
        Err(_) => bytes,
    })
}

/// The serial of a certificate (DER), as a revocation list names it.
pub fn serial_of(cert_der: &[u8]) -> Option<Vec<u8>> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).ok()?;
    Some(strip_zeros(cert.tbs_certificate.raw_serial().to_vec()))
}

fn strip_zeros(mut v: Vec<u8>) -> Vec<u8> {
    while v.len() > 1 && v[0] == 0 {
        v.remove(0);
    }
    v
}

impl RevocationList {
    /// Parses `der` and checks that the CA certificate `ca_der` signed it.
    pub fn verify(der: &[u8], ca_der: &[u8]) -> Result<RevocationList, ListError> {
        use x509_parser::prelude::FromDer;
        if der.len() > MAX_LIST_BYTES {
            return Err(ListError::TooLarge(der.len()));
        }
        let (_, crl) = x509_parser::revocation_list::CertificateRevocationList::from_der(der)
            .map_err(|e| ListError::Malformed(e.to_string()))?;
        let (_, ca) = x509_parser::parse_x509_certificate(ca_der)
            .map_err(|e| ListError::Malformed(format!("the fleet CA certificate: {e}")))?;
        if crl.issuer() != ca.subject() {
            return Err(ListError::NotFromTheFleetCa);
        }
        // The CA's key is ECDSA P-256 (identity::init_ca), signing with SHA-256.
        let key = ring::signature::UnparsedPublicKey::new(
            &ring::signature::ECDSA_P256_SHA256_ASN1,
            ca.public_key().subject_public_key.data.as_ref(),
        );
        key.verify(
            crl.tbs_cert_list.as_ref(),
            crl.signature_value.data.as_ref(),
        )
        .map_err(|_| ListError::NotFromTheFleetCa)?;
        let number = crl
            .crl_number()
            .and_then(|n| u64::try_from(n).ok())
            .ok_or_else(|| ListError::Malformed("no CRL number that fits 64 bits".into()))?;
        let serials = crl
            .iter_revoked_certificates()
            .map(|r| strip_zeros(r.raw_serial().to_vec()))
            .collect();
        Ok(RevocationList {
            number,
            serials,
            der: der.to_vec(),
        })
    }

    pub fn is_revoked(&self, cert_der: &[u8]) -> bool {
        serial_of(cert_der).is_some_and(|s| self.serials.contains(&s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{Role, init_ca, issue};

    fn der(path: &Path) -> Vec<u8> {
        read_list_file(path).unwrap()
    }

    fn cert(dir: &Path) -> Vec<u8> {
        rustls_pki_types::CertificateDer::from_pem_slice(
            &std::fs::read(dir.join("cert.pem")).unwrap(),
        )
        .unwrap()
        .to_vec()
    }

    #[test]
    fn a_revoked_name_is_listed_and_the_list_is_the_cas() {
        let tmp = tempfile::tempdir().unwrap();
        let ca = tmp.path().join("ca");
        init_ca(&ca).unwrap();
        issue(&ca, "edge-1", Role::Agent, &tmp.path().join("edge-1")).unwrap();
        issue(&ca, "edge-2", Role::Agent, &tmp.path().join("edge-2")).unwrap();
        let ca_der = rustls_pki_types::CertificateDer::from_pem_slice(
            &std::fs::read(ca.join("ca.pem")).unwrap(),
        )
        .unwrap()
        .to_vec();

        let (path, number, added) = revoke(&ca, Target::Name("edge-1")).unwrap();
        assert_eq!((number, added.len()), (1, 1));
        let list = RevocationList::verify(&der(&path), &ca_der).unwrap();
        assert_eq!(list.number, 1);
        assert!(list.is_revoked(&cert(&tmp.path().join("edge-1"))));
        assert!(!list.is_revoked(&cert(&tmp.path().join("edge-2"))));

        // The next list is numbered higher and still lists the first.
        let serial = hex::encode(serial_of(&cert(&tmp.path().join("edge-2"))).unwrap());
        let (path, number, _) = revoke(&ca, Target::Serial(&serial)).unwrap();
        assert_eq!(number, 2);
        let list = RevocationList::verify(&der(&path), &ca_der).unwrap();
        assert!(list.is_revoked(&cert(&tmp.path().join("edge-1"))));
        assert!(list.is_revoked(&cert(&tmp.path().join("edge-2"))));

        // Unknown names and bad serials are refused with a reason.
        let err = revoke(&ca, Target::Name("nobody")).unwrap_err().to_string();
        assert!(err.contains("no record of issuing"), "{err}");
        assert!(revoke(&ca, Target::Serial("xyz")).is_err());

        // Another CA's list is refused, as is garbage.
        let other = tmp.path().join("other");
        init_ca(&other).unwrap();
        issue(&other, "x", Role::Agent, &tmp.path().join("x")).unwrap();
        let (foreign, _, _) = revoke(&other, Target::Name("x")).unwrap();
        assert!(matches!(
            RevocationList::verify(&der(&foreign), &ca_der),
            Err(ListError::NotFromTheFleetCa)
        ));
        assert!(matches!(
            RevocationList::verify(b"garbage", &ca_der),
            Err(ListError::Malformed(_))
        ));
        // A list whose signature was tampered with is refused.
        let mut tampered = der(&path);
        let last = tampered.len() - 3;
        tampered[last] ^= 0x55;
        assert!(RevocationList::verify(&tampered, &ca_der).is_err());
    }
}
