//! Signatures by fleet identities: an agent signs bytes with its certificate's key
//! ([`Signer`], ECDSA P-256 with SHA-256 through ring), and anyone holding the fleet CA checks
//! them ([`CertVerifier`]): the certificate chains to the fleet CA, is valid at the given
//! time, is not revoked, names the expected holder with the agent role, and its key made the
//! signature. Certificates that passed the chain check are cached by the SHA-256 of their DER
//! (a bounded map), so a certificate seen on many messages is checked once; the cheap checks
//! (validity window, revocation, name, signature) run every time.
//!
//! The caller chooses the bytes and any domain-separation prefix; this module only signs
//! and verifies them.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::Duration;

use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use sha2::{Digest, Sha256};

use super::{Identity, Role, name_and_role};

/// How many verified certificates a [`CertVerifier`] remembers: one per host of a large
/// fleet, with room for re-issued ones. The oldest is forgotten first.
pub const MAX_CACHED_CERTS: usize = 16_384;

/// Why a signature by a fleet identity was not accepted.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SignError {
    #[error("the identity's private key is not a PKCS#8 ECDSA P-256 key")]
    BadKey,
    #[error("signing failed (the system's random number generator failed)")]
    SigningFailed,
    #[error("not a parsable X.509 certificate")]
    NotACertificate,
    #[error("the certificate does not chain to the fleet CA: {0}")]
    Untrusted(String),
    #[error("the certificate is not valid at this time")]
    NotValidNow,
    #[error("the certificate is revoked")]
    Revoked,
    #[error("the certificate names `{named}`, not `{expected}`")]
    WrongName { named: String, expected: String },
    #[error("the certificate of `{0}` is not an agent's")]
    NotAnAgent(String),
    #[error("the certificate of `{0}` is not an operator's")]
    NotAnOperator(String),
    #[error("the signature was not made by the certificate's key")]
    BadSignature,
}

/// Signs with an identity's private key.
pub struct Signer {
    key: EcdsaKeyPair,
    rng: SystemRandom,
}

impl Signer {
    pub fn new(identity: &Identity) -> Result<Signer, SignError> {
        let PrivateKeyDer::Pkcs8(pkcs8) = &identity.key else {
            return Err(SignError::BadKey);
        };
        let rng = SystemRandom::new();
        let key = EcdsaKeyPair::from_pkcs8(
            &ECDSA_P256_SHA256_ASN1_SIGNING,
            pkcs8.secret_pkcs8_der(),
            &rng,
        )
        .map_err(|_| SignError::BadKey)?;
        Ok(Signer { key, rng })
    }

    /// An ASN.1 DER ECDSA P-256 SHA-256 signature of `msg`.
    pub fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, SignError> {
        self.key
            .sign(&self.rng, msg)
            .map(|s| s.as_ref().to_vec())
            .map_err(|_| SignError::SigningFailed)
    }
}

/// What the chain check established about a certificate, kept in the cache.
struct Verified {
    name: String,
    role: Role,
    serial: Vec<u8>,
    not_before_s: i64,
    not_after_s: i64,
}

/// Checks signatures by fleet agents against the fleet CA.
pub struct CertVerifier {
    ca: CertificateDer<'static>,
    cache: HashMap<[u8; 32], Verified>,
    order: VecDeque<[u8; 32]>,
    revoked: HashSet<Vec<u8>>,
    /// The number of the revocation list `revoked` came from, by [`Self::honour`].
    list_number: Option<u64>,
}

impl CertVerifier {
    /// `ca` is the fleet CA certificate (DER).
    pub fn new(ca: CertificateDer<'static>) -> CertVerifier {
        CertVerifier {
            ca,
            cache: HashMap::new(),
            order: VecDeque::new(),
            revoked: HashSet::new(),
            list_number: None,
        }
    }

    /// The serial numbers (big-endian bytes, as in the certificate) whose certificates are
    /// refused from now on, cached or not.
    pub fn set_revoked(&mut self, serials: HashSet<Vec<u8>>) {
        self.revoked = serials;
    }

    /// Refuses the certificates `list` revokes (none when `None`), if it is not the list
    /// already in force here: cheap to call before every check.
    pub fn honour(&mut self, list: Option<&crate::identity::revocation::RevocationList>) {
        let number = list.map(|l| l.number);
        if self.list_number != number {
            self.revoked = list
                .map(|l| l.serials.iter().cloned().collect())
                .unwrap_or_default();
            self.list_number = number;
        }
    }

    /// How many verified certificates are cached.
    pub fn cached(&self) -> usize {
        self.cache.len()
    }

    /// Accepts `sig` over `msg` only if it was made by the key of `cert_der`, a certificate
    /// from the fleet CA, valid at `now_ms` (ms since the epoch), not revoked, issued to
    /// `expected` with the agent role.
    pub fn verify(
        &mut self,
        cert_der: &[u8],
        expected: &str,
        msg: &[u8],
        sig: &[u8],
        now_ms: u64,
    ) -> Result<(), SignError> {
        self.verify_as(Role::Agent, cert_der, expected, msg, sig, now_ms)
    }

    /// [`Self::verify`] for a certificate that must carry `role`.
    pub fn verify_as(
        &mut self,
        role: Role,
        cert_der: &[u8],
        expected: &str,
        msg: &[u8],
        sig: &[u8],
        now_ms: u64,
    ) -> Result<(), SignError> {
        let key: [u8; 32] = Sha256::digest(cert_der).into();
        if !self.cache.contains_key(&key) {
            let verified = self.chain_check(cert_der, now_ms)?;
            if self.order.len() >= MAX_CACHED_CERTS
                && let Some(oldest) = self.order.pop_front()
            {
                self.cache.remove(&oldest);
            }
            self.order.push_back(key);
            self.cache.insert(key, verified);
        }
        let v = &self.cache[&key];
        let now_s = i64::try_from(now_ms / 1000).unwrap_or(i64::MAX);
        if now_s < v.not_before_s || now_s > v.not_after_s {
            return Err(SignError::NotValidNow);
        }
        if self.revoked.contains(&v.serial) {
            return Err(SignError::Revoked);
        }
        if v.name != expected {
            return Err(SignError::WrongName {
                named: v.name.clone(),
                expected: expected.to_string(),
            });
        }
        if v.role != role {
            return Err(match role {
                Role::Agent => SignError::NotAnAgent(v.name.clone()),
                Role::Operator => SignError::NotAnOperator(v.name.clone()),
            });
        }
        let cert = CertificateDer::from(cert_der);
        let ee = webpki::EndEntityCert::try_from(&cert).map_err(|_| SignError::NotACertificate)?;
        ee.verify_signature(webpki::ring::ECDSA_P256_SHA256, msg, sig)
            .map_err(|_| SignError::BadSignature)
    }

    /// The expensive part: the chain to the fleet CA, then name, role, serial and validity.
    fn chain_check(&self, cert_der: &[u8], now_ms: u64) -> Result<Verified, SignError> {
        let cert = CertificateDer::from(cert_der);
        let ee = webpki::EndEntityCert::try_from(&cert).map_err(|_| SignError::NotACertificate)?;
        let anchor = webpki::anchor_from_trusted_cert(&self.ca)
            .map_err(|e| SignError::Untrusted(format!("the fleet CA is unusable: {e}")))?;
        let time = UnixTime::since_unix_epoch(Duration::from_millis(now_ms));
        ee.verify_for_usage(
            &[webpki::ring::ECDSA_P256_SHA256],
            &[anchor],
            &[],
            time,
            webpki::KeyUsage::client_auth(),
            None,
            None,
        )
        .map_err(|e| match e {
            webpki::Error::CertExpired { .. } | webpki::Error::CertNotValidYet { .. } => {
                SignError::NotValidNow
            }
            e => SignError::Untrusted(e.to_string()),
        })?;
        let (name, role) = name_and_role(cert_der).map_err(|_| SignError::NotACertificate)?;
        let (_, parsed) = x509_parser::parse_x509_certificate(cert_der)
            .map_err(|_| SignError::NotACertificate)?;
        Ok(Verified {
            name,
            role,
            serial: super::revocation::serial_of(cert_der).unwrap_or_default(),
            not_before_s: parsed.validity().not_before.timestamp(),
            not_after_s: parsed.validity().not_after.timestamp(),
        })
    }
}
