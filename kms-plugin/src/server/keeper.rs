//! Keeps the in-memory key ring in step with the key store: picks up rotations made by
//! the CLI (every reload interval and on SIGHUP), reserves encryption counters ahead of
//! use, rotates automatically when asked to, and watches the backend's health.
//! All of it runs off the request path.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use time::OffsetDateTime;

use super::Shared;
use crate::keyadmin;
use crate::keyring::{KeyRing, SOFT_ENCRYPTION_LIMIT};
use crate::keystore::{KeyState, KeyStoreError};

/// Loads the key store into a ring and reserves encryptions for its active key before
/// anyone can use it. Blocking (file I/O, backend calls).
pub fn load_ring(shared: &Shared, previous: Option<&KeyRing>) -> Result<KeyRing, KeyStoreError> {
    let manifest = shared.store.load()?;
    shared.backend.verify_identity(&manifest.backend)?;
    let mut ring = KeyRing::load(&manifest, shared.backend.as_ref(), previous)?;
    if let Some(active) = ring.active().filter(|a| a.wants_reservation()) {
        let id = active.id.clone();
        let used = active.used();
        let block = shared.next_reservation_block();
        let reserved = shared
            .store
            .update(|m| Ok::<_, KeyStoreError>(m.reserve(id.as_str(), used, block)?));
        if reserved.is_err() {
            shared.metrics.key_store_update_failed("reservation");
        }
        shared
            .kms
            .set_reservation_failure(reserved.as_ref().err().map(ToString::to_string));
        let (range, after) = reserved?;
        active.grant(range.0, range.1);
        shared.kms.reservation_granted().notify_waiters();
        // Our own write is the only change since we loaded: the ring still matches.
        if after.generation == manifest.generation + 1 {
            ring.set_generation(after.generation);
        }
    }
    Ok(ring)
}

/// One pass: reload if the store changed, top up the reservation, rotate if due,
/// check the backend. Blocking.
pub fn refresh(shared: &Shared, rotate_every: Option<Duration>) {
    let current = shared.kms.ring();
    reload_if_changed(shared, &current);

    if let Some(result) = rotate_every.map(|every| rotate_if_due(shared, every)) {
        let failure = result.err().map(|e| {
            shared.metrics.key_store_update_failed("rotation");
            tracing::error!(error = %e, "automatic rotation failed; the current key stays active");
            e.to_string()
        });
        *shared
            .rotation_failure
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = failure;
    }

    let healthy = match shared.backend.health() {
        Ok(()) => true,
        Err(e) => {
            if shared.backend_healthy.load(Ordering::Relaxed) {
                tracing::error!(error = %e, "key backend became unavailable: serving with the keys in memory; rotation is impossible until it is back");
            }
            false
        }
    };
    shared.backend_healthy.store(healthy, Ordering::Relaxed);
    shared.metrics.set_backend_healthy(healthy);
}

fn reload_if_changed(shared: &Shared, current: &Arc<KeyRing>) {
    let wants_reservation = current.active().is_some_and(|a| a.wants_reservation());
    let generation = match shared.store.load() {
        Ok(m) => m.generation,
        Err(e) => {
            shared.metrics.reload(false);
            tracing::error!(error = %e, "cannot read the key store; still serving with the keys in memory");
            return;
        }
    };
    if generation == current.generation() && !wants_reservation {
        if let Some(a) = current.active() {
            shared.metrics.set_active_key_encryptions(a.used());
        }
        return;
    }
    match load_ring(shared, Some(current)) {
        Ok(ring) => {
            let before = current.active().map(|a| a.id.clone());
            let after = ring.active().map(|a| a.id.clone());
            let changed = before != after;
            shared.metrics.ring_loaded(&ring, changed);
            shared.metrics.reload(true);
            if changed {
                tracing::info!(
                    key_id = after.as_ref().map(|k| k.as_str()).unwrap_or(""),
                    previous_key_id = before.as_ref().map(|k| k.as_str()).unwrap_or(""),
                    decrypt_only = ring.count(KeyState::DecryptOnly),
                    "active key changed: Encrypt now uses the new key, older keys still decrypt"
                );
            } else if generation != current.generation() {
                tracing::info!(generation, "key store changed; key ring reloaded");
            }
            shared.kms.install(ring);
            shared.kms.reservation_granted().notify_waiters();
        }
        Err(e) => {
            shared.metrics.reload(false);
            tracing::error!(error = %e, "reloading the key store (or reserving encryptions in it) failed; still serving with the keys in memory");
        }
    }
}

fn rotate_if_due(shared: &Shared, every: Duration) -> Result<(), keyadmin::AdminError> {
    let manifest = shared.store.load()?;
    let Some(active) = manifest.active() else {
        return Ok(());
    };
    if !manifest.peers.is_empty() {
        return rotate_with_peers(shared, &manifest, every);
    }
    let age = OffsetDateTime::now_utc() - active.state_changed_at;
    let worn = active.encryptions_reserved >= SOFT_ENCRYPTION_LIMIT;
    if age < every && !worn {
        return Ok(());
    }
    if !shared.backend_healthy.load(Ordering::Relaxed) {
        tracing::warn!(key_id = %active.id, "rotation is due but the key backend is unavailable");
        return Ok(());
    }
    let new_id = keyadmin::add(&shared.store, shared.backend.as_ref(), KeyState::Active)?;
    tracing::info!(
        key_id = %new_id,
        previous_key_id = %active.id,
        reason = if worn { "encryption limit" } else { "age" },
        "rotated automatically"
    );
    let current = shared.kms.ring();
    reload_if_changed(shared, &current);
    Ok(())
}

/// Automatic rotation with peers, in two phases over several ticks: stage a new key and
/// write a bundle per peer to the outbox; promote it only once every peer's receipt has
/// been confirmed. Until then the waiting is logged and visible in `key list` and metrics.
fn rotate_with_peers(
    shared: &Shared,
    manifest: &crate::keystore::Manifest,
    every: Duration,
) -> Result<(), keyadmin::AdminError> {
    let Some(active) = manifest.active() else {
        return Ok(());
    };
    // The newest key created here after the active one, still waiting to be promoted.
    let staged = manifest
        .keys
        .iter()
        .filter(|k| {
            k.state == KeyState::DecryptOnly
                && k.origin == crate::keystore::KeyOrigin::Created
                && k.serial > active.serial
        })
        .max_by_key(|k| k.serial);
    if let Some(staged) = staged {
        let missing = manifest.missing_peers(staged.id.as_str())?;
        shared.metrics.set_rotation_waiting(missing.len());
        if missing.is_empty() {
            keyadmin::promote(&shared.store, staged.id.as_str(), false)?;
            shared.metrics.set_rotation_waiting(0);
            tracing::info!(key_id = %staged.id, previous_key_id = %active.id, "every peer holds the staged key: promoted it");
            let current = shared.kms.ring();
            reload_if_changed(shared, &current);
        } else {
            tracing::debug!(key_id = %staged.id, missing = %missing.join(","), "rotation waiting for peers");
        }
        return Ok(());
    }
    shared.metrics.set_rotation_waiting(0);
    let age = OffsetDateTime::now_utc() - active.state_changed_at;
    if age < every && active.encryptions_reserved < SOFT_ENCRYPTION_LIMIT {
        return Ok(());
    }
    if !shared.backend_healthy.load(Ordering::Relaxed) {
        tracing::warn!(key_id = %active.id, "rotation is due but the key backend is unavailable");
        return Ok(());
    }
    let (id, bundles) = keyadmin::stage_for_peers(&shared.store, shared.backend.as_ref())?;
    shared.metrics.set_rotation_waiting(bundles.len());
    tracing::warn!(
        key_id = %id,
        bundles = %bundles.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(" "),
        "rotation due: staged a new key. Import each bundle on its peer (`key import --receipt`), \
         then `key confirm` the receipts here; the key becomes active when every peer holds it"
    );
    Ok(())
}
