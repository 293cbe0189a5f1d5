//! Configuration of a node agent in standalone mode (`peersan-node-agent --config node.yaml`).
//!
//! ```yaml
//! node:
//!   name: node-a
//! listen:
//!   peer: 127.0.0.1:7001          # peer protocol (TCP)
//!   api: /run/peersan/api.sock    # agent API (gRPC on a unix socket)
//!   nbd_unix: /run/peersan/nbd.sock
//!   nbd_tcp: 127.0.0.1:10809      # optional; loopback only unless nbd_tcp_allow_remote
//! pool:
//!   path: /var/lib/peersan/pool
//! secret_file: /etc/peersan/peer-secret
//! peers:
//!   - { name: node-b, address: 127.0.0.1:7002 }
//! volumes:
//!   - name: vol1
//!     size: 1GiB
//!     replicas: [node-a, node-b]
//!     device: /dev/vdb            # optional: raw device for this node's replica
//! timeouts:
//!   peer_io: 5s
//!   connect: 2s
//! resync:
//!   rate: 100MiB                  # per second and volume; 0 = unlimited
//! degraded_writes: allow          # or refuse: writes fail while a replica is unreachable
//! ```
//!
//! Unknown keys are rejected by serde (the message names the key and its line); values are
//! checked by [`Config::validate`], whose messages name the key and the problem.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::replica::BLOCK_SIZE;

/// Highest replica count of a volume (write frames carry replica sets as 32-bit masks).
pub const MAX_REPLICAS: usize = 32;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub node: NodeConfig,
    #[serde(default)]
    pub listen: ListenConfig,
    pub pool: PoolConfig,
    pub secret_file: PathBuf,
    #[serde(default)]
    pub peers: Vec<PeerConfig>,
    #[serde(default)]
    pub volumes: Vec<VolumeConfig>,
    #[serde(default)]
    pub timeouts: Timeouts,
    #[serde(default)]
    pub resync: ResyncConfig,
    /// What a volume does with writes while one of its replicas is unreachable.
    #[serde(default)]
    pub degraded_writes: DegradedWrites,
    /// The CSI Node service; absent = not served (standalone use without Kubernetes).
    #[serde(default)]
    pub csi: Option<CsiConfig>,
    /// Set by Kubernetes mode (never read from a file): volumes are created, grown and
    /// deleted from MirrorVolumes and write priority comes from Leases, so the agent API
    /// refuses to change them itself.
    #[serde(skip)]
    pub kubernetes: bool,
}

/// Where the node agent serves CSI and keeps what staging set up.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CsiConfig {
    /// Socket kubelet reaches the node plugin on, e.g.
    /// `/var/lib/kubelet/plugins/csi.peersan.io/csi.sock`.
    pub socket: PathBuf,
    /// Stage records (kept across agent restarts so unstage can undo an earlier process's
    /// work). Default: `<pool.path>/csi`.
    #[serde(default)]
    pub state_dir: Option<PathBuf>,
    /// Where the FUSE exports of staged volumes are mounted. Default:
    /// `/run/peersan/<node.name>/fuse`.
    #[serde(default)]
    pub fuse_dir: Option<PathBuf>,
}

impl CsiConfig {
    pub fn state_dir(&self, c: &Config) -> PathBuf {
        self.state_dir.clone().unwrap_or_else(|| c.pool.path.join("csi"))
    }

    pub fn fuse_dir(&self, c: &Config) -> PathBuf {
        self.fuse_dir.clone().unwrap_or_else(|| PathBuf::from(format!("/run/peersan/{}/fuse", c.node.name)))
    }
}

/// What a volume does with writes while one of its replicas does not receive them
/// (unreachable, its agent down, or not grown as far as the write reaches).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DegradedWrites {
    /// Writes go on to the replicas that receive them; what the others missed is marked in
    /// the out-of-sync bitmaps and copied to them when they return.
    #[default]
    Allow,
    /// Writes fail with EIO until every replica receives them again (nothing is written when
    /// a replica is known to be missing before the write starts).
    Refuse,
}

/// How resynchronisation may load the node.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResyncConfig {
    /// Bytes per second one volume's resync may copy (`0` = unlimited), so that foreground
    /// I/O keeps its latency while a replica catches up.
    #[serde(default = "default_resync_rate")]
    pub rate: ByteSize,
}

fn default_resync_rate() -> ByteSize {
    ByteSize(100 << 20)
}

impl Default for ResyncConfig {
    fn default() -> Self {
        Self { rate: default_resync_rate() }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    pub name: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenConfig {
    #[serde(default = "default_peer")]
    pub peer: SocketAddr,
    #[serde(default = "default_api")]
    pub api: PathBuf,
    #[serde(default = "default_nbd_unix")]
    pub nbd_unix: PathBuf,
    #[serde(default)]
    pub nbd_tcp: Option<SocketAddr>,
    #[serde(default)]
    pub nbd_tcp_allow_remote: bool,
}

fn default_peer() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 7700))
}
fn default_api() -> PathBuf {
    PathBuf::from("/run/peersan/api.sock")
}
fn default_nbd_unix() -> PathBuf {
    PathBuf::from("/run/peersan/nbd.sock")
}

impl Default for ListenConfig {
    fn default() -> Self {
        Self {
            peer: default_peer(),
            api: default_api(),
            nbd_unix: default_nbd_unix(),
            nbd_tcp: None,
            nbd_tcp_allow_remote: false,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    pub path: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    pub name: String,
    pub address: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct VolumeConfig {
    pub name: String,
    pub size: ByteSize,
    pub replicas: Vec<String>,
    #[serde(default)]
    pub device: Option<PathBuf>,
    /// Whether one node (the write-priority holder) or several may write the volume at once.
    /// Every replica's configuration must say the same.
    #[serde(default)]
    pub write_policy: WritePolicy,
    /// Multi-writer volumes: bytes per region of write priority (a power of two from 4 KiB to
    /// 4 MiB; default 1 MiB). Every replica's configuration must say the same.
    #[serde(default)]
    pub region_size: Option<ByteSize>,
}

/// Who may write a volume (see `engine/POLICING.md`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum WritePolicy {
    /// Only the node holding write priority (the volume's Lease, or `promote`) writes.
    #[default]
    SingleWriter,
    /// Every replica node writes; write priority is negotiated per region between the
    /// engines, the priority holder arbitrating.
    MultiWriter,
}

/// Default region size of multi-writer volumes.
pub const DEFAULT_REGION_SIZE: u64 = 1 << 20;
/// Region sizes allowed: a whole number of bitmap blocks, inside one activity-log extent.
pub const MIN_REGION_SIZE: u64 = 4096;
pub const MAX_REGION_SIZE: u64 = 4 << 20;

impl VolumeConfig {
    /// The region size of a multi-writer volume; None for single-writer volumes.
    pub fn policing_region(&self) -> Option<u64> {
        (self.write_policy == WritePolicy::MultiWriter).then(|| self.region_size.map_or(DEFAULT_REGION_SIZE, |b| b.0))
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Timeouts {
    /// How long a peer may take to answer one request before it is dropped from the
    /// in-sync set.
    #[serde(default = "default_peer_io", with = "humantime_serde")]
    pub peer_io: Duration,
    /// TCP connect and handshake timeout.
    #[serde(default = "default_connect", with = "humantime_serde")]
    pub connect: Duration,
}

fn default_peer_io() -> Duration {
    Duration::from_secs(5)
}
fn default_connect() -> Duration {
    Duration::from_secs(2)
}

impl Default for Timeouts {
    fn default() -> Self {
        Self { peer_io: default_peer_io(), connect: default_connect() }
    }
}

/// Durations written as `500ms`, `5s`, `2m`.
mod humantime_serde {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{}ms", d.as_millis()))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        super::parse_duration(&s).map_err(serde::de::Error::custom)
    }
}

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("{s:?} is not a duration (examples: 500ms, 5s, 2m)"))?;
    let ms = match unit {
        "ms" => n,
        "s" | "" => n * 1000,
        "m" => n * 60_000,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (use ms, s or m)")),
    };
    Ok(Duration::from_millis(ms))
}

/// A size in bytes, written as a number or with a unit: `4096`, `64MiB`, `1GiB`, `1G`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub fn parse(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let n: u64 = num.parse().map_err(|_| format!("{s:?} is not a size (examples: 1GiB, 512MiB, 4096)"))?;
        let mult: u64 = match unit.trim() {
            "" | "B" => 1,
            "K" | "KiB" | "k" => 1 << 10,
            "M" | "MiB" => 1 << 20,
            "G" | "GiB" => 1 << 30,
            "T" | "TiB" => 1 << 40,
            u => return Err(format!("{s:?}: unknown unit {u:?} (use B, KiB, MiB, GiB or TiB)")),
        };
        n.checked_mul(mult).map(ByteSize).ok_or_else(|| format!("{s:?} is too large"))
    }
}

impl Serialize for ByteSize {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(self.0)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(ByteSize(n)),
            Raw::S(s) => ByteSize::parse(&s).map_err(serde::de::Error::custom),
        }
    }
}

/// A configuration error: the key and what is wrong with it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{key}: {problem}")]
    Invalid { key: String, problem: String },
}

fn invalid(key: impl Into<String>, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { key: key.into(), problem: problem.into() }
}

/// Checks a node or volume name: 1 to 63 characters, lowercase letters, digits and '-',
/// starting and ending with a letter or digit (a DNS label, as Kubernetes names are).
pub fn check_name(key: &str, name: &str) -> Result<(), ConfigError> {
    let ok_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-';
    if name.is_empty() || name.len() > 63 {
        return Err(invalid(key, format!("{name:?} must be 1 to 63 characters long")));
    }
    if !name.chars().all(ok_char) || name.starts_with('-') || name.ends_with('-') {
        return Err(invalid(
            key,
            format!(
                "{name:?} may contain only lowercase letters, digits and '-', and must start and end with a letter or digit"
            ),
        ));
    }
    Ok(())
}

/// Checks a node name: a Kubernetes node name (a DNS subdomain): at most 253 characters,
/// dot-separated labels of lowercase letters, digits and '-', each 1 to 63 characters long and
/// starting and ending with a letter or digit (`node-a`, `worker-1.example.com`).
pub fn check_node_name(key: &str, name: &str) -> Result<(), ConfigError> {
    if name.is_empty() || name.len() > 253 {
        return Err(invalid(key, format!("{name:?} must be 1 to 253 characters long")));
    }
    for label in name.split('.') {
        check_name(key, label).map_err(|_| {
            invalid(
                key,
                format!(
                    "{name:?} must be dot-separated parts of 1 to 63 lowercase letters, digits and '-', each starting and ending with a letter or digit"
                ),
            )
        })?;
    }
    Ok(())
}

/// Checks a volume definition against the set of known node names.
pub fn check_volume(key: &str, v: &VolumeConfig, known_nodes: &BTreeSet<&str>, me: &str) -> Result<(), ConfigError> {
    check_name(&format!("{key}.name"), &v.name)?;
    if v.size.0 == 0 || !v.size.0.is_multiple_of(BLOCK_SIZE) {
        return Err(invalid(format!("{key}.size"), format!("{} bytes is not a positive multiple of 4096", v.size.0)));
    }
    if v.replicas.is_empty() || v.replicas.len() > MAX_REPLICAS {
        return Err(invalid(
            format!("{key}.replicas"),
            format!("needs 1 to {MAX_REPLICAS} nodes, has {}", v.replicas.len()),
        ));
    }
    let mut seen = BTreeSet::new();
    for (j, r) in v.replicas.iter().enumerate() {
        if !seen.insert(r.as_str()) {
            return Err(invalid(
                format!("{key}.replicas[{j}]"),
                format!("node {r:?} is listed twice; replicas must be on distinct nodes"),
            ));
        }
        if !known_nodes.contains(r.as_str()) {
            return Err(invalid(
                format!("{key}.replicas[{j}]"),
                format!("node {r:?} is neither this node nor one of `peers`"),
            ));
        }
    }
    if !seen.contains(me) {
        return Err(invalid(
            format!("{key}.replicas"),
            format!("this node ({me}) does not hold a replica of the volume"),
        ));
    }
    if let Some(r) = v.region_size {
        if v.write_policy != WritePolicy::MultiWriter {
            return Err(invalid(
                format!("{key}.region_size"),
                "applies only to write_policy: multi-writer volumes".to_string(),
            ));
        }
        if !r.0.is_power_of_two() || !(MIN_REGION_SIZE..=MAX_REGION_SIZE).contains(&r.0) {
            return Err(invalid(
                format!("{key}.region_size"),
                format!("{} bytes is not a power of two from 4KiB to 4MiB", r.0),
            ));
        }
    }
    Ok(())
}

impl Config {
    /// Reads, parses and validates a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
        Self::parse(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse { path: path.into(), message },
            other => other,
        })
    }

    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let cfg: Config = serde_yaml::from_str(text)
            .map_err(|e| ConfigError::Parse { path: PathBuf::from("<config>"), message: e.to_string() })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks every value; the error names the key and the problem.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_node_name("node.name", &self.node.name)?;
        if !self.pool.path.is_absolute() {
            return Err(invalid("pool.path", format!("{} must be an absolute path", self.pool.path.display())));
        }
        if let Some(addr) = self.listen.nbd_tcp
            && !addr.ip().is_loopback()
            && !self.listen.nbd_tcp_allow_remote
        {
            return Err(invalid(
                "listen.nbd_tcp",
                format!(
                    "{addr} is not a loopback address; NBD has no authentication, so set listen.nbd_tcp_allow_remote: true to serve it beyond this host"
                ),
            ));
        }
        if let Some(csi) = &self.csi {
            for (key, p) in [
                ("csi.socket", Some(&csi.socket)),
                ("csi.state_dir", csi.state_dir.as_ref()),
                ("csi.fuse_dir", csi.fuse_dir.as_ref()),
            ] {
                if let Some(p) = p
                    && !p.is_absolute()
                {
                    return Err(invalid(key, format!("{} must be an absolute path", p.display())));
                }
            }
        }
        let mut nodes = BTreeSet::from([self.node.name.as_str()]);
        for (i, p) in self.peers.iter().enumerate() {
            check_node_name(&format!("peers[{i}].name"), &p.name)?;
            if !nodes.insert(p.name.as_str()) {
                return Err(invalid(format!("peers[{i}].name"), format!("{:?} is this node or another peer", p.name)));
            }
            if !p.address.contains(':')
                || p.address.rsplit(':').next().and_then(|port| port.parse::<u16>().ok()).is_none()
            {
                return Err(invalid(format!("peers[{i}].address"), format!("{:?} must be host:port", p.address)));
            }
        }
        let mut names = BTreeSet::new();
        for (i, v) in self.volumes.iter().enumerate() {
            let key = format!("volumes[{i}]");
            check_volume(&key, v, &nodes, &self.node.name)?;
            if !names.insert(v.name.as_str()) {
                return Err(invalid(format!("{key}.name"), format!("volume {:?} is defined twice", v.name)));
            }
        }
        if self.timeouts.peer_io < Duration::from_millis(100) || self.timeouts.peer_io > Duration::from_secs(600) {
            return Err(invalid("timeouts.peer_io", "must be between 100ms and 10m"));
        }
        if self.timeouts.connect < Duration::from_millis(50) || self.timeouts.connect > Duration::from_secs(60) {
            return Err(invalid("timeouts.connect", "must be between 50ms and 60s"));
        }
        Ok(())
    }

    pub fn peer_address(&self, name: &str) -> Option<&str> {
        self.peers.iter().find(|p| p.name == name).map(|p| p.address.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
node: { name: a }
listen: { peer: "127.0.0.1:7001", api: /tmp/a.sock, nbd_unix: /tmp/a-nbd.sock }
pool: { path: /tmp/pool-a }
secret_file: /tmp/secret
peers:
  - { name: b, address: "127.0.0.1:7002" }
volumes:
  - { name: v1, size: 64MiB, replicas: [a, b] }
timeouts: { peer_io: 750ms }
resync: { rate: 20MiB }
"#;

    #[test]
    fn good_config_parses() {
        let c = Config::parse(GOOD).unwrap();
        assert_eq!(c.volumes[0].size, ByteSize(64 << 20));
        assert_eq!(c.timeouts.peer_io, Duration::from_millis(750));
        assert_eq!(c.timeouts.connect, Duration::from_secs(2));
        assert_eq!(c.resync.rate, ByteSize(20 << 20));
    }

    fn err(text: &str) -> String {
        Config::parse(text).unwrap_err().to_string()
    }

    #[test]
    fn unknown_key_is_named() {
        let e = err(&GOOD.replace("secret_file:", "secrte: x\nsecret_file:"));
        assert!(e.contains("unknown field `secrte`"), "{e}");
        let e = err(&GOOD.replace("size: 64MiB", "size: 64MiB, sise: 3"));
        assert!(e.contains("unknown field `sise`"), "{e}");
    }

    #[test]
    fn node_names_are_kubernetes_node_names() {
        let c = Config::parse(
            &GOOD.replace("name: a }", "name: worker-1.example.com }").replace("[a, b]", "[worker-1.example.com, b]"),
        )
        .unwrap();
        assert_eq!(c.node.name, "worker-1.example.com");
        for bad in ["a..b", ".a", "a.", "a_b", "a.-b"] {
            let e = err(&GOOD.replace("name: a }", &format!("name: \"{bad}\" }}")));
            assert!(e.contains("node.name"), "{bad}: {e}");
        }
    }

    #[test]
    fn invalid_values_are_named() {
        let cases = [
            ("size: 64MiB", "size: 1000", "volumes[0].size"),
            ("size: 64MiB", "size: 3XB", "unknown unit"),
            ("replicas: [a, b]", "replicas: [a, c]", "volumes[0].replicas[1]"),
            ("replicas: [a, b]", "replicas: [a, a]", "listed twice"),
            ("replicas: [a, b]", "replicas: [b]", "does not hold a replica"),
            ("name: a }", "name: A }", "node.name"),
            ("/tmp/pool-a", "pool-a", "pool.path"),
            ("\"127.0.0.1:7002\"", "nohost", "peers[0].address"),
            ("peer_io: 750ms", "peer_io: 1ms", "timeouts.peer_io"),
            ("peer_io: 750ms", "peer_io: 5 parsecs", "timeouts"),
            ("rate: 20MiB", "rate: fast", "resync"),
            ("replicas: [a, b] }", "replicas: [a, b], region_size: 1MiB }", "only to write_policy: multi-writer"),
            ("replicas: [a, b] }", "replicas: [a, b], write_policy: multi-writer, region_size: 3MiB }", "power of two"),
            ("replicas: [a, b] }", "replicas: [a, b], write_policy: multi-writer, region_size: 8MiB }", "4KiB to 4MiB"),
            ("replicas: [a, b] }", "replicas: [a, b], write_policy: many }", "write_policy"),
        ];
        for (from, to, want) in cases {
            let e = err(&GOOD.replace(from, to));
            assert!(e.contains(want), "{from} -> {to}: {e}");
        }
    }

    #[test]
    fn write_policy_and_region_size() {
        let c = Config::parse(GOOD).unwrap();
        assert_eq!(c.volumes[0].write_policy, WritePolicy::SingleWriter);
        assert_eq!(c.volumes[0].policing_region(), None);
        let c = Config::parse(&GOOD.replace("replicas: [a, b] }", "replicas: [a, b], write_policy: multi-writer }"))
            .unwrap();
        assert_eq!(c.volumes[0].policing_region(), Some(DEFAULT_REGION_SIZE));
        let t =
            GOOD.replace("replicas: [a, b] }", "replicas: [a, b], write_policy: multi-writer, region_size: 64KiB }");
        assert_eq!(Config::parse(&t).unwrap().volumes[0].policing_region(), Some(64 << 10));
    }

    #[test]
    fn remote_nbd_needs_opt_in() {
        let t = GOOD.replace("nbd_unix: /tmp/a-nbd.sock", "nbd_unix: /tmp/a-nbd.sock, nbd_tcp: \"0.0.0.0:10809\"");
        assert!(err(&t).contains("listen.nbd_tcp"));
        let t = t.replace("nbd_tcp: \"0.0.0.0:10809\"", "nbd_tcp: \"0.0.0.0:10809\", nbd_tcp_allow_remote: true");
        Config::parse(&t).unwrap();
    }
}
