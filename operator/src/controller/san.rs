//! A VirtualSAN's own objects and status: members, their SANNodes and addresses, the
//! StorageClass, checks of the spec, conditions, transitions as Events, and the cleanup at
//! deletion.

use super::*;

/// Carries a VirtualSAN's spec out and writes its status. `deleting_with`: the SAN is being
/// deleted and these volumes still exist. Returns when to look again.
pub(super) async fn apply(
    vsan: &VirtualSAN,
    ctx: &Context,
    deleting_with: Option<&[String]>,
) -> Result<Duration, Error> {
    let name = vsan.name_any();
    let spec = &vsan.spec;
    let now = Timestamp::now();
    let previous = newest(ctx.memory().san_status.get(&name), vsan, || vsan.status.clone().unwrap_or_default());
    let mut invalid: Vec<String> = Vec::new();
    let mut notes: Vec<String> = Vec::new();
    let add_invalid = |invalid: &mut Vec<String>, m: String| {
        if !invalid.contains(&m) {
            invalid.push(m);
        }
    };

    // (1) Members.
    let nodes = ctx.stores.nodes.state();
    let members = match members::select_members(&spec.nodes, nodes.iter().map(|n| &**n)) {
        Ok(m) => m,
        Err(e) => {
            add_invalid(&mut invalid, format!("spec.nodes.selector: {e}"));
            let names_only = NodeSelection { selector: None, names: spec.nodes.names.clone() };
            members::select_members(&names_only, nodes.iter().map(|n| &**n)).unwrap_or_default()
        }
    };
    for (member, node) in &members {
        if node.is_none() {
            notes.push(format!("node {member} has no Node object"));
        }
    }

    // (5) What the schema cannot check.
    let replicas = usize::try_from(spec.replicas).unwrap_or(0);
    if replicas > members.len() {
        add_invalid(
            &mut invalid,
            format!(
                "spec.replicas is {} but the SAN has {} member node(s){}: every replica needs a node of its own",
                spec.replicas,
                members.len(),
                list_in_parens(members.keys()),
            ),
        );
    }
    for np in &spec.node_pools {
        if !members.contains_key(&np.node) {
            add_invalid(&mut invalid, format!("spec.nodePools names node {}, which is not a member", np.node));
        }
    }
    for ni in &spec.replication_link.node_interfaces {
        if !members.contains_key(&ni.node) {
            add_invalid(
                &mut invalid,
                format!("spec.replicationLink.nodeInterfaces names node {}, which is not a member", ni.node),
            );
        }
    }
    let san_nodes: BTreeMap<String, Arc<SANNode>> =
        ctx.stores.san_nodes.state().into_iter().map(|sn| (sn.name_any(), sn)).collect();
    let mut claimed: BTreeSet<String> = BTreeSet::new();
    for member in members.keys() {
        if let Some(sn) = san_nodes.get(member)
            && sn.spec.virtual_san != name
        {
            add_invalid(
                &mut invalid,
                format!("node {member} is already a member of VirtualSAN {}", sn.spec.virtual_san),
            );
            claimed.insert(member.clone());
        }
    }

    // SANNodes of nodes that left: deleted, unless a volume still has a replica there.
    let volumes = volumes_of(ctx, &name);
    let mut retained: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (node, sn) in &san_nodes {
        if sn.spec.virtual_san != name || members.contains_key(node) {
            continue;
        }
        let holding: Vec<String> = volumes
            .iter()
            .filter(|v| {
                v.spec.replicas.contains(node)
                    || v.status.as_ref().is_some_and(|s| volume::entry_of(&s.replicas, node).is_some())
            })
            .map(|v| v.name_any())
            .collect();
        if holding.is_empty() {
            info!(virtualsan = %name, node, "deleting the SANNode of a node that left");
            delete_ignoring_missing(&Api::<SANNode>::all(ctx.client.clone()), node, sn.uid()).await?;
        } else {
            notes.push(format!(
                "SANNode {node} is kept although the node is no longer a member: volume(s) {} still have a replica there",
                holding.join(", ")
            ));
            retained.insert(node.clone(), holding);
        }
    }

    // (6) Liveness.
    let seen: HashSet<String> = {
        let memory = ctx.memory();
        let mut seen: HashSet<String> = memory.heartbeats.keys().cloned().collect();
        seen.extend(previous.nodes.iter().filter(|n| n.state != MemberState::Pending).map(|n| n.name.clone()));
        seen
    };
    let heartbeats = Heartbeats { ctx, now, seen };

    // (2) Addresses, (3) SANNodes.
    let managed: Vec<String> =
        members.keys().filter(|m| !claimed.contains(*m)).chain(retained.keys()).cloned().collect();
    let mut addresses: BTreeMap<String, Option<String>> = BTreeMap::new();
    for node in &managed {
        let node_object = match members.get(node) {
            Some(n) => *n,
            None => nodes.iter().find(|n| n.name_any() == *node).map(|n| &**n),
        };
        let reported = san_nodes.get(node).and_then(|sn| sn.status.as_ref()).map(|s| s.addresses.as_slice());
        let address = match address::replication_address(
            &spec.replication_link,
            node,
            node_object,
            reported.unwrap_or_default(),
            ctx.peer_port,
        ) {
            Ok(a) => a,
            Err(e) => {
                add_invalid(&mut invalid, format!("spec.replicationLink: {e}"));
                None
            }
        };
        // A node kept for its replicas keeps its address when it can no longer be told.
        let address = address.or_else(|| {
            retained
                .contains_key(node)
                .then(|| san_nodes.get(node).and_then(|sn| sn.spec.replication_address.clone()))?
        });
        addresses.insert(node.clone(), address);
    }
    let owner = owner_reference(vsan)?;
    for node in &managed {
        let pool = spec.node_pools.iter().find(|np| np.node == *node).map_or(&spec.pool, |np| &np.pool).clone();
        let peers = managed
            .iter()
            .filter(|p| *p != node)
            .filter_map(|p| Some(Peer { name: p.clone(), address: addresses.get(p)?.clone()? }))
            .collect();
        let desired = SANNodeSpec {
            virtual_san: name.clone(),
            pool,
            replication_address: addresses.get(node).cloned().flatten(),
            peers,
            resync_rate: spec.resync_rate.clone(),
            write_policy: spec.write_policy,
            degraded_writes: spec.degraded_writes,
        };
        if let Some(other) = ensure_san_node(ctx, &owner, node, desired, san_nodes.get(node)).await? {
            add_invalid(&mut invalid, format!("node {node} is already a member of VirtualSAN {other}"));
            claimed.insert(node.clone());
        }
    }

    // (4) StorageClass.
    let storage_class = if deleting_with.is_some() {
        // No new volumes on a SAN being deleted.
        delete_storage_class(ctx, vsan).await?;
        StorageClassState::Absent
    } else if invalid.is_empty() {
        ensure_storage_class(ctx, vsan, &owner).await?
    } else {
        existing_storage_class(ctx, &name)
    };

    // (7) Volumes. An error of one volume does not keep the others or the status from
    // being written; the first one is returned at the end.
    let mut outcomes = Vec::new();
    let mut first_error = None;
    for v in &volumes {
        match reconcile_volume(ctx, v, &heartbeats).await {
            Ok(outcome) => outcomes.push(outcome),
            Err(e) => {
                warn!(volume = %v.name_any(), error = %e, "volume not reconciled");
                first_error.get_or_insert(e);
            }
        }
    }

    // (8) Status.
    let member_nodes: Vec<MemberNode> = members
        .keys()
        .map(|m| {
            let sn = san_nodes.get(m).filter(|_| !claimed.contains(m));
            let pool = sn.and_then(|sn| sn.status.as_ref()).and_then(|s| s.pool.as_ref());
            MemberNode {
                name: m.clone(),
                state: member_state(heartbeats.liveness(m), sn.map(|s| &**s)),
                address: addresses.get(m).cloned().flatten(),
                capacity_bytes: pool.map(|p| p.capacity_bytes),
                free_bytes: pool.map(|p| p.free_bytes),
            }
        })
        .collect();
    let ready = member_nodes.iter().filter(|n| n.state == MemberState::Ready).count();
    let offline = member_nodes.iter().filter(|n| n.state == MemberState::Offline).count();
    let conditions = san_conditions(SanView {
        members: &member_nodes,
        not_ready: member_nodes
            .iter()
            .filter(|n| n.state != MemberState::Ready)
            .map(|n| format!("{}: {}", n.name, member_detail(n, heartbeats.liveness(&n.name), san_nodes.get(&n.name))))
            .collect(),
        invalid: &invalid,
        notes: &notes,
        storage_class: &storage_class,
        volumes: &outcomes,
        deleting_with,
    });
    let generation = vsan.metadata.generation;
    let status = VirtualSANStatus {
        observed_generation: generation,
        conditions: conditions::merge(&previous.conditions, conditions, now, generation),
        nodes: member_nodes,
        ready_nodes: Some(format!("{ready}/{}", members.len())),
        volumes: Some(i32::try_from(volumes.len()).unwrap_or(i32::MAX)),
        storage_class: matches!(storage_class, StorageClassState::Ours).then(|| name.clone()),
    };
    if status != previous {
        let patch =
            json!({ "apiVersion": VirtualSAN::api_version(&()), "kind": VirtualSAN::kind(&()), "status": status });
        let written = Api::<VirtualSAN>::all(ctx.client.clone())
            .patch_status(&name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&patch))
            .await?;
        ctx.memory().san_status.insert(name.clone(), Written::of(&written, status.clone()));
    }
    // (9) Events on transitions.
    san_events(ctx, vsan, &previous, &status).await;

    // Memory for the next reconciliation and for the Lease trigger.
    let watched: BTreeSet<&str> = managed
        .iter()
        .map(String::as_str)
        .chain(members.keys().map(String::as_str))
        .chain(volumes.iter().flat_map(|v| v.spec.replicas.iter().map(String::as_str)))
        .collect();
    let mut next = RESYNC_PERIOD;
    {
        let mut memory = ctx.memory();
        for node in &watched {
            match heartbeats.liveness(node) {
                Liveness::Online { expires } => {
                    memory.heartbeats.insert((*node).to_owned(), true);
                    let until = Duration::try_from(expires.duration_since(now)).unwrap_or_default();
                    next = next.min(until + EXPIRY_SLACK);
                }
                Liveness::Offline => {
                    memory.heartbeats.insert((*node).to_owned(), false);
                }
                Liveness::Pending => {}
            }
        }
        memory.next_check.insert(name.clone(), next);
        let volumes = &ctx.stores.volumes;
        memory.disconnected.retain(|(v, _)| volumes.get(&ObjectRef::new(v)).is_some());
        memory.volume_status.retain(|v, _| volumes.get(&ObjectRef::new(v)).is_some());
    }
    ctx.metrics.set_nodes_offline(&name, offline);

    if deleting_with.is_none() && !invalid.is_empty() {
        return Err(Error::InvalidSpec(invalid.join("; ")));
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(next),
    }
}

pub(super) fn list_in_parens<'a>(names: impl Iterator<Item = &'a String>) -> String {
    let names: Vec<&str> = names.map(String::as_str).collect();
    if names.is_empty() { String::new() } else { format!(" ({})", names.join(", ")) }
}

/// The state of a member from its heartbeat and its SANNode (none if another SAN has it).
pub(super) fn member_state(live: Liveness, san_node: Option<&SANNode>) -> MemberState {
    match live {
        Liveness::Offline => MemberState::Offline,
        Liveness::Pending => MemberState::Pending,
        Liveness::Online { .. } => match san_node.map(agent_report) {
            Some(AgentReport::Ready) => MemberState::Ready,
            Some(AgentReport::NotReady { .. }) => MemberState::Degraded,
            _ => MemberState::Pending,
        },
    }
}

/// What a SANNode's agent says about the current spec.
pub(super) enum AgentReport {
    /// Ready=True for the current generation.
    Ready,
    /// Ready=False for the current generation.
    NotReady { reason: String, message: String },
    /// Runs an older generation, or has not reported.
    Behind { observed: Option<i64>, generation: Option<i64> },
}

pub(super) fn agent_report(sn: &SANNode) -> AgentReport {
    let generation = sn.metadata.generation;
    let observed = sn.status.as_ref().and_then(|s| s.observed_generation);
    let ready = sn.status.as_ref().and_then(|s| conditions::find(&s.conditions, san_node_condition::READY));
    match ready {
        Some(c) if observed == generation && generation.is_some() => match c.status {
            ConditionStatus::True => AgentReport::Ready,
            _ => AgentReport::NotReady { reason: c.reason.clone(), message: c.message.clone() },
        },
        _ => AgentReport::Behind { observed, generation },
    }
}

/// Why a member is not ready, for the Ready condition's message.
pub(super) fn member_detail(n: &MemberNode, live: Liveness, sn: Option<&Arc<SANNode>>) -> String {
    match (n.state, live) {
        (MemberState::Offline, _) => "offline (heartbeat expired)".into(),
        (MemberState::Pending, Liveness::Pending) => "pending (no heartbeat from its agent yet)".into(),
        (MemberState::Degraded, _) => match sn.map(|s| agent_report(s)) {
            Some(AgentReport::NotReady { reason, message }) if message.is_empty() => format!("degraded ({reason})"),
            Some(AgentReport::NotReady { reason, message }) => format!("degraded ({reason}: {message})"),
            _ => "degraded".into(),
        },
        (_, _) => match sn.map(|s| agent_report(s)) {
            None => "pending (no SANNode yet)".into(),
            Some(AgentReport::Behind { observed: None, .. }) => "pending (its agent has not reported yet)".into(),
            Some(AgentReport::Behind { observed: Some(o), generation }) => format!(
                "pending (its agent runs generation {o} of its SANNode, not {})",
                generation.map_or_else(|| "?".into(), |g| g.to_string())
            ),
            Some(_) => "pending".into(),
        },
    }
}

/// Whether the StorageClass of a SAN is the operator's.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum StorageClassState {
    /// It exists and the operator made it.
    Ours,
    /// A StorageClass of that name made by someone else: left alone.
    Conflict,
    /// It does not exist.
    Absent,
}

/// What the VirtualSAN's conditions are computed from.
pub(super) struct SanView<'a> {
    pub(super) members: &'a [MemberNode],
    pub(super) not_ready: Vec<String>,
    pub(super) invalid: &'a [String],
    pub(super) notes: &'a [String],
    pub(super) storage_class: &'a StorageClassState,
    pub(super) volumes: &'a [VolumeOutcome],
    pub(super) deleting_with: Option<&'a [String]>,
}

/// Ready, Degraded, Resyncing and SplitBrain of a VirtualSAN.
pub(super) fn san_conditions(v: SanView<'_>) -> Vec<Desired> {
    let total = v.members.len();
    let ready = total - v.not_ready.len();
    let with_notes = |m: String| {
        if v.notes.is_empty() { m } else { format!("{m}; {}", v.notes.join("; ")) }
    };
    let ready_condition = if let Some(volumes) = v.deleting_with {
        Desired::new(
            san_condition::READY,
            false,
            "DeletionBlocked",
            format!(
                "{} volume(s) still exist ({}): delete their PersistentVolumeClaims first",
                volumes.len(),
                volumes.join(", ")
            ),
        )
    } else if !v.invalid.is_empty() {
        Desired::new(san_condition::READY, false, "InvalidSpec", with_notes(v.invalid.join("; ")))
    } else if total == 0 {
        Desired::new(san_condition::READY, false, "NoMembers", with_notes("no node matches spec.nodes".into()))
    } else if *v.storage_class == StorageClassState::Conflict {
        Desired::new(
            san_condition::READY,
            false,
            "StorageClassConflict",
            with_notes("a StorageClass of the VirtualSAN's name exists and was not made by peersan-operator".into()),
        )
    } else if !v.not_ready.is_empty() {
        Desired::new(
            san_condition::READY,
            false,
            "NodesNotReady",
            with_notes(format!("{ready}/{total} nodes ready; {}", v.not_ready.join("; "))),
        )
    } else if *v.storage_class != StorageClassState::Ours {
        Desired::new(
            san_condition::READY,
            false,
            "StorageClassMissing",
            with_notes("the StorageClass is missing".into()),
        )
    } else {
        Desired::new(san_condition::READY, true, "AllNodesReady", with_notes(format!("{ready}/{total} nodes ready")))
    };

    let volumes_in = |healths: &[VolumeHealth]| -> Vec<&str> {
        v.volumes.iter().filter(|o| healths.contains(&o.health)).map(|o| o.name.as_str()).collect()
    };
    let degraded_volumes = volumes_in(&[VolumeHealth::Degraded, VolumeHealth::Unavailable]);
    let bad_nodes: Vec<String> = v
        .members
        .iter()
        .filter(|n| matches!(n.state, MemberState::Offline | MemberState::Degraded))
        .map(|n| format!("{} {}", n.name, if n.state == MemberState::Offline { "offline" } else { "degraded" }))
        .collect();
    let degraded = match (degraded_volumes.is_empty(), bad_nodes.is_empty()) {
        (true, true) => Desired::new(san_condition::DEGRADED, false, "AllInSync", "no volume lacks an in-sync replica"),
        (false, _) => Desired::new(
            san_condition::DEGRADED,
            true,
            "VolumesDegraded",
            format!(
                "volume(s) without every replica in sync: {}{}",
                degraded_volumes.join(", "),
                if bad_nodes.is_empty() { String::new() } else { format!("; nodes: {}", bad_nodes.join(", ")) }
            ),
        ),
        (true, false) => {
            Desired::new(san_condition::DEGRADED, true, "NodesDown", format!("nodes: {}", bad_nodes.join(", ")))
        }
    };
    let resyncing = volumes_in(&[VolumeHealth::Resyncing]);
    let resyncing = if resyncing.is_empty() {
        Desired::new(san_condition::RESYNCING, false, "NoResync", "")
    } else {
        Desired::new(san_condition::RESYNCING, true, "VolumesResyncing", format!("resyncing: {}", resyncing.join(", ")))
    };
    let split = volumes_in(&[VolumeHealth::SplitBrain]);
    let split = if split.is_empty() {
        Desired::new(san_condition::SPLIT_BRAIN, false, "NoSplitBrain", "")
    } else {
        Desired::new(
            san_condition::SPLIT_BRAIN,
            true,
            "VolumesSplitBrain",
            format!(
                "volume(s) whose replicas accepted different writes: {}; nothing is merged until the survivor is chosen",
                split.join(", ")
            ),
        )
    };
    vec![ready_condition, degraded, resyncing, split]
}

/// NodeJoined, NodeOffline, NodeOnline and DeletionBlocked, from the change of status.
pub(super) async fn san_events(
    ctx: &Context,
    vsan: &VirtualSAN,
    previous: &VirtualSANStatus,
    status: &VirtualSANStatus,
) {
    for node in &status.nodes {
        match previous.nodes.iter().find(|p| p.name == node.name) {
            None => {
                publish(ctx, vsan, EventType::Normal, reason::NODE_JOINED, format!("node {} joined", node.name)).await;
            }
            Some(p) if p.state != MemberState::Offline && node.state == MemberState::Offline => {
                let note = format!("node {}: heartbeat expired", node.name);
                publish(ctx, vsan, EventType::Warning, reason::NODE_OFFLINE, note).await;
            }
            Some(p) if p.state == MemberState::Offline && node.state != MemberState::Offline => {
                let note = format!("node {}: heartbeat is fresh again", node.name);
                publish(ctx, vsan, EventType::Normal, reason::NODE_ONLINE, note).await;
            }
            Some(_) => {}
        }
    }
    let ready = |s: &VirtualSANStatus| {
        conditions::find(&s.conditions, san_condition::READY).map(|c| (c.reason.clone(), c.message.clone()))
    };
    if let Some((reason, message)) = ready(status)
        && reason == reason::DELETION_BLOCKED
        && ready(previous) != Some((reason.clone(), message.clone()))
    {
        publish(ctx, vsan, EventType::Warning, reason::DELETION_BLOCKED, message).await;
    }
}

/// Deletion without volumes: deletes the SAN's SANNodes and StorageClass (the finalizer goes
/// when this returns). The API server, not the cache, says whether volumes remain.
pub(super) async fn cleanup(vsan: &VirtualSAN, ctx: &Context) -> Result<Action, Error> {
    let name = vsan.name_any();
    let volumes: Vec<String> = Api::<MirrorVolume>::all(ctx.client.clone())
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter(|v| v.spec.virtual_san == name)
        .map(|v| v.name_any())
        .collect();
    if !volumes.is_empty() {
        return Err(Error::DeletionBlocked(format!("volume(s) still exist: {}", volumes.join(", "))));
    }
    let san_nodes = Api::<SANNode>::all(ctx.client.clone());
    for sn in san_nodes.list(&ListParams::default()).await?.items.into_iter().filter(|sn| sn.spec.virtual_san == name) {
        delete_ignoring_missing(&san_nodes, &sn.name_any(), sn.uid()).await?;
    }
    let classes = Api::<StorageClass>::all(ctx.client.clone());
    if let Some(sc) = classes.get_opt(&name).await?
        && is_ours(&sc, &name)
    {
        delete_ignoring_missing(&classes, &name, sc.uid()).await?;
    }
    ctx.metrics.forget(&name);
    {
        let mut memory = ctx.memory();
        memory.next_check.remove(&name);
        memory.san_status.remove(&name);
        memory.backoff.remove(&name);
    }
    info!(virtualsan = %name, "deleted its SANNodes and StorageClass");
    Ok(Action::await_change())
}
