//! StorageClass parameters and volume capabilities: what peersan accepts, checked in one
//! place for the controller and the node.

use std::collections::HashMap;

use peersan_crds::WritePolicy;

use crate::error::{CsiError, CsiResult};
use crate::pb;
use crate::pb::volume_capability::access_mode::Mode;

/// StorageClass parameter: replicas per volume (1 to 3; default 2).
pub const PARAM_REPLICAS: &str = "replicas";
/// StorageClass parameter: extra options for mkfs when the node formats the volume
/// (e.g. `-E lazy_itable_init=0` or `-m 0`), split at whitespace.
pub const PARAM_MKFS_OPTIONS: &str = "mkfsOptions";
/// StorageClass parameter: the VirtualSAN whose nodes hold the volume's replicas (the
/// StorageClass the operator creates for each VirtualSAN sets it). Required when the
/// controller runs against Kubernetes; not used with a nodes file.
pub const PARAM_VIRTUAL_SAN: &str = "virtualSAN";
/// Prefix of the parameters that Kubernetes' external-provisioner adds or interprets
/// itself; they are ignored.
pub const RESERVED_PREFIX: &str = "csi.storage.k8s.io/";

pub const DEFAULT_REPLICAS: u32 = 2;
pub const MAX_REPLICAS: u32 = 3;

/// Filesystems the node can create and grow.
pub const FILESYSTEMS: [&str; 2] = ["ext4", "xfs"];
/// Filesystem when the capability names none.
pub const DEFAULT_FS: &str = "ext4";

/// The parsed StorageClass parameters of a volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeParams {
    pub replicas: u32,
    pub mkfs_options: Option<String>,
    pub virtual_san: Option<String>,
}

impl VolumeParams {
    /// Parses and checks `parameters`; unknown keys are refused, naming the known ones, so
    /// that a typo in a StorageClass does not go unnoticed.
    pub fn parse(parameters: &HashMap<String, String>) -> CsiResult<VolumeParams> {
        let mut p = VolumeParams { replicas: DEFAULT_REPLICAS, mkfs_options: None, virtual_san: None };
        for (k, v) in parameters {
            match k.as_str() {
                PARAM_REPLICAS => {
                    p.replicas = match v.trim().parse::<u32>() {
                        Ok(n) if (1..=MAX_REPLICAS).contains(&n) => n,
                        _ => {
                            return Err(CsiError::InvalidArgument(format!(
                                "parameter {PARAM_REPLICAS}: {v:?} is not a number from 1 to {MAX_REPLICAS}"
                            )));
                        }
                    }
                }
                PARAM_MKFS_OPTIONS => {
                    if v.contains(['\n', '\0']) {
                        return Err(CsiError::InvalidArgument(format!(
                            "parameter {PARAM_MKFS_OPTIONS}: must be one line of options"
                        )));
                    }
                    p.mkfs_options = Some(v.clone()).filter(|s| !s.trim().is_empty());
                }
                PARAM_VIRTUAL_SAN => {
                    if v.is_empty() {
                        return Err(CsiError::InvalidArgument(format!(
                            "parameter {PARAM_VIRTUAL_SAN}: must name a VirtualSAN"
                        )));
                    }
                    p.virtual_san = Some(v.clone());
                }
                k if k.starts_with(RESERVED_PREFIX) => {}
                k => {
                    return Err(CsiError::InvalidArgument(format!(
                        "unknown parameter {k:?}; peersan's StorageClass parameters are {PARAM_VIRTUAL_SAN}, {PARAM_REPLICAS} and {PARAM_MKFS_OPTIONS}"
                    )));
                }
            }
        }
        Ok(p)
    }

    /// The volume context handed to the node (NodeStageVolume reads mkfs options there).
    pub fn volume_context(&self) -> HashMap<String, String> {
        let mut m = HashMap::new();
        m.insert(PARAM_REPLICAS.to_owned(), self.replicas.to_string());
        if let Some(o) = &self.mkfs_options {
            m.insert(PARAM_MKFS_OPTIONS.to_owned(), o.clone());
        }
        if let Some(s) = &self.virtual_san {
            m.insert(PARAM_VIRTUAL_SAN.to_owned(), s.clone());
        }
        m
    }
}

/// How a capability asks for the volume: a raw block device, or a filesystem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    Block,
    Mount { fs_type: String, mount_flags: Vec<String> },
}

/// A checked volume capability.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capability {
    pub access: Access,
    pub mode: Mode,
}

impl Capability {
    /// True for the modes that never write.
    pub fn read_only_mode(&self) -> bool {
        matches!(self.mode, Mode::SingleNodeReaderOnly | Mode::MultiNodeReaderOnly)
    }

    /// True for MULTI_NODE_MULTI_WRITER (ReadWriteMany): several nodes write the volume at
    /// once, which only a multi-writer volume allows.
    pub fn multi_writer(&self) -> bool {
        self.mode == Mode::MultiNodeMultiWriter
    }
}

/// Checks one capability. Volumes are attached to one node at a time, except that
/// MULTI_NODE_MULTI_WRITER is accepted for raw block access (volumeMode Block: live
/// migration of virtual machines, clustered filesystems that lock their own blocks); the
/// controller then decides whether the volume allows several writers. Other multi-node
/// modes, and MULTI_NODE_MULTI_WRITER with a filesystem, are refused with
/// INVALID_ARGUMENT, which is what the spec asks for an unsupported capability.
pub fn capability(field: &str, c: &pb::VolumeCapability) -> CsiResult<Capability> {
    let mode = c
        .access_mode
        .as_ref()
        .ok_or_else(|| CsiError::InvalidArgument(format!("{field}.access_mode is required")))?
        .mode();
    match mode {
        Mode::SingleNodeWriter
        | Mode::SingleNodeReaderOnly
        | Mode::SingleNodeSingleWriter
        | Mode::MultiNodeMultiWriter => {}
        Mode::Unknown => return Err(CsiError::InvalidArgument(format!("{field}.access_mode.mode is required"))),
        m => {
            return Err(CsiError::InvalidArgument(format!(
                "{field}: access mode {} is not supported: a peersan volume is attached to one node at a time, \
                 or to several for MULTI_NODE_MULTI_WRITER with raw block access",
                m.as_str_name()
            )));
        }
    }
    let access = match &c.access_type {
        Some(pb::volume_capability::AccessType::Block(_)) => Access::Block,
        Some(pb::volume_capability::AccessType::Mount(_)) if mode == Mode::MultiNodeMultiWriter => {
            return Err(CsiError::InvalidArgument(format!(
                "{field}: access mode MULTI_NODE_MULTI_WRITER is supported only with raw block access \
                 (volumeMode: Block): {} are not cluster filesystems, and two nodes mounting one would corrupt it",
                FILESYSTEMS.join(" and ")
            )));
        }
        Some(pb::volume_capability::AccessType::Mount(m)) => {
            let fs = if m.fs_type.is_empty() { DEFAULT_FS.to_owned() } else { m.fs_type.to_ascii_lowercase() };
            if !FILESYSTEMS.contains(&fs.as_str()) {
                return Err(CsiError::InvalidArgument(format!(
                    "{field}: filesystem {:?} is not supported (supported: {})",
                    m.fs_type,
                    FILESYSTEMS.join(", ")
                )));
            }
            if !m.volume_mount_group.is_empty() {
                return Err(CsiError::InvalidArgument(format!("{field}: volume_mount_group is not supported")));
            }
            Access::Mount { fs_type: fs, mount_flags: m.mount_flags.clone() }
        }
        None => return Err(CsiError::InvalidArgument(format!("{field}: access_type (block or mount) is required"))),
    };
    Ok(Capability { access, mode })
}

/// Checks a non-empty list of capabilities.
pub fn capabilities(field: &str, caps: &[pb::VolumeCapability]) -> CsiResult<Vec<Capability>> {
    if caps.is_empty() {
        return Err(CsiError::InvalidArgument(format!("{field} is required")));
    }
    caps.iter().enumerate().map(|(i, c)| capability(&format!("{field}[{i}]"), c)).collect()
}

/// A write policy as the VirtualSAN and MirrorVolume specs spell it.
pub fn write_policy_name(p: WritePolicy) -> &'static str {
    match p {
        WritePolicy::SingleWriter => "SingleWriter",
        WritePolicy::MultiWriter => "MultiWriter",
    }
}

/// Checks that checked capabilities `caps` (of request field `field`) fit a volume of write
/// policy `policy`, which `source` names (a VirtualSAN or a volume): MULTI_NODE_MULTI_WRITER
/// needs a MultiWriter volume (the engines of a SingleWriter volume accept writes from the
/// Lease holder only). INVALID_ARGUMENT otherwise, naming `source` and its policy.
pub fn check_write_policy(field: &str, caps: &[Capability], policy: WritePolicy, source: &str) -> CsiResult<()> {
    let Some(i) = caps.iter().position(Capability::multi_writer) else { return Ok(()) };
    if policy == WritePolicy::MultiWriter {
        return Ok(());
    }
    Err(CsiError::InvalidArgument(format!(
        "{field}[{i}]: access mode MULTI_NODE_MULTI_WRITER needs a multi-writer volume, and {source} has writePolicy {}; \
         use a VirtualSAN with writePolicy MultiWriter for ReadWriteMany block volumes",
        write_policy_name(policy)
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(kv: &[(&str, &str)]) -> HashMap<String, String> {
        kv.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn parameters() {
        assert_eq!(VolumeParams::parse(&params(&[])).unwrap().replicas, 2);
        let p = VolumeParams::parse(&params(&[
            ("replicas", "3"),
            ("mkfsOptions", "-m 0"),
            ("csi.storage.k8s.io/pvc/name", "x"),
        ]))
        .unwrap();
        assert_eq!(p, VolumeParams { replicas: 3, mkfs_options: Some("-m 0".into()), virtual_san: None });
        let san = VolumeParams::parse(&params(&[("virtualSAN", "fast")])).unwrap();
        assert_eq!(san.virtual_san.as_deref(), Some("fast"));
        assert_eq!(san.volume_context()["virtualSAN"], "fast");
        assert!(VolumeParams::parse(&params(&[("virtualSAN", "")])).is_err());
        assert_eq!(p.volume_context()["mkfsOptions"], "-m 0");
        for bad in ["0", "4", "two", ""] {
            let e = VolumeParams::parse(&params(&[("replicas", bad)])).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{bad}");
        }
        let e = VolumeParams::parse(&params(&[("replica", "2")])).unwrap_err();
        assert!(e.to_string().contains("unknown parameter \"replica\""), "{e}");
    }

    fn cap(access: Option<pb::volume_capability::AccessType>, mode: Mode) -> pb::VolumeCapability {
        pb::VolumeCapability {
            access_type: access,
            access_mode: Some(pb::volume_capability::AccessMode { mode: mode as i32 }),
        }
    }

    #[test]
    fn capabilities_checked() {
        use pb::volume_capability::{AccessType, BlockVolume, MountVolume};
        let mount = |fs: &str| Some(AccessType::Mount(MountVolume { fs_type: fs.into(), ..Default::default() }));
        let c = capability("c", &cap(mount(""), Mode::SingleNodeWriter)).unwrap();
        assert_eq!(c.access, Access::Mount { fs_type: "ext4".into(), mount_flags: vec![] });
        assert!(capability("c", &cap(mount("xfs"), Mode::SingleNodeReaderOnly)).unwrap().read_only_mode());
        assert_eq!(
            capability("c", &cap(Some(AccessType::Block(BlockVolume {})), Mode::SingleNodeWriter)).unwrap().access,
            Access::Block
        );
        let block = || Some(AccessType::Block(BlockVolume {}));
        let rwx = capability("c", &cap(block(), Mode::MultiNodeMultiWriter)).unwrap();
        assert!(rwx.multi_writer() && !rwx.read_only_mode());
        assert_eq!(rwx.access, Access::Block);
        for (c, what) in [
            (cap(mount("btrfs"), Mode::SingleNodeWriter), "btrfs"),
            (cap(mount("ext4"), Mode::MultiNodeMultiWriter), "not cluster filesystems"),
            (cap(mount(""), Mode::MultiNodeMultiWriter), "volumeMode: Block"),
            (cap(block(), Mode::MultiNodeReaderOnly), "MULTI_NODE_READER_ONLY"),
            (cap(block(), Mode::MultiNodeSingleWriter), "MULTI_NODE_SINGLE_WRITER"),
            (cap(None, Mode::SingleNodeWriter), "access_type"),
            (cap(mount("ext4"), Mode::Unknown), "mode is required"),
        ] {
            let e = capability("c", &c).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument);
            assert!(e.to_string().contains(what), "{e}");
        }
        assert!(capabilities("volume_capabilities", &[]).is_err());
    }

    #[test]
    fn multi_writer_capabilities_need_a_multi_writer_volume() {
        use pb::volume_capability::{AccessType, BlockVolume};
        let block = |mode| capability("c", &cap(Some(AccessType::Block(BlockVolume {})), mode)).unwrap();
        let rwo = block(Mode::SingleNodeWriter);
        let rwx = block(Mode::MultiNodeMultiWriter);
        let caps = [rwo.clone(), rwx.clone()];
        assert!(check_write_policy("caps", &caps, WritePolicy::MultiWriter, "VirtualSAN vms").is_ok());
        assert!(check_write_policy("caps", &[rwo], WritePolicy::SingleWriter, "VirtualSAN fast").is_ok());
        let e = check_write_policy("caps", &caps, WritePolicy::SingleWriter, "VirtualSAN fast").unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        let m = e.to_string();
        assert!(m.starts_with("caps[1]:") && m.contains("VirtualSAN fast has writePolicy SingleWriter"), "{m}");
    }
}
