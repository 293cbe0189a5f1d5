//! Volumes from MirrorVolumes, write priority from volume Leases, and this node's entry in
//! each MirrorVolume's status.
//!
//! Every MirrorVolume and every Lease of the namespace is mirrored into a local store
//! (a reflector; a re-list replaces a store whole once complete). One loop then makes the
//! node match them, at every change and every `--status-interval`:
//!
//! - a MirrorVolume whose `spec.replicas` lists this node gets its local replica (created
//!   locally: every node creates its own), grown when `spec.sizeBytes` is larger;
//! - a local volume whose MirrorVolume is gone (from a complete view only) is deleted;
//! - the Lease `peersan-vol-<volume>` gives its engine write priority: the epoch in the
//!   annotation `peersan.io/epoch` and the `holderIdentity` (only a newer epoch is taken);
//! - this node's entry in the MirrorVolume's `status.replicas` is written (server-side apply,
//!   manager `peersan-node-agent-<node>`) whenever it differs from what the object shows,
//!   so that an entry someone else overwrote is taken back.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use kube::Client;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use peersan_crds::MirrorVolume;
use peersan_crds::lease;
use peersan_crds::mirrorvolume::{BLOCK_SIZE, ReplicaStatus};
use tokio::sync::Notify;

use super::status::{missing_entry, replica_entry};
use super::{AbortOnDrop, Options, WRITE_TIMEOUT, replica_manager};
use crate::agent::{AgentError, Node};

/// Write priority as a volume Lease gives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeasePriority {
    pub epoch: u64,
    pub holder: String,
}

/// The write priority a volume Lease holds: `Ok(None)` while it has no epoch or holder yet,
/// an error (for the log) when its epoch annotation is not an epoch.
pub fn lease_priority(l: &Lease) -> Result<Option<LeasePriority>, String> {
    let epoch = lease::epoch_of(l.metadata.annotations.as_ref()).map_err(|e| e.to_string())?;
    let holder = l.spec.as_ref().and_then(|s| s.holder_identity.clone()).filter(|h| !h.is_empty());
    Ok(epoch.zip(holder).map(|(epoch, holder)| LeasePriority { epoch, holder }))
}

/// Why a MirrorVolume's size cannot be this node's replica's size (None when it can).
fn check_size(size: i64) -> Option<String> {
    (size <= 0 || size % BLOCK_SIZE != 0).then(|| {
        format!("spec.sizeBytes {size} is not a positive multiple of {BLOCK_SIZE}; the replica is not created")
    })
}

/// Mirrors the objects of `api` into a store, waking `wake` at every event.
fn reflect<K>(api: Api<K>, wake: Arc<Notify>, what: &'static str) -> (Store<K>, AbortOnDrop<()>)
where
    K: kube::Resource<DynamicType = ()> + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + Sync + 'static,
{
    let (store, writer) = reflector::store();
    let task = tokio::spawn(async move {
        let stream = reflector::reflector(writer, watcher(api, watcher::Config::default()).default_backoff());
        let mut stream = std::pin::pin!(stream);
        let mut failing = false;
        while let Some(ev) = stream.next().await {
            match ev {
                Ok(_) => {
                    if std::mem::take(&mut failing) {
                        tracing::info!(objects = what, "watching again");
                    }
                }
                Err(e) => {
                    if !failing {
                        tracing::warn!(objects = what, error = %e, "watch failed; retrying");
                    }
                    failing = true;
                }
            }
            wake.notify_one();
        }
    });
    (store, AbortOnDrop(task))
}

/// How long a volume that could not be made to match its MirrorVolume waits before the next
/// attempt (unless its MirrorVolume's spec changes).
const RETRY_EVERY: Duration = Duration::from_secs(5);

/// A volume that does not match its MirrorVolume.
struct Problem {
    message: String,
    /// The MirrorVolume's generation when it was found.
    generation: Option<i64>,
    at: Instant,
}

/// What the loop remembers between passes.
#[derive(Default)]
struct Memory {
    /// Why a volume does not match its MirrorVolume (logged when it changes).
    problems: BTreeMap<String, Problem>,
    /// Invalid epoch annotations already logged: (Lease, resourceVersion).
    bad_leases: BTreeSet<(String, String)>,
    /// Status write errors already logged, by volume.
    write_errors: BTreeMap<String, String>,
}

/// Runs the volumes of this node after their MirrorVolumes until aborted.
pub async fn run(client: Client, opts: Options, node: Arc<Node>) {
    let wake = Arc::new(Notify::new());
    let mvs: Api<MirrorVolume> = Api::all(client.clone());
    let (mv_store, _mv_task) = reflect(mvs.clone(), wake.clone(), "MirrorVolumes");
    let (lease_store, _lease_task) = reflect(Api::<Lease>::namespaced(client, &opts.namespace), wake.clone(), "Leases");
    if mv_store.wait_until_ready().await.is_err() || lease_store.wait_until_ready().await.is_err() {
        return;
    }
    tracing::info!(mirrorvolumes = mv_store.state().len(), "following MirrorVolumes");
    let manager = replica_manager(&opts.node);
    let sync = Reconciler { node, opts, mvs, mv_store, lease_store, manager };
    let mut memory = Memory::default();
    loop {
        sync.pass(&mut memory).await;
        let volumes = sync.node.volumes();
        let engine_changed = async {
            if volumes.is_empty() {
                std::future::pending::<()>().await;
            }
            futures::future::select_all(volumes.iter().map(|v| Box::pin(v.changed()))).await;
        };
        tokio::select! {
            _ = wake.notified() => {}
            _ = engine_changed => {}
            _ = tokio::time::sleep(sync.opts.status_interval) => {}
        }
    }
}

struct Reconciler {
    node: Arc<Node>,
    opts: Options,
    mvs: Api<MirrorVolume>,
    mv_store: Store<MirrorVolume>,
    lease_store: Store<Lease>,
    manager: String,
}

impl Reconciler {
    fn me(&self) -> &str {
        &self.opts.node
    }

    /// One pass: replicas created, grown and deleted; priorities applied; entries written.
    async fn pass(&self, memory: &mut Memory) {
        let all = self.mv_store.state();
        let names: BTreeSet<String> = all.iter().filter_map(|m| m.metadata.name.clone()).collect();
        let mine: Vec<Arc<MirrorVolume>> =
            all.into_iter().filter(|m| m.spec.replicas.iter().any(|r| r == self.me())).collect();

        for mv in &mine {
            let Some(name) = mv.metadata.name.as_deref() else { continue };
            let generation = mv.metadata.generation;
            if memory.problems.get(name).is_some_and(|p| p.generation == generation && p.at.elapsed() < RETRY_EVERY) {
                continue;
            }
            match self.ensure(name, mv).await {
                Ok(()) => {
                    if memory.problems.remove(name).is_some() {
                        tracing::info!(volume = %name, "the replica matches its MirrorVolume again");
                    }
                }
                Err(message) => {
                    if memory.problems.get(name).is_none_or(|p| p.message != message) {
                        tracing::warn!(volume = %name, problem = %message, "the replica does not match its MirrorVolume");
                    }
                    memory.problems.insert(name.to_owned(), Problem { message, generation, at: Instant::now() });
                }
            }
        }

        // The store holds a complete list (it is replaced whole at every re-list): a volume
        // missing from it has no MirrorVolume any more.
        for v in self.node.volumes() {
            let name = v.name().to_owned();
            if names.contains(&name) {
                continue;
            }
            tracing::info!(volume = %name, "its MirrorVolume is gone; deleting the local replica");
            let node = self.node.clone();
            let n = name.clone();
            match tokio::task::spawn_blocking(move || node.delete_local(&n)).await {
                Ok(Ok(()) | Err(AgentError::NotFound(_))) => {
                    memory.problems.remove(&name);
                    memory.write_errors.remove(&name);
                }
                Ok(Err(e)) => {
                    tracing::warn!(volume = %name, error = %e, "cannot delete the local replica; trying again")
                }
                Err(e) => tracing::error!(volume = %name, error = %e, "deleting the local replica panicked"),
            }
        }

        for v in self.node.volumes() {
            self.apply_lease(&v, memory);
        }

        for mv in &mine {
            let Some(name) = mv.metadata.name.as_deref() else { continue };
            let problem = memory.problems.get(name).map(|p| p.message.as_str());
            let entry = match (self.node.get(name), problem) {
                (Some(v), p) => replica_entry(self.me(), &v, p),
                (None, Some(p)) => missing_entry(self.me(), p),
                (None, None) => continue,
            };
            let shown = mv.status.as_ref().and_then(|s| s.replicas.iter().find(|r| r.node == self.me()));
            if shown != Some(&entry) {
                self.write_entry(name, &entry, memory).await;
            }
        }
    }

    /// Makes this node's replica of `mv` exist at its size. The error says what does not
    /// match (for the entry's detail).
    async fn ensure(&self, name: &str, mv: &MirrorVolume) -> Result<(), String> {
        if let Some(p) = check_size(mv.spec.size_bytes) {
            return Err(p);
        }
        let size = mv.spec.size_bytes as u64;
        let node = self.node.clone();
        let n = name.to_owned();
        let Some(v) = self.node.get(name) else {
            let replicas = mv.spec.replicas.clone();
            let region = (mv.spec.write_policy == peersan_crds::WritePolicy::MultiWriter)
                .then_some(crate::config::DEFAULT_REGION_SIZE);
            tracing::info!(volume = %name, size, replicas = ?replicas, ?region, "creating the local replica");
            return match tokio::task::spawn_blocking(move || node.create_member(&n, size, &replicas, region)).await {
                Ok(Ok(v)) => {
                    // The Lease may predate the engine.
                    self.apply_lease(&v, &mut Memory::default());
                    Ok(())
                }
                Ok(Err(e)) => Err(format!("cannot create the replica on {}: {e}", self.me())),
                Err(e) => Err(format!("creating the replica panicked: {e}")),
            };
        };
        let mut wanted = mv.spec.replicas.clone();
        wanted.sort();
        if v.spec().replicas != wanted {
            return Err(format!(
                "the replica on {} belongs to a volume on {:?}; the MirrorVolume lists {:?}",
                self.me(),
                v.spec().replicas,
                wanted
            ));
        }
        let current = v.size();
        if size < current {
            return Err(format!(
                "spec.sizeBytes {size} is smaller than the replica's {current} bytes; volumes only grow"
            ));
        }
        if size > current {
            tracing::info!(volume = %name, from = current, to = size, "growing the local replica");
            return match tokio::task::spawn_blocking(move || node.expand_local(&n, size)).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(format!("cannot grow the replica on {} to {size} bytes: {e}", self.me())),
                Err(e) => Err(format!("growing the replica panicked: {e}")),
            };
        }
        Ok(())
    }

    /// Feeds the volume Lease's write priority into the engine (a newer epoch only).
    fn apply_lease(&self, v: &crate::engine::Volume, memory: &mut Memory) {
        let Ok(lease_name) = lease::volume_lease_name(v.name()) else { return };
        let key = ObjectRef::<Lease>::new(&lease_name).within(&self.opts.namespace);
        let Some(l) = self.lease_store.get(&key) else { return };
        match lease_priority(&l) {
            Ok(Some(p)) => {
                if v.set_priority(p.epoch, &p.holder) {
                    tracing::info!(volume = %v.name(), epoch = p.epoch, holder = %p.holder, "write priority from the volume Lease");
                }
            }
            Ok(None) => {}
            Err(e) => {
                let rv = l.metadata.resource_version.clone().unwrap_or_default();
                if memory.bad_leases.insert((lease_name.clone(), rv)) {
                    tracing::warn!(lease = %lease_name, error = %e, "ignoring the volume Lease: its epoch is invalid");
                }
            }
        }
    }

    /// Writes this node's entry of the MirrorVolume's status.
    async fn write_entry(&self, name: &str, entry: &ReplicaStatus, memory: &mut Memory) {
        let body = serde_json::json!({
            "apiVersion": format!("{}/{}", peersan_crds::API_GROUP, peersan_crds::API_VERSION),
            "kind": "MirrorVolume",
            "metadata": { "name": name },
            "status": { "replicas": [entry] },
        });
        let params = PatchParams::apply(&self.manager).force();
        let written = tokio::time::timeout(WRITE_TIMEOUT, self.mvs.patch_status(name, &params, &Patch::Apply(&body)))
            .await
            .map_err(|_| format!("no answer from the API server within {WRITE_TIMEOUT:?}"));
        match written {
            Ok(Ok(_)) => {
                if memory.write_errors.remove(name).is_some() {
                    tracing::info!(volume = %name, "replica status written again");
                }
                tracing::debug!(volume = %name, state = ?entry.state, epoch = ?entry.epoch, "replica status written");
            }
            // Deleted meanwhile: the next pass deletes the replica.
            Ok(Err(kube::Error::Api(e))) if e.code == 404 => {}
            Ok(Err(e)) => self.write_failed(name, e.to_string(), memory),
            Err(msg) => self.write_failed(name, msg, memory),
        }
    }

    fn write_failed(&self, name: &str, msg: String, memory: &mut Memory) {
        if memory.write_errors.get(name) != Some(&msg) {
            tracing::warn!(volume = %name, error = %msg, "cannot write the replica status; trying again");
        }
        memory.write_errors.insert(name.to_owned(), msg);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::coordination::v1::LeaseSpec;

    fn vol_lease(epoch: Option<&str>, holder: Option<&str>) -> Lease {
        let mut l = Lease::default();
        if let Some(e) = epoch {
            l.metadata.annotations = Some([(lease::EPOCH_ANNOTATION.to_owned(), e.to_owned())].into());
        }
        l.spec = Some(LeaseSpec { holder_identity: holder.map(str::to_owned), ..Default::default() });
        l
    }

    #[test]
    fn lease_priority_needs_an_epoch_and_a_holder() {
        assert_eq!(
            lease_priority(&vol_lease(Some("3"), Some("node-b"))).unwrap(),
            Some(LeasePriority { epoch: 3, holder: "node-b".into() })
        );
        assert_eq!(lease_priority(&vol_lease(None, Some("node-b"))).unwrap(), None);
        assert_eq!(lease_priority(&vol_lease(Some("3"), None)).unwrap(), None);
        assert_eq!(lease_priority(&vol_lease(Some("3"), Some(""))).unwrap(), None);
        let e = lease_priority(&vol_lease(Some("three"), Some("node-b"))).unwrap_err();
        assert!(e.contains("three"), "{e}");
    }

    #[test]
    fn sizes_must_be_whole_blocks() {
        assert_eq!(check_size(64 << 20), None);
        for bad in [0, -4096, 4095, (64 << 20) + 512] {
            assert!(check_size(bad).unwrap().contains("multiple of 4096"), "{bad}");
        }
    }
}
