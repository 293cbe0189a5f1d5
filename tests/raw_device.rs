//! Replicas on raw block devices (loop devices here) instead of pool files.

mod common;
use common::*;
use std::process::Command;
use std::time::Duration;

/// A loop device over a sparse file, detached on drop.
struct LoopDevice {
    path: String,
}

impl LoopDevice {
    fn new(backing: &std::path::Path, bytes: u64) -> LoopDevice {
        std::fs::File::create(backing).unwrap().set_len(bytes).unwrap();
        let path = run(Command::new("losetup").args(["-f", "--show"]).arg(backing)).trim().to_string();
        LoopDevice { path }
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.path]).status();
    }
}

#[test]
fn replicas_on_loop_devices() {
    if !is_root() {
        eprintln!("SKIPPED: needs root to attach loop devices; CI runs as root");
        return;
    }
    if !have("qemu-io") || !have("qemu-img") || !have("losetup") {
        return;
    }
    let size = 24 * MIB;
    let dir = test_dir();
    // Devices larger than needed, with stale bytes where the metadata goes: the agent must
    // initialise them, not trust them.
    let devs: Vec<LoopDevice> =
        (0..2).map(|i| LoopDevice::new(&dir.path().join(format!("disk{i}.img")), size + 4 * MIB)).collect();
    for d in &devs {
        std::fs::write(&d.path, vec![0x5a; 8192]).unwrap();
    }
    let mut vol = VolumeDef::new("vol", size, vec![0, 1]);
    vol.devices = devs.iter().enumerate().map(|(i, d)| (i, d.path.clone().into())).collect();
    let mut c = start_cluster(dir.path(), 2, vec![vol], |_| {});
    c.wait_healthy(0, "vol", Duration::from_secs(20)).unwrap();
    // Replicas on devices take nothing from the pool.
    assert_eq!(c.node(0).unwrap().allocated_bytes, 0);
    let mut image = Image::new(size);
    random_writes(&c.members[0].nbd_uri("vol"), &mut image, 150, 81, dir.path());
    assert_same("read through node-2", &read_volume(&c.members[1].nbd_uri("vol"), dir.path()), &image.data);
    // Restart: the devices' metadata is found again and the data kept.
    for i in 0..2 {
        c.stop(i);
    }
    c.start_all().unwrap();
    c.wait_healthy(0, "vol", Duration::from_secs(20)).unwrap();
    assert_same("after restart", &read_volume(&c.members[0].nbd_uri("vol"), dir.path()), &image.data);
    for i in 0..2 {
        c.stop(i);
    }
    for d in &devs {
        let data = read_replica_data(std::path::Path::new(&d.path)).unwrap();
        assert_same(&format!("device {}", d.path), &data, &image.data);
    }

    // A device that holds another volume's replica is never taken over.
    let other_dir = dir.path().join("other");
    let mut other = VolumeDef::new("other", size, vec![0]);
    other.devices.push((0, devs[0].path.clone().into()));
    let mut o = LocalCluster::new(&other_dir, &agent_bin(), 1, vec![other]).unwrap();
    let err = o.start(0).unwrap_err().to_string();
    assert!(err.contains("exited"), "{err}");
    let log = std::fs::read_to_string(o.members[0].log_path()).unwrap();
    assert!(log.contains("belongs to volume \"vol\""), "{log}");
    let data = read_replica_data(std::path::Path::new(&devs[0].path)).unwrap();
    assert_same("device after the refused start", &data, &image.data);
}
