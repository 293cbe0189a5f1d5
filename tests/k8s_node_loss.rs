//! Node loss on a real API server: the agent of the node holding write priority is killed;
//! its heartbeat Lease expires; the operator marks the node offline and its replica
//! disconnected, reports the VirtualSAN and the volume Degraded, and moves write priority to
//! a surviving in-sync replica with a higher epoch, where writes go on. When the agent comes
//! back, its replica resynchronises and everything is Ready again, with every write there.

mod common;
#[path = "k8s/harness.rs"]
mod k8s;
#[path = "common/kube.rs"]
mod kube_cluster;

use std::time::Duration;

use kube_cluster::{KubeCluster, condition, try_qemu_io};
use peersan_crds::mirrorvolume::{ReplicaState, VolumeHealth};
use peersan_crds::virtualsan::MemberState;
use peersan_csi_driver::pb;
use serde_json::json;

const MIB: i64 = 1 << 20;
const T: Duration = Duration::from_secs(60);

#[test]
fn write_priority_moves_off_a_lost_node_and_the_node_resyncs_on_return() {
    if !common::have("qemu-io") {
        return;
    }
    let names = ["node-a", "node-b", "node-c"];
    let Some(mut c) = KubeCluster::start(&names) else { return };
    c.apply(&c.virtual_san("triple", &names, 3, json!({ "mode": "Cluster" })));
    c.wait("VirtualSAN triple Ready", T, |c| {
        let st = c.get_san("triple").and_then(|s| s.status).ok_or("no status")?;
        match condition(&st.conditions, "Ready") {
            Some((s, ..)) if s == "True" => Ok(()),
            other => Err(format!("{other:?} {:?}", st.nodes)),
        }
    });

    // A 3-way volume published on node-c, written there.
    let mut csi = c.controller();
    let vol = "pvc-lost-node";
    c.block_on(csi.create_volume(pb::CreateVolumeRequest {
        name: vol.into(),
        capacity_range: Some(pb::CapacityRange { required_bytes: 32 * MIB, limit_bytes: 0 }),
        volume_capabilities: vec![common::csi::mount_cap("ext4")],
        parameters: [("virtualSAN".to_owned(), "triple".to_owned())].into(),
        ..Default::default()
    }))
    .expect("CreateVolume");
    c.block_on(csi.controller_publish_volume(pb::ControllerPublishVolumeRequest {
        volume_id: vol.into(),
        node_id: "node-c".into(),
        volume_capability: Some(common::csi::mount_cap("ext4")),
        ..Default::default()
    }))
    .expect("publish on node-c");
    let (holder, epoch) = c.write_priority(vol).unwrap();
    assert_eq!(holder, "node-c");
    try_qemu_io(&c.node("node-c").nbd_uri(vol), &["write -P 0x41 0 4M".into()]).expect("write on node-c");
    c.wait("the volume Healthy", T, |c| {
        let h = c.get_volume(vol).and_then(|v| v.status).and_then(|s| s.health);
        if h == Some(VolumeHealth::Healthy) { Ok(()) } else { Err(format!("{h:?}")) }
    });

    // node-c's agent dies.
    c.node_mut("node-c").agent.kill();
    let moved = c.wait("write priority moved off node-c and node-c offline", T, |c| {
        let st = c.get_san("triple").and_then(|s| s.status).ok_or("no status")?;
        let offline = st.nodes.iter().any(|m| m.name == "node-c" && m.state == MemberState::Offline);
        let degraded = condition(&st.conditions, "Degraded").is_some_and(|(s, ..)| s == "True");
        let wp = c.write_priority(vol);
        match &wp {
            Some((h, e)) if offline && degraded && h != "node-c" && *e > epoch => Ok((h.clone(), *e)),
            _ => {
                Err(format!("nodes {:?}, Degraded {:?}, Lease {wp:?}", st.nodes, condition(&st.conditions, "Degraded")))
            }
        }
    });
    assert_eq!(moved.0, "node-a", "the lowest-named in-sync replica on a live node takes over");
    let v = c.get_volume(vol).unwrap();
    let st = v.status.unwrap();
    assert_eq!(st.health, Some(VolumeHealth::Degraded));
    let lost = st.replicas.iter().find(|r| r.node == "node-c").expect("node-c's replica entry");
    assert_eq!(lost.state, ReplicaState::Disconnected);
    let events = c.kubectl(&["get", "events", "-A", "-o", "custom-columns=REASON:.reason,OBJECT:.regarding.name"]);
    assert!(events.contains("WritePriorityMoved"), "no WritePriorityMoved event:\n{events}");

    // The new holder writes (the engine there took the Lease's epoch).
    c.wait("node-a's replica at the new epoch", T, |c| {
        let st = c.get_volume(vol).and_then(|v| v.status).ok_or("no status")?;
        let a = st.replicas.iter().find(|r| r.node == "node-a").ok_or("no entry")?;
        if a.epoch == Some(moved.1 as i64) && a.writer.as_deref() == Some("node-a") {
            Ok(())
        } else {
            Err(format!("{a:?}"))
        }
    });
    try_qemu_io(&c.node("node-a").nbd_uri(vol), &["read -P 0x41 0 4M".into(), "write -P 0x42 4M 4M".into()])
        .expect("node-a reads what node-c wrote and writes");

    // node-c comes back: it resynchronises what it missed; everything is Ready again.
    let kubeconfig = c.server.kubeconfig.clone();
    c.node_mut("node-c").agent.start(&kubeconfig);
    c.wait("node-c back, the volume Healthy and the VirtualSAN Ready", Duration::from_secs(90), |c| {
        let san = c.get_san("triple").and_then(|s| s.status).ok_or("no status")?;
        let v = c.get_volume(vol).and_then(|v| v.status).ok_or("no volume status")?;
        let ready = condition(&san.conditions, "Ready").is_some_and(|(s, ..)| s == "True");
        let degraded = condition(&san.conditions, "Degraded").is_some_and(|(s, ..)| s == "True");
        let c_in_sync = v.replicas.iter().any(|r| r.node == "node-c" && r.state == ReplicaState::InSync);
        if ready && !degraded && v.health == Some(VolumeHealth::Healthy) && c_in_sync {
            Ok(())
        } else {
            Err(format!("Ready {ready} Degraded {degraded} health {:?} replicas {:?}", v.health, v.replicas))
        }
    });
    assert_eq!(c.write_priority(vol).map(|w| w.0).as_deref(), Some("node-a"), "priority stays with node-a");
    // node-c holds every write, including those made while it was down.
    try_qemu_io(&c.node("node-c").nbd_uri(vol), &["read -P 0x41 0 4M".into(), "read -P 0x42 4M 4M".into()])
        .expect("node-c's replica has every write");
    // The returned holder is fenced: it cannot write at its old epoch.
    let refused = try_qemu_io(&c.node("node-c").nbd_uri(vol), &["write -P 0x66 0 64k".into()]);
    assert!(refused.is_err(), "node-c must not write after losing write priority: {refused:?}");

    // A deleted write-priority Lease is made again by the operator, at a newer epoch than
    // any replica has seen, for an in-sync replica.
    let (_, before) = c.write_priority(vol).unwrap();
    let lease = peersan_crds::lease::volume_lease_name(vol).unwrap();
    c.kubectl(&["delete", "lease", "-n", kube_cluster::NAMESPACE, &lease]);
    let (holder, after) = c.wait("the Lease made again", T, |c| c.write_priority(vol).ok_or("no Lease".to_owned()));
    assert!(after > before, "epoch {after} after {before}");
    let mv = c.get_volume(vol).unwrap();
    assert!(mv.spec.replicas.contains(&holder));
    c.wait("every replica at the new epoch", T, |c| {
        let st = c.get_volume(vol).and_then(|v| v.status).ok_or("no status")?;
        let all =
            st.replicas.iter().all(|r| r.epoch == Some(after as i64) && r.writer.as_deref() == Some(holder.as_str()));
        if all && st.replicas.len() == 3 { Ok(()) } else { Err(format!("{:?}", st.replicas)) }
    });
    try_qemu_io(&c.node(&holder).nbd_uri(vol), &["write -P 0x43 8M 1M".into(), "read -P 0x41 0 4M".into()])
        .expect("the new holder writes");
}
