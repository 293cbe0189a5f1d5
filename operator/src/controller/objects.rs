//! Writing the objects a VirtualSAN owns: SANNodes and its StorageClass.

use super::*;

pub(super) fn owner_reference(vsan: &VirtualSAN) -> Result<OwnerReference, Error> {
    Ok(OwnerReference {
        api_version: VirtualSAN::api_version(&()).into_owned(),
        kind: VirtualSAN::kind(&()).into_owned(),
        name: vsan.metadata.name.clone().ok_or(Error::Unnamed)?,
        uid: vsan.metadata.uid.clone().ok_or(Error::Unnamed)?,
        controller: Some(true),
        block_owner_deletion: None,
    })
}

pub(super) fn owned_by(meta: &ObjectMeta, owner: &OwnerReference) -> bool {
    meta.owner_references.iter().flatten().any(|o| o.uid == owner.uid)
}

/// Writes a SANNode's spec (server-side apply) when it differs from the cache. Returns the
/// VirtualSAN that already has the node, if another one does.
pub(super) async fn ensure_san_node(
    ctx: &Context,
    owner: &OwnerReference,
    node: &str,
    desired: SANNodeSpec,
    cached: Option<&Arc<SANNode>>,
) -> Result<Option<String>, Error> {
    let api = Api::<SANNode>::all(ctx.client.clone());
    let _claim = match cached {
        Some(sn) if sn.spec == desired && owned_by(&sn.metadata, owner) => return Ok(None),
        Some(_) => None,
        None => {
            // Creating: make sure no other SAN created it since the cache was filled.
            let guard = ctx.claims.lock().await;
            if let Some(sn) = api.get_opt(node).await?
                && sn.spec.virtual_san != desired.virtual_san
            {
                return Ok(Some(sn.spec.virtual_san));
            }
            Some(guard)
        }
    };
    debug!(node, ?desired, "applying SANNode spec");
    let patch = json!({
        "apiVersion": SANNode::api_version(&()),
        "kind": SANNode::kind(&()),
        "metadata": { "name": node, "ownerReferences": [owner] },
        "spec": desired,
    });
    api.patch(node, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&patch)).await?;
    Ok(None)
}

pub(super) async fn delete_ignoring_missing<K>(api: &Api<K>, name: &str, uid: Option<String>) -> Result<(), Error>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let params = DeleteParams {
        preconditions: uid.map(|uid| Preconditions { uid: Some(uid), resource_version: None }),
        ..Default::default()
    };
    match api.delete(name, &params).await {
        Ok(_) => Ok(()),
        // Gone already, or replaced by a newer object of that name (uid precondition).
        Err(e) if is_not_found(&e) || is_conflict(&e) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// The StorageClass a VirtualSAN provisions with.
pub(super) fn desired_storage_class(vsan: &VirtualSAN, owner: &OwnerReference) -> StorageClass {
    let name = vsan.name_any();
    StorageClass {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            labels: Some(BTreeMap::from([(MANAGED_BY_LABEL.to_owned(), MANAGER.to_owned())])),
            owner_references: Some(vec![owner.clone()]),
            ..Default::default()
        },
        provisioner: peersan_crds::CSI_DRIVER_NAME.to_owned(),
        parameters: Some(BTreeMap::from([
            ("virtualSAN".to_owned(), name),
            ("replicas".to_owned(), vsan.spec.replicas.to_string()),
        ])),
        allow_volume_expansion: Some(true),
        volume_binding_mode: Some("WaitForFirstConsumer".to_owned()),
        reclaim_policy: Some("Delete".to_owned()),
        ..Default::default()
    }
}

pub(super) fn is_ours(sc: &StorageClass, virtual_san: &str) -> bool {
    sc.labels().get(MANAGED_BY_LABEL).map(String::as_str) == Some(MANAGER)
        && sc.parameters.as_ref().and_then(|p| p.get("virtualSAN")).map(String::as_str) == Some(virtual_san)
}

pub(super) fn existing_storage_class(ctx: &Context, name: &str) -> StorageClassState {
    match ctx.stores.storage_classes.get(&ObjectRef::new(name)) {
        None => StorageClassState::Absent,
        Some(sc) if is_ours(&sc, name) => StorageClassState::Ours,
        Some(_) => StorageClassState::Conflict,
    }
}

/// Creates or updates the SAN's StorageClass. Its immutable fields (provisioner,
/// parameters, reclaim policy, binding mode) change by deleting and creating it again.
pub(super) async fn ensure_storage_class(
    ctx: &Context,
    vsan: &VirtualSAN,
    owner: &OwnerReference,
) -> Result<StorageClassState, Error> {
    let name = vsan.name_any();
    let api = Api::<StorageClass>::all(ctx.client.clone());
    let desired = desired_storage_class(vsan, owner);
    if let Some(sc) = ctx.stores.storage_classes.get(&ObjectRef::new(&name)) {
        if !is_ours(&sc, &name) {
            return Ok(StorageClassState::Conflict);
        }
        let immutable_same = sc.provisioner == desired.provisioner
            && sc.parameters == desired.parameters
            && sc.reclaim_policy == desired.reclaim_policy
            && sc.volume_binding_mode == desired.volume_binding_mode;
        if immutable_same
            && sc.allow_volume_expansion == desired.allow_volume_expansion
            && owned_by(&sc.metadata, owner)
        {
            return Ok(StorageClassState::Ours);
        }
        if !immutable_same {
            info!(storageclass = %name, "recreating the StorageClass: its parameters changed");
            delete_ignoring_missing(&api, &name, sc.uid()).await?;
        }
    }
    api.patch(&name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&desired)).await?;
    Ok(StorageClassState::Ours)
}

pub(super) async fn delete_storage_class(ctx: &Context, vsan: &VirtualSAN) -> Result<(), Error> {
    let name = vsan.name_any();
    if let Some(sc) = ctx.stores.storage_classes.get(&ObjectRef::new(&name))
        && is_ours(&sc, &name)
    {
        delete_ignoring_missing(&Api::<StorageClass>::all(ctx.client.clone()), &name, sc.uid()).await?;
    }
    Ok(())
}
