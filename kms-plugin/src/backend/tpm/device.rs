//! The TPM 2.0 backend on `tss-esapi`: each KEK is a sealed-data object under the storage
//! root key (SRK), optionally bound to PCRs. One context, behind a mutex, used only from
//! blocking threads; every transient handle is flushed on every path, because swtpm and
//! many real TPMs hold only three objects at a time.

use std::path::Path;
use std::str::FromStr;
use std::sync::{Mutex, MutexGuard};

use tss_esapi::attributes::ObjectAttributesBuilder;
use tss_esapi::constants::SessionType;
use tss_esapi::constants::response_code::Tss2ResponseCodeKind;
use tss_esapi::handles::{KeyHandle, PersistentTpmHandle, SessionHandle, TpmHandle};
use tss_esapi::interface_types::algorithm::{HashingAlgorithm, PublicAlgorithm};
use tss_esapi::interface_types::dynamic_handles::Persistent;
use tss_esapi::interface_types::ecc::EccCurve;
use tss_esapi::interface_types::key_bits::RsaKeyBits;
use tss_esapi::interface_types::resource_handles::{Hierarchy, Provision};
use tss_esapi::interface_types::session_handles::{AuthSession, PolicySession};
use tss_esapi::structures::{
    Auth, Data, Digest, EccPoint, HashScheme, KeyedHashScheme, PcrSelectionList,
    PcrSelectionListBuilder, PcrSlot, Private, Public, PublicBuilder, PublicEccParametersBuilder,
    PublicKeyRsa, PublicKeyedHashParameters, PublicRsaParametersBuilder, RsaDecryptionScheme,
    RsaExponent, RsaScheme, SensitiveData, SymmetricDefinition, SymmetricDefinitionObject,
};
use tss_esapi::traits::{Marshall, UnMarshall};
use tss_esapi::{Context, TctiNameConf};
use zeroize::Zeroizing;

use super::TpmOptions;
use super::blob::TpmBlob;
use super::pcr::{PcrBank, PcrPolicy};
use crate::backend::{BackendError, BackendIdentity, BackendKind, KeyBackend, SealedKek};
use crate::keyid::{KeyId, hex};
use crate::secret::Kek;

/// An open TPM: the ESYS context and the SRK's handle.
struct Conn {
    ctx: Context,
    srk: KeyHandle,
    /// A transient SRK is flushed when the connection goes; a persistent one stays.
    srk_transient: bool,
    srk_name: String,
}

impl Drop for Conn {
    fn drop(&mut self) {
        if self.srk_transient {
            let _ = self.ctx.flush_context(self.srk.into());
        }
    }
}

pub struct TpmBackend {
    opts: TpmOptions,
    owner_auth: Option<Zeroizing<Vec<u8>>>,
    conn: Mutex<Option<Conn>>,
    /// The SRK name seen at open: a reconnect that finds another one (TPM cleared
    /// while running) is refused.
    srk_name: String,
}

impl TpmBackend {
    /// Connects to the TPM and sets up the SRK; fails closed with a message naming the
    /// TCTI and the likely cause.
    pub fn open(opts: TpmOptions) -> Result<Self, BackendError> {
        let owner_auth = match &opts.owner_auth_file {
            Some(p) => Some(read_owner_auth(p)?),
            None => None,
        };
        let conn = connect(&opts, owner_auth.as_deref().map(|v| v.as_slice()))?;
        let srk_name = conn.srk_name.clone();
        Ok(Self {
            opts,
            owner_auth,
            conn: Mutex::new(Some(conn)),
            srk_name,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Option<Conn>> {
        // A panic while holding the lock leaves at worst a broken connection, which the
        // next call replaces.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` on the connection, reconnecting first if the last call failed. Any failure
    /// drops the connection, so a TPM (or swtpm) that went away and came back is picked
    /// up again on the next call.
    fn with_conn<T>(
        &self,
        f: impl FnOnce(&mut Conn) -> Result<T, BackendError>,
    ) -> Result<T, BackendError> {
        let mut guard = self.lock();
        if guard.is_none() {
            let conn = connect(&self.opts, self.owner_auth.as_deref().map(|v| v.as_slice()))?;
            if conn.srk_name != self.srk_name {
                return Err(BackendError::Tpm(format!(
                    "the TPM's storage root key changed while the plugin was running (was {}, now {}): \
                     the TPM was cleared or replaced; restart the plugin and recover the keys",
                    self.srk_name, conn.srk_name
                )));
            }
            *guard = Some(conn);
        }
        let Some(conn) = guard.as_mut() else {
            return Err(BackendError::Tpm("no TPM connection".into()));
        };
        let r = f(conn);
        if r.is_err() {
            *guard = None;
        }
        r
    }
}

impl KeyBackend for TpmBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Tpm
    }

    fn identity(&self) -> Result<BackendIdentity, BackendError> {
        Ok(BackendIdentity {
            kind: BackendKind::Tpm,
            fingerprint: format!("srk:{}", self.srk_name),
        })
    }

    fn verify_identity(&self, recorded: &BackendIdentity) -> Result<(), BackendError> {
        let current = self.identity()?;
        if &current == recorded {
            return Ok(());
        }
        let hint = if recorded.kind == BackendKind::Tpm {
            "the TPM was cleared or replaced, or this key store was copied from another node. \
             Keys sealed here cannot be unsealed by this TPM: recover them with \
             `kms-plugin key recover` (recovery key) or enroll them from another node with \
             `kms-plugin key export`/`key import`"
        } else {
            "this key store was created with another backend; use that one"
        };
        Err(BackendError::WrongRoot {
            recorded: recorded.kind,
            recorded_fp: recorded.fingerprint.clone(),
            current: current.kind,
            current_fp: current.fingerprint,
            hint,
        })
    }

    fn seal(&self, key_id: &KeyId, kek: &Kek) -> Result<SealedKek, BackendError> {
        let pcr = self.opts.pcr_policy;
        self.with_conn(|c| {
            let policy = match &pcr {
                Some(p) => Some(
                    pcr_policy_digest(&mut c.ctx, p)
                        .map_err(|e| tpm_err("computing the PCR policy", &e))?,
                ),
                None => None,
            };
            let public = sealed_object_template(policy)?;
            let data = SensitiveData::try_from(kek.expose().to_vec())
                .map_err(|e| tpm_err("preparing the key for sealing", &e))?;
            let srk = c.srk;
            let created = c
                .ctx
                .execute_with_nullauth_session(|ctx| {
                    ctx.create(srk, public, None, Some(data), None, None)
                })
                .map_err(|e| tpm_err("sealing a key (TPM2_Create)", &e))?;
            let public = created
                .out_public
                .marshall()
                .map_err(|e| tpm_err("encoding the public area", &e))?;
            tracing::debug!(%key_id, pcr = ?pcr.map(|p| p.to_string()), "sealed key to the TPM");
            Ok(SealedKek(
                TpmBlob {
                    pcr,
                    public,
                    private: created.out_private.value().to_vec(),
                }
                .encode(),
            ))
        })
    }

    fn unseal(&self, key_id: &KeyId, sealed: &SealedKek) -> Result<Kek, BackendError> {
        let blob = TpmBlob::decode(&sealed.0).map_err(|reason| BackendError::Unseal {
            key_id: key_id.clone(),
            reason: format!("the sealed blob is damaged: {reason}"),
        })?;
        let unseal_err = |e: &tss_esapi::Error| BackendError::Unseal {
            key_id: key_id.clone(),
            reason: explain(e, "unsealing"),
        };
        let public = Public::unmarshall(&blob.public).map_err(|e| unseal_err(&e))?;
        let private = Private::try_from(blob.private.clone()).map_err(|e| unseal_err(&e))?;
        self.with_conn(|c| {
            let srk = c.srk;
            let handle = c
                .ctx
                .execute_with_nullauth_session(|ctx| ctx.load(srk, private, public))
                .map_err(|e| unseal_err(&e))?;
            let data = unseal_loaded(&mut c.ctx, handle, blob.pcr.as_ref());
            // Flush whatever happened: object slots are scarce.
            let _ = c.ctx.flush_context(handle.into());
            let data = data.map_err(|e| unseal_err(&e))?;
            Kek::from_slice(data.value()).ok_or_else(|| BackendError::Unseal {
                key_id: key_id.clone(),
                reason: format!(
                    "the TPM returned {} bytes, not a 32-byte key",
                    data.value().len()
                ),
            })
        })
    }

    fn health(&self) -> Result<(), BackendError> {
        let op = format!(
            "asking the TPM ({}) for random bytes: it stopped answering",
            self.opts.tcti
        );
        self.with_conn(|c| {
            c.ctx
                .get_random(8)
                .map(|_| ())
                .map_err(|e| tpm_err(&op, &e))
        })
    }

    fn create_transport_key(&self) -> Result<(SealedKek, rsa::RsaPublicKey), BackendError> {
        let template = transport_key_template()?;
        self.with_conn(|c| {
            let srk = c.srk;
            let created = c
                .ctx
                .execute_with_nullauth_session(|ctx| {
                    ctx.create(srk, template, None, None, None, None)
                })
                .map_err(|e| {
                    tpm_err(
                        "creating the node transport key (RSA-2048, TPM2_Create)",
                        &e,
                    )
                })?;
            let public_key = rsa_public(&created.out_public)?;
            let public = created
                .out_public
                .marshall()
                .map_err(|e| tpm_err("encoding the public area", &e))?;
            let blob = TpmBlob {
                pcr: None,
                public,
                private: created.out_private.value().to_vec(),
            };
            Ok((SealedKek(blob.encode()), public_key))
        })
    }

    fn transport_unwrap(
        &self,
        transport: &SealedKek,
        key_id: &KeyId,
        label: &str,
        wrapped: &[u8],
    ) -> Result<Kek, BackendError> {
        let fail = |reason: String| BackendError::Unseal {
            key_id: key_id.clone(),
            reason,
        };
        let blob = TpmBlob::decode(&transport.0)
            .map_err(|r| fail(format!("the transport key blob is damaged: {r}")))?;
        let public = Public::unmarshall(&blob.public)
            .map_err(|e| fail(explain(&e, "reading the transport key")))?;
        let private = Private::try_from(blob.private)
            .map_err(|e| fail(explain(&e, "reading the transport key")))?;
        let cipher = PublicKeyRsa::try_from(wrapped.to_vec())
            .map_err(|e| fail(explain(&e, "reading the wrapped key")))?;
        let label = Data::try_from(label.as_bytes().to_vec())
            .map_err(|e| fail(explain(&e, "preparing the label")))?;
        self.with_conn(|c| {
            let srk = c.srk;
            let handle = c
                .ctx
                .execute_with_nullauth_session(|ctx| ctx.load(srk, private, public))
                .map_err(|e| fail(explain(&e, "loading the transport key")))?;
            let scheme = RsaDecryptionScheme::Oaep(HashScheme::new(HashingAlgorithm::Sha256));
            let clear = c
                .ctx
                .execute_with_nullauth_session(|ctx| ctx.rsa_decrypt(handle, cipher, scheme, label));
            let _ = c.ctx.flush_context(handle.into());
            let clear = clear.map_err(|e| {
                fail(explain(
                    &e,
                    "unwrapping with the transport key (the bundle was made for another node, or altered)",
                ))
            })?;
            Kek::from_slice(clear.value())
                .ok_or_else(|| fail(format!("the unwrapped key is {} bytes, not 32", clear.value().len())))
        })
    }
}

/// RSA-2048 decryption key with OAEP-SHA256, bound to this TPM. Not restricted: it
/// decrypts what other nodes wrap to it, and nothing else is ever wrapped to it.
fn transport_key_template() -> Result<Public, BackendError> {
    let attrs = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_sensitive_data_origin(true)
        .with_user_with_auth(true)
        .with_no_da(true)
        .with_decrypt(true)
        .build()
        .map_err(|e| tpm_err("building the transport key attributes", &e))?;
    let params = PublicRsaParametersBuilder::new()
        .with_scheme(RsaScheme::Oaep(HashScheme::new(HashingAlgorithm::Sha256)))
        .with_key_bits(RsaKeyBits::Rsa2048)
        .with_exponent(RsaExponent::default())
        .with_is_decryption_key(true)
        .with_restricted(false)
        .build()
        .map_err(|e| tpm_err("building the transport key parameters", &e))?;
    PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::Rsa)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attrs)
        .with_rsa_parameters(params)
        .with_rsa_unique_identifier(PublicKeyRsa::default())
        .build()
        .map_err(|e| tpm_err("building the transport key template", &e))
}

fn rsa_public(public: &Public) -> Result<rsa::RsaPublicKey, BackendError> {
    let Public::Rsa {
        parameters, unique, ..
    } = public
    else {
        return Err(BackendError::Tpm(
            "the TPM returned a non-RSA transport key".into(),
        ));
    };
    let e = match parameters.exponent().value() {
        0 => 65537,
        e => e,
    };
    rsa::RsaPublicKey::new(
        rsa::BigUint::from_bytes_be(unique.value()),
        rsa::BigUint::from(e),
    )
    .map_err(|e| {
        BackendError::Tpm(format!(
            "the TPM's transport key is not a valid RSA key: {e}"
        ))
    })
}

fn read_owner_auth(path: &Path) -> Result<Zeroizing<Vec<u8>>, BackendError> {
    let bytes = Zeroizing::new(std::fs::read(path).map_err(|source| BackendError::Io {
        op: "reading the owner authorization file",
        path: path.to_owned(),
        source,
    })?);
    // A trailing newline from `echo` is not part of the password.
    let end = bytes
        .iter()
        .rposition(|b| *b != b'\n' && *b != b'\r')
        .map_or(0, |i| i + 1);
    Ok(Zeroizing::new(bytes[..end].to_vec()))
}

fn connect(opts: &TpmOptions, owner_auth: Option<&[u8]>) -> Result<Conn, BackendError> {
    let cannot_open = |detail: String| {
        let hint = if opts.tcti.starts_with("device:") {
            " Check that the device exists and that this user may open it: it is usually \
             owned by root:tss with mode 0660, so run as root or in the tss group. In a \
             container, the device must be mounted and allowed."
        } else if opts.tcti.starts_with("swtpm:") || opts.tcti.starts_with("mssim:") {
            " Check that the simulator is running and listening there."
        } else {
            ""
        };
        BackendError::Tpm(format!(
            "cannot open the TPM through TCTI {:?}: {detail}.{hint}",
            opts.tcti
        ))
    };
    let tcti = TctiNameConf::from_str(&opts.tcti)
        .map_err(|e| cannot_open(format!("invalid TCTI ({e})")))?;
    let mut ctx = Context::new(tcti).map_err(|e| cannot_open(e.to_string()))?;
    // Prove the TPM answers before anything else.
    ctx.get_random(8).map_err(|e| cannot_open(e.to_string()))?;
    if let Some(auth) = owner_auth {
        let auth = Auth::try_from(auth.to_vec())
            .map_err(|e| tpm_err("reading the owner authorization", &e))?;
        ctx.tr_set_auth(Hierarchy::Owner.into(), auth)
            .map_err(|e| tpm_err("setting the owner authorization", &e))?;
    }
    let (srk, srk_transient) = match opts.srk_handle {
        Some(h) => persistent_srk(&mut ctx, h)?,
        None => (create_srk(&mut ctx)?, true),
    };
    let name = ctx
        .tr_get_name(srk.into())
        .map_err(|e| tpm_err("reading the SRK's name", &e))?;
    Ok(Conn {
        ctx,
        srk,
        srk_transient,
        srk_name: hex(name.value()),
    })
}

/// The TCG storage key template: ECC P-256, restricted decryption, AES-128-CFB.
/// A primary made from it is the same key for as long as the owner seed is unchanged.
fn srk_template() -> Result<Public, BackendError> {
    let attrs = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_sensitive_data_origin(true)
        .with_user_with_auth(true)
        .with_no_da(true)
        .with_restricted(true)
        .with_decrypt(true)
        .build()
        .map_err(|e| tpm_err("building the SRK attributes", &e))?;
    let params = PublicEccParametersBuilder::new_restricted_decryption_key(
        SymmetricDefinitionObject::AES_128_CFB,
        EccCurve::NistP256,
    )
    .build()
    .map_err(|e| tpm_err("building the SRK parameters", &e))?;
    PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::Ecc)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attrs)
        .with_ecc_parameters(params)
        .with_ecc_unique_identifier(EccPoint::default())
        .build()
        .map_err(|e| tpm_err("building the SRK template", &e))
}

fn create_srk(ctx: &mut Context) -> Result<KeyHandle, BackendError> {
    let template = srk_template()?;
    ctx.execute_with_nullauth_session(|ctx| {
        ctx.create_primary(Hierarchy::Owner, template, None, None, None, None)
    })
    .map(|r| r.key_handle)
    .map_err(|e| tpm_err("creating the storage root key (owner hierarchy)", &e))
}

/// Uses the storage key at `handle`, or creates it there. If it cannot be persisted
/// (owner authorization withheld), uses a transient one re-created at every start.
fn persistent_srk(ctx: &mut Context, handle: u32) -> Result<(KeyHandle, bool), BackendError> {
    let tpm_handle = PersistentTpmHandle::new(handle).map_err(|_| {
        BackendError::Tpm(format!(
            "SRK handle {handle:#x} is not a persistent handle (0x81xxxxxx)"
        ))
    })?;
    if let Ok(obj) = ctx.tr_from_tpm_public(TpmHandle::Persistent(tpm_handle)) {
        let key = KeyHandle::from(obj);
        let (public, _, _) = ctx
            .read_public(key)
            .map_err(|e| tpm_err("reading the persistent SRK", &e))?;
        let a = public.object_attributes();
        if !(a.restricted() && a.decrypt() && !a.sign_encrypt()) {
            return Err(BackendError::Tpm(format!(
                "persistent handle {handle:#x} holds a key that is not a storage key; choose \
                 another --srk-handle or evict it"
            )));
        }
        return Ok((key, false));
    }
    let transient = create_srk(ctx)?;
    let persisted = ctx.execute_with_session(Some(AuthSession::Password), |ctx| {
        ctx.evict_control(
            Provision::Owner,
            transient.into(),
            Persistent::Persistent(tpm_handle),
        )
    });
    match persisted {
        Ok(obj) => {
            let _ = ctx.flush_context(transient.into());
            tracing::info!(
                handle = format!("{handle:#x}"),
                "persisted the storage root key"
            );
            Ok((KeyHandle::from(obj), false))
        }
        Err(e) => {
            tracing::warn!(
                handle = format!("{handle:#x}"),
                error = %explain(&e, "persisting the SRK"),
                "cannot persist the storage root key; re-creating it at every start instead"
            );
            Ok((transient, true))
        }
    }
}

/// A sealed-data object: never leaves this TPM (fixedTPM, fixedParent), no dictionary-
/// attack lockout, unsealed with an empty password or, with a PCR policy, only through it.
fn sealed_object_template(policy: Option<Digest>) -> Result<Public, BackendError> {
    let attrs = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_no_da(true)
        .with_admin_with_policy(true)
        .with_user_with_auth(policy.is_none())
        .build()
        .map_err(|e| tpm_err("building the sealed object attributes", &e))?;
    PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::KeyedHash)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attrs)
        .with_auth_policy(policy.unwrap_or_default())
        .with_keyed_hash_parameters(PublicKeyedHashParameters::new(KeyedHashScheme::Null))
        .with_keyed_hash_unique_identifier(Digest::default())
        .build()
        .map_err(|e| tpm_err("building the sealed object template", &e))
}

fn pcr_selection(p: &PcrPolicy) -> Result<PcrSelectionList, tss_esapi::Error> {
    let bank = match p.bank {
        PcrBank::Sha1 => HashingAlgorithm::Sha1,
        PcrBank::Sha256 => HashingAlgorithm::Sha256,
        PcrBank::Sha384 => HashingAlgorithm::Sha384,
    };
    let slots: Vec<PcrSlot> = p
        .pcrs()
        .filter_map(|n| PcrSlot::try_from(1u32 << n).ok())
        .collect();
    PcrSelectionListBuilder::new()
        .with_selection(bank, &slots)
        .build()
}

fn policy_session(
    ctx: &mut Context,
    kind: SessionType,
) -> Result<(AuthSession, PolicySession), tss_esapi::Error> {
    let session = ctx
        .start_auth_session(
            None,
            None,
            None,
            kind,
            SymmetricDefinition::AES_128_CFB,
            HashingAlgorithm::Sha256,
        )?
        .ok_or(tss_esapi::Error::WrapperError(
            tss_esapi::WrapperErrorKind::WrongValueFromTpm,
        ))?;
    let policy = PolicySession::try_from(session)?;
    Ok((session, policy))
}

/// The policy digest for "these PCRs hold their current values", from a trial session.
fn pcr_policy_digest(ctx: &mut Context, p: &PcrPolicy) -> Result<Digest, tss_esapi::Error> {
    let (session, policy) = policy_session(ctx, SessionType::Trial)?;
    let r = pcr_selection(p)
        .and_then(|sel| ctx.policy_pcr(policy, Digest::default(), sel))
        .and_then(|()| ctx.policy_get_digest(policy));
    let _ = ctx.flush_context(SessionHandle::from(session).into());
    r
}

fn unseal_loaded(
    ctx: &mut Context,
    handle: KeyHandle,
    pcr: Option<&PcrPolicy>,
) -> Result<SensitiveData, tss_esapi::Error> {
    match pcr {
        None => ctx.execute_with_nullauth_session(|ctx| ctx.unseal(handle.into())),
        Some(p) => {
            let (session, policy) = policy_session(ctx, SessionType::Policy)?;
            let r = pcr_selection(p)
                .and_then(|sel| ctx.policy_pcr(policy, Digest::default(), sel))
                .and_then(|()| {
                    ctx.execute_with_session(Some(session), |ctx| ctx.unseal(handle.into()))
                });
            // The TPM flushes a policy session after a successful use (continueSession is
            // clear); after a failure it may still be loaded.
            if r.is_err() {
                let _ = ctx.flush_context(SessionHandle::from(session).into());
            }
            r
        }
    }
}

fn tpm_err(op: &str, e: &tss_esapi::Error) -> BackendError {
    BackendError::Tpm(explain(e, op))
}

/// Turns the TPM's response codes that operators meet into what they mean.
fn explain(e: &tss_esapi::Error, op: &str) -> String {
    let kind = match e {
        tss_esapi::Error::Tss2Error(rc) => rc.kind(),
        tss_esapi::Error::WrapperError(_) => None,
    };
    let meaning = match kind {
        Some(Tss2ResponseCodeKind::Integrity) => {
            "this key was sealed by a different TPM (or under another storage root key): the \
             key store was copied from another node, or this TPM was cleared. Recover the key \
             with the recovery key or enroll it from another node"
        }
        Some(Tss2ResponseCodeKind::PolicyFail) => {
            "the PCR policy no longer matches: the boot state changed (firmware, bootloader or \
             Secure Boot update). Recover the key with the recovery key and re-seal it to the \
             new boot state"
        }
        Some(Tss2ResponseCodeKind::ObjectMemory) => {
            "the TPM is out of object slots: use the kernel resource manager (device:/dev/tpmrm0), \
             not /dev/tpm0"
        }
        Some(Tss2ResponseCodeKind::BadAuth | Tss2ResponseCodeKind::AuthFail) => {
            "authorization failed: check the owner authorization file"
        }
        Some(Tss2ResponseCodeKind::Lockout) => "the TPM is in dictionary-attack lockout",
        _ => "",
    };
    if meaning.is_empty() {
        format!("{op}: TPM error: {e}")
    } else {
        format!("{op}: {meaning} (TPM: {e})")
    }
}
