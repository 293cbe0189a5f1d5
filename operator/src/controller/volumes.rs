//! One MirrorVolume: replicas on offline nodes, failover of write priority, health,
//! conditions, status and Events.

use super::*;

/// How often a write-priority move is retried after conflicts before giving up for now.
pub(super) const LEASE_ATTEMPTS: usize = 5;
/// What became of a volume in one reconciliation.
pub(super) struct VolumeOutcome {
    pub(super) name: String,
    pub(super) health: VolumeHealth,
}

/// The outcome of looking at a volume's write priority.
pub(super) enum Priority {
    /// The holder is not offline (or there is no holder): nothing moves.
    Stays(Lease),
    /// The holder is offline and no in-sync replica on an online node can take over.
    Stuck { holder: String, lease: Lease },
    /// Moved from an offline holder.
    Moved { from: String, to: String, epoch: u64, lease: Lease },
    /// The Lease was deleted meanwhile (the volume is being deleted).
    Gone,
}

/// (7) One volume: replicas on offline nodes marked disconnected, failover of write
/// priority, health, conditions, status and events.
pub(super) async fn reconcile_volume(
    ctx: &Context,
    v: &MirrorVolume,
    hb: &Heartbeats<'_>,
) -> Result<VolumeOutcome, Error> {
    let name = v.name_any();
    let status = v.status.clone().unwrap_or_default();
    let entries = &status.replicas;
    let online = |n: &str| hb.online(n);
    let previous = newest(ctx.memory().volume_status.get(&name), v, || VolumeStatusPart::of(&status));

    mark_disconnected(ctx, v, hb).await?;

    let lease_name = lease::volume_lease_name(&name)?;
    let cached = ctx.stores.leases.get(&ObjectRef::new(&lease_name).within(&ctx.namespace));
    let mut stuck_note = None;
    let lease = match cached {
        None if v.metadata.deletion_timestamp.is_none() => create_lease(ctx, v, &lease_name, hb).await?,
        None => None,
        Some(cached) => match move_priority(ctx, v, (*cached).clone(), hb).await? {
            Priority::Stays(lease) => Some(lease),
            Priority::Gone => None,
            Priority::Stuck { holder, lease } => {
                stuck_note = Some(format!(
                    "write priority holder {holder} is offline and no in-sync replica on an online node can take over; \
                     the Lease stays with {holder}"
                ));
                Some(lease)
            }
            Priority::Moved { from, to, epoch, lease } => {
                ctx.metrics.failovers.inc();
                let note = format!("write priority moved from {from} (offline) to {to} at epoch {epoch}");
                publish(ctx, v, EventType::Warning, reason::WRITE_PRIORITY_MOVED, note).await;
                Some(lease)
            }
        },
    };
    let writer = lease.as_ref().and_then(|l| l.spec.as_ref()).and_then(|s| s.holder_identity.clone());
    let epoch = match &lease {
        Some(l) => lease::epoch_of(l.metadata.annotations.as_ref())?,
        None => None,
    }
    .and_then(|e| i64::try_from(e).ok());

    let health = volume::health(&v.spec.replicas, entries, online);
    let replicas = describe(&v.spec.replicas, entries, online);
    let ready_reason = match health {
        VolumeHealth::Healthy => "InSync",
        VolumeHealth::Degraded => "ReplicasNotInSync",
        VolumeHealth::Resyncing => "Resyncing",
        VolumeHealth::Unavailable => "NoReplicaAvailable",
        VolumeHealth::SplitBrain => "SplitBrain",
    };
    let ready = match &stuck_note {
        Some(note) => Desired::new(volume_condition::READY, false, "WriterOffline", format!("{note}; {replicas}")),
        None => Desired::new(volume_condition::READY, health == VolumeHealth::Healthy, ready_reason, replicas.clone()),
    };
    let degraded =
        Desired::new(volume_condition::DEGRADED, health != VolumeHealth::Healthy, ready_reason, replicas.clone());
    let catching_up: Vec<String> = v
        .spec
        .replicas
        .iter()
        .filter(|n| volume::effective_state(volume::entry_of(entries, n), online(n)) == Some(ReplicaState::CatchingUp))
        .map(|n| {
            let e = volume::entry_of(entries, n);
            match e.and_then(|e| Some((e.resync_done_bytes?, e.resync_total_bytes?))) {
                Some((done, total)) => format!("{n} {done}/{total} bytes"),
                None => n.clone(),
            }
        })
        .collect();
    let resyncing = if catching_up.is_empty() {
        Desired::new(volume_condition::RESYNCING, false, "NoResync", "")
    } else {
        Desired::new(
            volume_condition::RESYNCING,
            true,
            "CatchingUp",
            format!("catching up: {}", catching_up.join(", ")),
        )
    };
    let split = if health == VolumeHealth::SplitBrain {
        Desired::new(
            volume_condition::SPLIT_BRAIN,
            true,
            "SplitBrain",
            format!("replicas accepted different writes ({replicas}); nothing is merged until the survivor is chosen"),
        )
    } else {
        Desired::new(volume_condition::SPLIT_BRAIN, false, "NoSplitBrain", "")
    };
    let generation = v.metadata.generation;
    let conditions =
        conditions::merge(&previous.conditions, vec![ready, degraded, resyncing, split], hb.now, generation);
    let part = VolumeStatusPart { observed_generation: generation, health: Some(health), epoch, writer, conditions };
    if part != previous {
        let VolumeStatusPart { epoch, writer, conditions, .. } = &part;
        // Unknown values are left out, not written as null: what the operator stops
        // setting is removed by the apply.
        let mut fields = serde_json::Map::new();
        fields.insert("health".into(), json!(health));
        fields.insert("conditions".into(), json!(conditions));
        if let Some(g) = generation {
            fields.insert("observedGeneration".into(), json!(g));
        }
        if let Some(e) = epoch {
            fields.insert("epoch".into(), json!(e));
        }
        if let Some(w) = &writer {
            fields.insert("writer".into(), json!(w));
        }
        let patch = json!({
            "apiVersion": MirrorVolume::api_version(&()),
            "kind": MirrorVolume::kind(&()),
            "status": fields,
        });
        let written = Api::<MirrorVolume>::all(ctx.client.clone())
            .patch_status(&name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&patch))
            .await?;
        ctx.memory().volume_status.insert(name.clone(), Written::of(&written, part));
    }

    match (previous.health, health) {
        (Some(VolumeHealth::Healthy | VolumeHealth::Resyncing), VolumeHealth::Degraded | VolumeHealth::Unavailable) => {
            let note = format!("volume {name} is {}: {replicas}", health.as_str());
            publish(ctx, v, EventType::Warning, reason::VOLUME_DEGRADED, note).await;
        }
        (Some(VolumeHealth::Resyncing), VolumeHealth::Healthy) => {
            let note = format!("volume {name}: every replica is in sync again");
            publish(ctx, v, EventType::Normal, reason::RESYNC_DONE, note).await;
        }
        _ => {}
    }
    Ok(VolumeOutcome { name, health })
}

/// Sets the state of the replica entries of offline nodes to `disconnected`. A JSON patch
/// (field manager `peersan-operator`, an update) with a test of each entry's node: the
/// agent's own server-side apply takes the field back when it returns, and the operator's
/// status apply, which never lists replicas, cannot remove it.
pub(super) async fn mark_disconnected(ctx: &Context, v: &MirrorVolume, hb: &Heartbeats<'_>) -> Result<(), Error> {
    let Some(status) = &v.status else { return Ok(()) };
    let volume = v.name_any();
    let mut ops = Vec::new();
    let mut nodes = Vec::new();
    {
        let mut memory = ctx.memory();
        for (i, e) in status.replicas.iter().enumerate() {
            let key = (volume.clone(), e.node.clone());
            if hb.liveness(&e.node) != Liveness::Offline {
                memory.disconnected.remove(&key);
            } else if e.state == ReplicaState::Disconnected {
                memory.disconnected.insert(key);
            } else if !memory.disconnected.contains(&key) {
                ops.push(json!({ "op": "test", "path": format!("/status/replicas/{i}/node"), "value": e.node }));
                ops.push(
                    json!({ "op": "replace", "path": format!("/status/replicas/{i}/state"), "value": "disconnected" }),
                );
                nodes.push(e.node.clone());
            }
        }
    }
    if ops.is_empty() {
        return Ok(());
    }
    let patch: Patch<()> = Patch::Json(
        serde_json::from_value(serde_json::Value::Array(ops))
            .map_err(|e| Error::InvalidSpec(format!("building the JSON patch of {}'s replicas: {e}", v.name_any())))?,
    );
    let params = PatchParams { field_manager: Some(MANAGER.to_owned()), ..Default::default() };
    match Api::<MirrorVolume>::all(ctx.client.clone()).patch_status(&v.name_any(), &params, &patch).await {
        Ok(_) => {
            info!(volume = %volume, nodes = ?nodes, "replicas on offline nodes marked disconnected");
            let mut memory = ctx.memory();
            for node in nodes {
                memory.disconnected.insert((volume.clone(), node));
            }
            Ok(())
        }
        // The list changed under the test: its watch event brings the next look.
        Err(kube::Error::Api(s)) if s.code == 422 => {
            debug!(volume = %v.name_any(), message = %s.message, "replica list changed; not marked");
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

/// Creates the write-priority Lease of a volume that has none (the CSI controller creates
/// it with the volume; this repairs one deleted since): the holder is the first in-sync
/// replica on an online node in spec order (else the first replica), at an epoch above every
/// epoch a replica reports, so no engine has seen it. The Lease is owned by the
/// MirrorVolume, so the garbage collector removes it with the volume. `None` when the volume
/// is gone or being deleted, or another writer created the Lease first (the next
/// reconciliation reads it).
pub(super) async fn create_lease(
    ctx: &Context,
    cached: &MirrorVolume,
    lease_name: &str,
    hb: &Heartbeats<'_>,
) -> Result<Option<Lease>, Error> {
    // The cache may lag behind a deletion (the CSI controller deletes the volume, then its
    // Lease): the volume as the API server has it now decides.
    let Some(v) = Api::<MirrorVolume>::all(ctx.client.clone()).get_opt(&cached.name_any()).await? else {
        return Ok(None);
    };
    if v.metadata.deletion_timestamp.is_some() {
        return Ok(None);
    }
    let entries = v.status.as_ref().map(|s| s.replicas.as_slice()).unwrap_or_default();
    let in_sync =
        |n: &&String| hb.online(n) && volume::entry_of(entries, n).is_some_and(|e| e.state == ReplicaState::InSync);
    let Some(holder) = v.spec.replicas.iter().find(in_sync).or(v.spec.replicas.first()).cloned() else {
        return Ok(None);
    };
    let epoch = volume::next_epoch(None, entries);
    let owner = OwnerReference {
        api_version: MirrorVolume::api_version(&()).into_owned(),
        kind: MirrorVolume::kind(&()).into_owned(),
        name: v.name_any(),
        uid: v.uid().unwrap_or_default(),
        ..Default::default()
    };
    let l = Lease {
        metadata: ObjectMeta {
            name: Some(lease_name.to_owned()),
            namespace: Some(ctx.namespace.clone()),
            annotations: Some(BTreeMap::from([(lease::EPOCH_ANNOTATION.to_owned(), lease::epoch_value(epoch))])),
            owner_references: v.uid().is_some().then(|| vec![owner]),
            ..Default::default()
        },
        spec: Some(k8s_openapi::api::coordination::v1::LeaseSpec {
            holder_identity: Some(holder.clone()),
            acquire_time: Some(MicroTime(hb.now)),
            lease_transitions: Some(0),
            ..Default::default()
        }),
    };
    let params = PostParams { field_manager: Some(MANAGER.to_owned()), ..Default::default() };
    match ctx.leases().create(&params, &l).await {
        Ok(created) => {
            warn!(volume = %v.name_any(), %holder, epoch, "the volume had no write-priority Lease; created it");
            Ok(Some(created))
        }
        Err(e) if is_conflict(&e) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Moves write priority away from an offline holder (optimistic concurrency: replace with
/// the resourceVersion read; on a conflict, read again and decide again).
pub(super) async fn move_priority(
    ctx: &Context,
    v: &MirrorVolume,
    mut lease: Lease,
    hb: &Heartbeats<'_>,
) -> Result<Priority, Error> {
    let api = ctx.leases();
    let entries = v.status.as_ref().map(|s| s.replicas.as_slice()).unwrap_or_default();
    let name = lease.name_any();
    let mut last_error = None;
    for _ in 0..LEASE_ATTEMPTS {
        let Some(holder) = lease.spec.as_ref().and_then(|s| s.holder_identity.clone()) else {
            return Ok(Priority::Stays(lease));
        };
        if hb.liveness(&holder) != Liveness::Offline {
            return Ok(Priority::Stays(lease));
        }
        let Some(target) = volume::failover_target(&v.spec.replicas, entries, &holder, |n| hb.online(n)) else {
            return Ok(Priority::Stuck { holder, lease });
        };
        let epoch = volume::next_epoch(lease::epoch_of(lease.metadata.annotations.as_ref())?, entries);
        let mut moved = lease.clone();
        moved.metadata.managed_fields = None;
        moved.annotations_mut().insert(lease::EPOCH_ANNOTATION.to_owned(), lease::epoch_value(epoch));
        let spec = moved.spec.get_or_insert_with(Default::default);
        spec.holder_identity = Some(target.clone());
        spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0).saturating_add(1));
        spec.acquire_time = Some(MicroTime(hb.now));
        spec.renew_time = Some(MicroTime(hb.now));
        let params = PostParams { field_manager: Some(MANAGER.to_owned()), ..Default::default() };
        match api.replace(&name, &params, &moved).await {
            Ok(lease) => {
                info!(volume = %v.name_any(), from = %holder, to = %target, epoch, "write priority moved");
                return Ok(Priority::Moved { from: holder, to: target, epoch, lease });
            }
            Err(e) if is_conflict(&e) => {
                debug!(lease = %name, "Lease changed meanwhile; reading it again");
                last_error = Some(e);
                match api.get_opt(&name).await? {
                    Some(fresh) => lease = fresh,
                    None => return Ok(Priority::Gone),
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
    Err(last_error.map_or(Error::Unnamed, Error::from))
}
