//! One sync: read every configured object, turn the values into files, and publish them
//! as one atomic set, but only when something changed. An object that cannot be read
//! keeps its last good value; before the first complete set nothing is published.

use std::collections::HashMap;
use std::sync::Arc;

use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;

use crate::config::{Config, ObjectKind, ObjectSpec};
use crate::deliver::convert::{self, CertFormat, ConvertError};
use crate::deliver::writer::{self, FileSpec, WriteError};
use crate::keyvault::{KeyVault, KvError};
use crate::metrics::Metrics;
use crate::secret::SecretBytes;

/// Reads in flight at once: fast start with many objects, gentle on the vault.
const CONCURRENCY: usize = 16;

/// What was read for one object.
struct Fetched {
    value: SecretBytes,
    content_type: Option<String>,
    version: String,
}

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("secret {object:?} could not be read: {source}")]
    Fetch {
        object: String,
        #[source]
        source: KvError,
    },
    #[error("secret {object:?} could not be converted: {source}")]
    Convert {
        object: String,
        #[source]
        source: ConvertError,
    },
    #[error("writing the secrets: {0}")]
    Write(#[from] WriteError),
}

impl SyncError {
    pub fn is_transient(&self) -> bool {
        match self {
            SyncError::Fetch { source, .. } => source.is_transient(),
            SyncError::Convert { .. } => false,
            SyncError::Write(_) => true,
        }
    }
}

/// What a sync did.
#[derive(Debug, Default)]
pub struct SyncReport {
    /// A new set of files was published.
    pub changed: bool,
    pub files: usize,
    /// Objects that kept their last good value because reading them failed now, each with
    /// why (the read error, which starts with the object's name).
    pub stale: Vec<String>,
}

pub struct Syncer {
    cfg: Arc<Config>,
    kv: Arc<KeyVault>,
    metrics: Arc<Metrics>,
    /// The last good value of each object, by its file name (unique per object, unlike the
    /// object name: one secret may be listed twice, at different versions).
    last: HashMap<String, Fetched>,
    /// Fingerprint of each published file (content, mode, owner), to skip no-op writes.
    published: Option<HashMap<String, [u8; 32]>>,
}

impl Syncer {
    pub fn new(cfg: Arc<Config>, kv: Arc<KeyVault>, metrics: Arc<Metrics>) -> Self {
        Self {
            cfg,
            kv,
            metrics,
            last: HashMap::new(),
            published: None,
        }
    }

    pub async fn sync(&mut self) -> Result<SyncReport, SyncError> {
        let results = self.fetch_all().await;
        let mut report = SyncReport::default();
        let mut first_error = None;
        for (obj, result) in self.cfg.objects.iter().zip(results) {
            match result {
                Ok(f) => {
                    self.metrics.fetch("ok");
                    self.metrics.object_synced(&obj.name);
                    self.last.insert(obj.file.clone(), f);
                }
                Err(e) => {
                    self.metrics.fetch(e.kind());
                    if self.last.contains_key(&obj.file) {
                        tracing::warn!(object = %obj.name, error = %e, "read failed; keeping the last good value");
                        report.stale.push(e.to_string());
                    } else if first_error.is_none() {
                        first_error = Some(SyncError::Fetch {
                            object: obj.name.clone(),
                            source: e,
                        });
                    }
                }
            }
        }
        if let Some(e) = first_error {
            // An object never read yet: a partial set would break the app's expectations.
            return Err(e);
        }
        let mut files = Vec::new();
        for obj in &self.cfg.objects {
            let Some(f) = self.last.get(&obj.file) else {
                continue;
            };
            files.extend(to_files(obj, f, self.cfg.split_cert_key).map_err(|source| {
                SyncError::Convert {
                    object: obj.name.clone(),
                    source,
                }
            })?);
        }
        report.files = files.len();
        let fingerprints: HashMap<String, [u8; 32]> = files
            .iter()
            .map(|f| (f.name.clone(), fingerprint(f)))
            .collect();
        if self.published.as_ref() == Some(&fingerprints) {
            return Ok(report);
        }
        writer::publish(&self.cfg.output_dir, &files)?;
        self.published = Some(fingerprints);
        self.metrics.set_delivered(files.len());
        report.changed = true;
        let versions: Vec<String> = self
            .cfg
            .objects
            .iter()
            .filter_map(|o| {
                self.last
                    .get(&o.file)
                    .map(|f| format!("{}@{}", o.name, short(&f.version)))
            })
            .collect();
        tracing::info!(files = files.len(), versions = %versions.join(","), "published a new set of secrets");
        Ok(report)
    }

    async fn fetch_all(&self) -> Vec<Result<Fetched, KvError>> {
        let permits = Arc::new(Semaphore::new(CONCURRENCY));
        let mut tasks = tokio::task::JoinSet::new();
        for (i, obj) in self.cfg.objects.iter().enumerate() {
            let kv = Arc::clone(&self.kv);
            let obj = obj.clone();
            let permits = Arc::clone(&permits);
            tasks.spawn(async move {
                let _permit = permits.acquire_owned().await;
                (i, fetch(&kv, &obj).await)
            });
        }
        let mut out: Vec<Option<Result<Fetched, KvError>>> =
            (0..self.cfg.objects.len()).map(|_| None).collect();
        while let Some(joined) = tasks.join_next().await {
            if let Some((slot, r)) = joined
                .ok()
                .and_then(|(i, r)| out.get_mut(i).map(|s| (s, r)))
            {
                *slot = Some(r);
            }
        }
        out.into_iter()
            .zip(&self.cfg.objects)
            .map(|(r, obj)| {
                r.unwrap_or_else(|| {
                    Err(KvError::Service {
                        object: obj.name.clone(),
                        status: None,
                        code: None,
                        message: "the read task failed".into(),
                        transient: true,
                        retry_after: None,
                    })
                })
            })
            .collect()
    }
}

async fn fetch(kv: &KeyVault, obj: &ObjectSpec) -> Result<Fetched, KvError> {
    match obj.kind {
        ObjectKind::Secret => {
            let b = kv.get_secret(&obj.name, obj.version.as_deref()).await?;
            Ok(Fetched {
                value: b.value,
                content_type: b.content_type,
                version: b.version,
            })
        }
        ObjectKind::Cert => {
            let (der, version) = kv
                .get_certificate(&obj.name, obj.version.as_deref())
                .await?;
            Ok(Fetched {
                value: SecretBytes::new(convert::pem_block("CERTIFICATE", &der)),
                content_type: None,
                version,
            })
        }
        ObjectKind::Key => {
            let (pem, version) = kv.get_public_key(&obj.name, obj.version.as_deref()).await?;
            Ok(Fetched {
                value: SecretBytes::new(pem),
                content_type: None,
                version,
            })
        }
    }
}

/// The file(s) one object becomes.
fn to_files(obj: &ObjectSpec, f: &Fetched, split: bool) -> Result<Vec<FileSpec>, ConvertError> {
    let file = |name: String, content: SecretBytes| FileSpec {
        name,
        content,
        mode: obj.mode,
        uid: obj.uid,
        gid: obj.gid,
    };
    if matches!(obj.kind, ObjectKind::Cert | ObjectKind::Key) {
        return Ok(vec![file(obj.file.clone(), f.value.duplicate())]);
    }
    match (f.content_type.as_deref(), obj.format) {
        (Some("application/x-pkcs12"), CertFormat::Pfx) => Ok(vec![file(
            obj.file.clone(),
            convert::decode(&f.value, convert::Encoding::Base64)?,
        )]),
        (Some("application/x-pkcs12"), CertFormat::Pem) => {
            let parts = convert::pkcs12_to_pem(&f.value)?;
            if split {
                Ok(vec![
                    file(format!("{}.key", obj.file), parts.key.duplicate()),
                    file(
                        format!("{}.crt", obj.file),
                        SecretBytes::new(parts.chain.clone()),
                    ),
                ])
            } else {
                Ok(vec![file(obj.file.clone(), parts.combined())])
            }
        }
        (Some("application/x-pem-file"), _) if split => {
            let (key, certs) = split_pem(f.value.expose());
            Ok(vec![
                file(format!("{}.key", obj.file), key),
                file(format!("{}.crt", obj.file), SecretBytes::new(certs)),
            ])
        }
        _ => Ok(vec![file(
            obj.file.clone(),
            convert::decode(&f.value, obj.encoding)?,
        )]),
    }
}

/// Separates the private-key blocks of a PEM bundle from the certificate blocks.
fn split_pem(pem: &[u8]) -> (SecretBytes, Vec<u8>) {
    let text = String::from_utf8_lossy(pem);
    let (mut key, mut certs) = (String::new(), String::new());
    let mut current: Option<&mut String> = None;
    for line in text.lines() {
        if line.starts_with("-----BEGIN ") {
            current = Some(if line.contains("PRIVATE KEY") {
                &mut key
            } else {
                &mut certs
            });
        }
        if let Some(buf) = current.as_deref_mut() {
            buf.push_str(line);
            buf.push('\n');
        }
        if line.starts_with("-----END ") {
            current = None;
        }
    }
    (
        SecretBytes::new(zeroize::Zeroizing::new(key).as_bytes().to_vec()),
        certs.into_bytes(),
    )
}

fn fingerprint(f: &FileSpec) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(f.content.expose());
    h.update(f.mode.to_be_bytes());
    h.update(f.uid.unwrap_or(u32::MAX).to_be_bytes());
    h.update(f.gid.unwrap_or(u32::MAX).to_be_bytes());
    h.finalize().into()
}

fn short(version: &str) -> &str {
    &version[..version.len().min(8)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_pem_bundles() {
        let pem = b"-----BEGIN PRIVATE KEY-----\nAAA\n-----END PRIVATE KEY-----\n-----BEGIN CERTIFICATE-----\nBBB\n-----END CERTIFICATE-----\n";
        let (k, c) = split_pem(pem);
        assert_eq!(
            k.expose(),
            b"-----BEGIN PRIVATE KEY-----\nAAA\n-----END PRIVATE KEY-----\n"
        );
        assert_eq!(
            c,
            b"-----BEGIN CERTIFICATE-----\nBBB\n-----END CERTIFICATE-----\n"
        );
    }
}
