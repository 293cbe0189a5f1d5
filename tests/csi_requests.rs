//! The CSI services' contracts, called over their sockets as the sidecars and kubelet call
//! them: identity and capabilities, every call made twice (idempotency), and bad requests
//! answered with the spec's codes while the data and the processes stay intact.

mod common;
use common::csi::*;
use common::*;
use peersan_csi_driver::pb;
use tonic::Code;

fn code<T: std::fmt::Debug>(r: Result<T, tonic::Status>) -> Code {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(s) => {
            assert!(!s.message().is_empty(), "an error says what is wrong");
            s.code()
        }
    }
}

#[test]
fn identity_capabilities_and_node_info() {
    if !can_stage() {
        return;
    }
    let h = CsiCluster::start(2);
    for mut id in [h.controller_identity(), h.node_identity(0)] {
        let info = h.block_on(id.get_plugin_info(pb::GetPluginInfoRequest {})).unwrap().into_inner();
        assert_eq!(info.name, "csi.peersan.io");
        assert!(!info.vendor_version.is_empty());
        let caps = h.block_on(id.get_plugin_capabilities(pb::GetPluginCapabilitiesRequest {})).unwrap().into_inner();
        let shown = format!("{caps:?}");
        assert_eq!(caps.capabilities.len(), 3, "{shown}");
        let probe = h.block_on(id.probe(pb::ProbeRequest {})).unwrap().into_inner();
        assert_eq!(probe.ready, Some(true));
    }
    let info = h.block_on(h.node(1).node_get_info(pb::NodeGetInfoRequest {})).unwrap().into_inner();
    assert_eq!(info.node_id, "node-2");
    assert_eq!(info.accessible_topology.unwrap().segments[peersan_csi_driver::TOPOLOGY_NODE_KEY], "node-2");
    let caps = h.block_on(h.node(0).node_get_capabilities(pb::NodeGetCapabilitiesRequest {})).unwrap().into_inner();
    assert_eq!(caps.capabilities.len(), 4);
    let caps = h
        .block_on(h.controller().controller_get_capabilities(pb::ControllerGetCapabilitiesRequest {}))
        .unwrap()
        .into_inner();
    assert_eq!(caps.capabilities.len(), 8);

    // With every node agent stopped, the controller's Probe says why it is not ready.
    h_stop_all_and_probe(h);
}

fn h_stop_all_and_probe(mut h: CsiCluster) {
    h.c.stop(0);
    h.c.stop(1);
    let e = h.block_on(h.controller_identity().probe(pb::ProbeRequest {})).unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(e.message().contains("no node agent answers"), "{e:?}");
}

#[test]
fn every_call_twice_is_idempotent() {
    if !can_stage() {
        return;
    }
    let h = CsiCluster::start(2);
    let cap = mount_cap("ext4");
    let id = "pvc-twice";
    let v1 = h.create(id, 64 * MIB, &[("mkfsOptions", "-m 0")], &cap).unwrap();
    let v2 = h.create(id, 64 * MIB, &[("mkfsOptions", "-m 0")], &cap).unwrap();
    assert_eq!(v1, v2);
    let p1 = h.publish(id, 0, &cap, false).unwrap();
    let p2 = h.publish(id, 0, &cap, false).unwrap();
    assert_eq!(p1, p2, "the same node, the same epoch");
    h.stage(0, id, &cap, &v1.volume_context, &p1).unwrap();
    h.stage(0, id, &cap, &v1.volume_context, &p1).unwrap();
    let t1 = h.node_publish(0, id, "pod", &cap, false).unwrap();
    let t2 = h.node_publish(0, id, "pod", &cap, false).unwrap();
    assert_eq!(t1, t2);
    assert_eq!(mounts_under(&h.c.dir).iter().filter(|m| m.mount_point == t1).count(), 1, "mounted once");
    // The mkfs options of the StorageClass were applied: no reserved blocks.
    let dev = mounts_under(&h.c.dir).into_iter().find(|m| m.mount_point == t1).unwrap().source;
    let dump = run(std::process::Command::new("dumpe2fs").args(["-h", &dev]));
    assert!(dump.lines().any(|l| l.starts_with("Reserved block count:") && l.trim().ends_with(" 0")), "{dump}");
    h.node_unpublish(0, id, "pod").unwrap();
    h.node_unpublish(0, id, "pod").unwrap();
    h.unstage(0, id).unwrap();
    h.unstage(0, id).unwrap();
    h.unpublish(id, 0).unwrap();
    h.unpublish(id, 0).unwrap();
    assert!(mounts_under(&h.c.dir).is_empty() && loop_devices_under(&h.c.dir).is_empty());
    let del = || {
        h.block_on(h.controller().delete_volume(pb::DeleteVolumeRequest { volume_id: id.into(), ..Default::default() }))
    };
    del().unwrap();
    del().unwrap();
    assert!(h.c.volume(0, id).is_err());
}

#[test]
fn bad_requests_get_the_spec_codes() {
    if !can_stage() {
        return;
    }
    let h = CsiCluster::start(3);
    let cap = mount_cap("ext4");
    let mut ctl = h.controller();

    // CreateVolume.
    let create = |r: pb::CreateVolumeRequest| h.block_on(h.controller().create_volume(r));
    let base = pb::CreateVolumeRequest {
        name: "pvc-bad".into(),
        capacity_range: Some(pb::CapacityRange { required_bytes: (64 * MIB) as i64, limit_bytes: 0 }),
        volume_capabilities: vec![cap.clone()],
        ..Default::default()
    };
    assert_eq!(code(create(pb::CreateVolumeRequest { name: String::new(), ..base.clone() })), Code::InvalidArgument);
    assert_eq!(
        code(create(pb::CreateVolumeRequest { volume_capabilities: vec![], ..base.clone() })),
        Code::InvalidArgument
    );
    let mut multi = cap.clone();
    multi.access_mode = Some(pb::volume_capability::AccessMode {
        mode: pb::volume_capability::access_mode::Mode::MultiNodeMultiWriter as i32,
    });
    let refused = |r: Result<tonic::Response<pb::CreateVolumeResponse>, tonic::Status>, reason: &str| {
        let e = r.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains(reason), "the message should say {reason:?}: {}", e.message());
    };
    // Several writers: a filesystem never (not a cluster filesystem), and raw block access
    // only on a multi-writer volume, which only the controller with --kubernetes creates.
    refused(
        create(pb::CreateVolumeRequest { volume_capabilities: vec![multi.clone()], ..base.clone() }),
        "not cluster filesystems",
    );
    let mut multi_block = block_cap();
    multi_block.access_mode = multi.access_mode;
    refused(
        create(pb::CreateVolumeRequest { volume_capabilities: vec![cap.clone(), multi_block.clone()], ..base.clone() }),
        "volume_capabilities[1]: access mode MULTI_NODE_MULTI_WRITER needs a multi-writer volume, which only the controller with --kubernetes creates",
    );
    assert_eq!(
        code(create(pb::CreateVolumeRequest { volume_capabilities: vec![mount_cap("btrfs")], ..base.clone() })),
        Code::InvalidArgument
    );
    let params = |k: &str, v: &str| [(k.to_string(), v.to_string())].into_iter().collect();
    assert_eq!(
        code(create(pb::CreateVolumeRequest { parameters: params("replicas", "4"), ..base.clone() })),
        Code::InvalidArgument
    );
    assert_eq!(
        code(create(pb::CreateVolumeRequest { parameters: params("replica", "2"), ..base.clone() })),
        Code::InvalidArgument
    );
    let source = pb::VolumeContentSource {
        r#type: Some(pb::volume_content_source::Type::Volume(pb::volume_content_source::VolumeSource {
            volume_id: "x".into(),
        })),
    };
    assert_eq!(
        code(create(pb::CreateVolumeRequest { volume_content_source: Some(source), ..base.clone() })),
        Code::InvalidArgument
    );
    // Beyond the pool: more than any node has.
    let huge = pb::CapacityRange { required_bytes: 1 << 60, limit_bytes: 0 };
    assert_eq!(
        code(create(pb::CreateVolumeRequest { capacity_range: Some(huge), ..base.clone() })),
        Code::ResourceExhausted
    );
    let inverted = pb::CapacityRange { required_bytes: (64 * MIB) as i64, limit_bytes: MIB as i64 };
    assert_eq!(
        code(create(pb::CreateVolumeRequest { capacity_range: Some(inverted), ..base.clone() })),
        Code::OutOfRange
    );
    // Nothing was created by the refused calls.
    for i in 0..3 {
        assert!(h.c.volume(i, "pvc-bad").is_err());
    }
    // The same name again with another size.
    let vol = h.create("pvc-bad", 64 * MIB, &[], &cap).unwrap();
    assert_eq!(
        code(create(pb::CreateVolumeRequest {
            capacity_range: Some(pb::CapacityRange { required_bytes: (128 * MIB) as i64, limit_bytes: 0 }),
            ..base.clone()
        })),
        Code::AlreadyExists
    );
    let holders: Vec<usize> = (0..3).filter(|i| h.c.volume(*i, "pvc-bad").is_ok()).collect();
    let outsider = (0..3).find(|i| !holders.contains(i)).unwrap();

    // Unknown volumes.
    assert_eq!(code(h.publish("pvc-nope", 0, &cap, false)), Code::NotFound);
    assert_eq!(code(h.unpublish("pvc-nope", 0)), Code::NotFound);
    assert_eq!(code(h.stage(0, "pvc-nope", &cap, &Default::default(), &Default::default())), Code::NotFound);
    let validate = |id: &str, caps: Vec<pb::VolumeCapability>| {
        h.block_on(h.controller().validate_volume_capabilities(pb::ValidateVolumeCapabilitiesRequest {
            volume_id: id.into(),
            volume_capabilities: caps,
            ..Default::default()
        }))
    };
    assert_eq!(code(validate("pvc-nope", vec![cap.clone()])), Code::NotFound);
    let expand = |id: &str| {
        h.block_on(h.controller().controller_expand_volume(pb::ControllerExpandVolumeRequest {
            volume_id: id.into(),
            capacity_range: Some(pb::CapacityRange { required_bytes: (128 * MIB) as i64, limit_bytes: 0 }),
            ..Default::default()
        }))
    };
    assert_eq!(code(expand("pvc-nope")), Code::NotFound);
    // Deleting what does not exist succeeds (idempotent).
    h.block_on(ctl.delete_volume(pb::DeleteVolumeRequest { volume_id: "pvc-nope".into(), ..Default::default() }))
        .unwrap();

    // Missing ids.
    assert_eq!(code(h.publish("", 0, &cap, false)), Code::InvalidArgument);
    assert_eq!(code(h.block_on(ctl.delete_volume(pb::DeleteVolumeRequest::default()))), Code::InvalidArgument);
    assert_eq!(
        code(h.block_on(ctl.controller_unpublish_volume(pb::ControllerUnpublishVolumeRequest::default()))),
        Code::InvalidArgument
    );
    assert_eq!(
        code(h.block_on(h.controller().controller_publish_volume(pb::ControllerPublishVolumeRequest {
            volume_id: "pvc-bad".into(),
            volume_capability: Some(cap.clone()),
            ..Default::default()
        }))),
        Code::InvalidArgument,
        "node_id missing"
    );
    assert_eq!(
        code(h.block_on(h.controller().controller_publish_volume(pb::ControllerPublishVolumeRequest {
            volume_id: "pvc-bad".into(),
            node_id: "node-1".into(),
            ..Default::default()
        }))),
        Code::InvalidArgument,
        "volume_capability missing"
    );
    let mut node = h.node(holders[0]);
    assert_eq!(
        code(h.block_on(node.node_stage_volume(pb::NodeStageVolumeRequest {
            staging_target_path: "/tmp/x".into(),
            volume_capability: Some(cap.clone()),
            ..Default::default()
        }))),
        Code::InvalidArgument
    );
    assert_eq!(
        code(h.block_on(node.node_stage_volume(pb::NodeStageVolumeRequest {
            volume_id: "pvc-bad".into(),
            volume_capability: Some(cap.clone()),
            ..Default::default()
        }))),
        Code::InvalidArgument,
        "staging path missing"
    );
    assert_eq!(
        code(h.block_on(node.node_stage_volume(pb::NodeStageVolumeRequest {
            volume_id: "pvc-bad".into(),
            staging_target_path: "relative/path".into(),
            volume_capability: Some(cap.clone()),
            ..Default::default()
        }))),
        Code::InvalidArgument,
        "relative staging path"
    );
    assert_eq!(
        code(h.block_on(node.node_publish_volume(pb::NodePublishVolumeRequest::default()))),
        Code::InvalidArgument
    );
    assert_eq!(
        code(h.block_on(node.node_unpublish_volume(pb::NodeUnpublishVolumeRequest::default()))),
        Code::InvalidArgument
    );
    assert_eq!(
        code(h.block_on(node.node_unstage_volume(pb::NodeUnstageVolumeRequest::default()))),
        Code::InvalidArgument
    );
    assert_eq!(
        code(h.block_on(node.node_get_volume_stats(pb::NodeGetVolumeStatsRequest::default()))),
        Code::InvalidArgument
    );
    assert_eq!(
        code(h.block_on(node.node_expand_volume(pb::NodeExpandVolumeRequest::default()))),
        Code::InvalidArgument
    );

    // Wrong capability on an existing volume: not confirmed, with a message.
    let v = validate("pvc-bad", vec![multi.clone()]).unwrap().into_inner();
    assert!(v.confirmed.is_none() && v.message.contains("MULTI_NODE_MULTI_WRITER"), "{v:?}");
    let v = validate("pvc-bad", vec![multi_block.clone()]).unwrap().into_inner();
    assert!(v.confirmed.is_none() && v.message.contains("--kubernetes"), "{v:?}");
    let v = validate("pvc-bad", vec![cap.clone()]).unwrap().into_inner();
    assert!(v.confirmed.is_some(), "{v:?}");
    assert_eq!(code(h.publish("pvc-bad", holders[0], &multi, false)), Code::InvalidArgument);
    let e = h.publish("pvc-bad", holders[0], &multi_block, false).unwrap_err();
    assert!(e.code() == Code::InvalidArgument && e.message().contains("--kubernetes"), "{e:?}");
    assert_eq!(
        code(h.stage(holders[0], "pvc-bad", &mount_cap("btrfs"), &vol.volume_context, &Default::default())),
        Code::InvalidArgument
    );

    // Publishing: a node without a replica, an unknown node, a second node.
    assert_eq!(code(h.publish("pvc-bad", outsider, &cap, false)), Code::FailedPrecondition);
    assert_eq!(
        code(h.block_on(h.controller().controller_publish_volume(pb::ControllerPublishVolumeRequest {
            volume_id: "pvc-bad".into(),
            node_id: "node-9".into(),
            volume_capability: Some(cap.clone()),
            ..Default::default()
        }))),
        Code::NotFound
    );
    h.publish("pvc-bad", holders[0], &cap, false).unwrap();
    let e = h.publish("pvc-bad", holders[1], &cap, false).unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "single writer: {e:?}");
    assert!(e.message().contains("published on one node at a time"), "{e:?}");
    // Publishing on the node before staging, and deleting a published volume.
    assert_eq!(code(h.node_publish(holders[0], "pvc-bad", "pod", &cap, false)), Code::FailedPrecondition);
    assert_eq!(
        code(h.block_on(
            ctl.delete_volume(pb::DeleteVolumeRequest { volume_id: "pvc-bad".into(), ..Default::default() })
        )),
        Code::FailedPrecondition
    );
    // Staging a volume on a node without its replica.
    assert_eq!(code(h.stage(outsider, "pvc-bad", &cap, &vol.volume_context, &Default::default())), Code::NotFound);
    // A pagination token that was never handed out.
    assert_eq!(
        code(h.block_on(ctl.list_volumes(pb::ListVolumesRequest { max_entries: 1, starting_token: "zebra".into() }))),
        Code::Aborted
    );

    // After all that, the volume is intact and usable, and every process still serves.
    let t = h.attach_pod(&vol, holders[0], "pod", &cap, false);
    let sums = write_files(&t, 2, 3);
    assert_eq!(read_sums(&t), sums);
    h.detach_pod("pvc-bad", holders[0], "pod");
    for i in 0..3 {
        assert!(h.block_on(h.node_identity(i).probe(pb::ProbeRequest {})).is_ok());
    }
}

#[test]
fn list_volumes_pages_and_capacity_accounts_for_replicas() {
    if !can_stage() {
        return;
    }
    let h = CsiCluster::start(3);
    let cap = mount_cap("ext4");
    let capacity = |replicas: &str| {
        h.block_on(h.controller().get_capacity(pb::GetCapacityRequest {
            parameters: [("replicas".to_string(), replicas.to_string())].into_iter().collect(),
            ..Default::default()
        }))
        .unwrap()
        .into_inner()
        .available_capacity
    };
    let node_space = |i: usize| {
        h.c.api(i, |mut c| async move {
            c.get_node(peersan_node_agent::api::pb::GetNodeRequest {}).await.map(|r| r.into_inner())
        })
        .unwrap()
    };
    let allocated_before: Vec<u64> = (0..3).map(|i| node_space(i).allocated_bytes).collect();
    // A 3-way volume needs room on all three nodes: GetCapacity is the smallest free space
    // (in whole MiB). Other tests write to the same disk meanwhile, so the free space is
    // sampled before and after the call.
    let min_free = || (0..3).map(|i| node_space(i).free_bytes).min().unwrap() / MIB * MIB;
    let lo = min_free();
    let reported = capacity("3") as u64;
    let hi = min_free();
    assert!(reported >= lo.min(hi) && reported <= lo.max(hi), "GetCapacity {reported} vs free {lo}..{hi}");
    assert!(reported > 256 * MIB, "{reported}");
    for i in 0..5 {
        h.create(&format!("pvc-list-{i}"), 32 * MIB, &[("replicas", "3")], &cap).unwrap();
    }
    for (i, before) in allocated_before.iter().enumerate() {
        let after = node_space(i);
        // Each replica counts at its full size (its data and its metadata area), not at the
        // few blocks the sparse file occupies.
        let files: u64 = (0..5)
            .map(|k| std::fs::metadata(h.c.members[i].replica_path(&format!("pvc-list-{k}"))).unwrap().len())
            .sum();
        assert!(files >= 5 * 32 * MIB);
        assert_eq!(after.allocated_bytes - before, files, "node {} accounts each replica at full size", i + 1);
        assert!(after.free_bytes <= after.capacity_bytes - after.allocated_bytes, "{after:?}");
    }
    let mut names = Vec::new();
    let mut token = String::new();
    loop {
        let page = h
            .block_on(
                h.controller().list_volumes(pb::ListVolumesRequest { max_entries: 2, starting_token: token.clone() }),
            )
            .unwrap()
            .into_inner();
        assert!(page.entries.len() <= 2);
        for e in &page.entries {
            let v = e.volume.as_ref().unwrap();
            assert_eq!(v.accessible_topology.len(), 3);
            let st = e.status.as_ref().unwrap();
            assert!(st.published_node_ids.is_empty());
            names.push(v.volume_id.clone());
        }
        if page.next_token.is_empty() {
            break;
        }
        token = page.next_token;
    }
    assert_eq!(names, (0..5).map(|i| format!("pvc-list-{i}")).collect::<Vec<_>>());
}

#[test]
fn create_completes_a_volume_an_earlier_attempt_left_partly_created() {
    if !can_stage() {
        return;
    }
    let mut h = CsiCluster::start(2);
    let cap = mount_cap("ext4");
    // An attempt that created node-1's replica while node-2 was down.
    h.c.stop(1);
    let size = 64 * MIB;
    let partial = h.c.api(0, |mut c| async move {
        c.create_volume(peersan_node_agent::api::pb::CreateVolumeRequest {
            name: "pvc-partial".into(),
            size_bytes: size,
            replicas: vec!["node-1".into(), "node-2".into()],
        })
        .await
    });
    assert!(partial.is_err(), "node-2 is down: {partial:?}");
    assert!(h.c.volume(0, "pvc-partial").is_ok());
    h.c.start(1).unwrap();
    assert!(h.c.volume(1, "pvc-partial").is_err(), "node-2 has no replica yet");
    // The provisioner retries CreateVolume: the volume is completed, not reported as is.
    let v = h.create("pvc-partial", size, &[("replicas", "2")], &cap).unwrap();
    assert_eq!(v.accessible_topology.len(), 2);
    assert!(h.c.volume(1, "pvc-partial").is_ok(), "node-2's replica was created");
    h.c.wait_healthy(0, "pvc-partial", std::time::Duration::from_secs(20)).unwrap();
}
