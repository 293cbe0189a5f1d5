//! Where a member node mirrors: its replication address (`ip:port`, `[ipv6]:port`) by the
//! VirtualSAN's link mode.
//!
//! - `Cluster`: the Node object's first `InternalIP`, else its first `ExternalIP`.
//! - `Dedicated` + `cidr`: the first address the node agent reports (SANNode
//!   `status.addresses`) inside the CIDR.
//! - `Dedicated` + `interface` (per node overridable by `nodeInterfaces`): the first IPv4
//!   address of that interface the agent reports, else its first IPv6 address that is not
//!   link-local (a link-local address needs a scope and cannot name a peer).

use std::net::IpAddr;

use k8s_openapi::api::core::v1::Node;
use peersan_crds::sannode::InterfaceAddress;
use peersan_crds::virtualsan::{LinkMode, ReplicationLink};

/// `ip:port`, with an IPv6 address in brackets.
pub fn endpoint(ip: IpAddr, port: u16) -> String {
    match ip {
        IpAddr::V4(v4) => format!("{v4}:{port}"),
        IpAddr::V6(v6) => format!("[{v6}]:{port}"),
    }
}

/// An IP network: an address and a prefix length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    base: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Parses `10.20.0.0/24` or `fd00::/64`. Host bits may be set (`10.20.0.7/24` is the
    /// network 10.20.0.0/24), as Kubernetes' `format: cidr` allows.
    pub fn parse(s: &str) -> Result<Cidr, String> {
        let invalid = || format!("{s:?} is not a CIDR (address/prefix length)");
        let (ip, prefix) = s.split_once('/').ok_or_else(invalid)?;
        let base: IpAddr = ip.parse().map_err(|_| invalid())?;
        let prefix: u8 = prefix.parse().map_err(|_| invalid())?;
        let max = if base.is_ipv4() { 32 } else { 128 };
        if prefix > max {
            return Err(invalid());
        }
        Ok(Cidr { base, prefix })
    }

    /// Whether `ip` lies in this network.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.base, ip) {
            (IpAddr::V4(base), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix)).unwrap_or(0);
                u32::from(base) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(base), IpAddr::V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix)).unwrap_or(0);
                u128::from(base) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// The replication address of member `node_name`, or `Ok(None)` while it cannot be known
/// (no Node object, no matching address reported by the agent yet). `node` is its Node
/// object, `reported` the addresses its agent reports. `Err` when the link itself is
/// unusable (a CIDR that does not parse, a dedicated link with neither CIDR nor interface).
pub fn replication_address(
    link: &ReplicationLink,
    node_name: &str,
    node: Option<&Node>,
    reported: &[InterfaceAddress],
    port: u16,
) -> Result<Option<String>, String> {
    let ip = match link.mode {
        LinkMode::Cluster => node.and_then(cluster_ip),
        LinkMode::Dedicated => match (&link.cidr, &link.interface) {
            (Some(cidr), _) => {
                let cidr = Cidr::parse(cidr)?;
                reported.iter().filter_map(|a| a.ip.parse::<IpAddr>().ok()).find(|ip| cidr.contains(*ip))
            }
            (None, Some(default)) => {
                let interface = link
                    .node_interfaces
                    .iter()
                    .find(|ni| ni.node == node_name)
                    .map_or(default.as_str(), |ni| ni.interface.as_str());
                interface_ip(reported, interface)
            }
            (None, None) => return Err("a Dedicated replication link needs a cidr or an interface".into()),
        },
    };
    Ok(ip.map(|ip| endpoint(ip, port)))
}

/// The Node's first InternalIP, else its first ExternalIP.
fn cluster_ip(node: &Node) -> Option<IpAddr> {
    let addresses = node.status.as_ref()?.addresses.as_deref()?;
    let of_type = |t: &str| addresses.iter().filter(move |a| a.type_ == t).find_map(|a| a.address.parse().ok());
    of_type("InternalIP").or_else(|| of_type("ExternalIP"))
}

/// The first IPv4 address of `interface`, else its first IPv6 address that is not
/// link-local.
fn interface_ip(reported: &[InterfaceAddress], interface: &str) -> Option<IpAddr> {
    let ips = || reported.iter().filter(|a| a.interface == interface).filter_map(|a| a.ip.parse::<IpAddr>().ok());
    ips().find(IpAddr::is_ipv4).or_else(|| {
        ips().find(|ip| match ip {
            IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) != 0xfe80,
            IpAddr::V4(_) => false,
        })
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn node(addresses: serde_json::Value) -> Node {
        serde_json::from_value(json!({ "metadata": { "name": "n" }, "status": { "addresses": addresses } })).unwrap()
    }

    fn reported(pairs: &[(&str, &str)]) -> Vec<InterfaceAddress> {
        pairs.iter().map(|(i, ip)| InterfaceAddress { interface: (*i).into(), ip: (*ip).into() }).collect()
    }

    fn link(v: serde_json::Value) -> ReplicationLink {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn cluster_link_uses_internal_else_external_ip() {
        let cluster = ReplicationLink::default();
        let n = node(json!([
            { "type": "Hostname", "address": "n" },
            { "type": "ExternalIP", "address": "203.0.113.9" },
            { "type": "InternalIP", "address": "127.0.0.2" },
        ]));
        assert_eq!(replication_address(&cluster, "n", Some(&n), &[], 7700).unwrap().as_deref(), Some("127.0.0.2:7700"));
        let n = node(json!([{ "type": "ExternalIP", "address": "203.0.113.9" }]));
        assert_eq!(replication_address(&cluster, "n", Some(&n), &[], 1).unwrap().as_deref(), Some("203.0.113.9:1"));
        let n = node(json!([{ "type": "InternalIP", "address": "fd00::5" }]));
        assert_eq!(replication_address(&cluster, "n", Some(&n), &[], 7700).unwrap().as_deref(), Some("[fd00::5]:7700"));
        // No Node object, or no IP: not known yet. The agent's addresses do not count.
        let agent = reported(&[("eth0", "10.0.0.1")]);
        assert_eq!(replication_address(&cluster, "n", None, &agent, 7700).unwrap(), None);
        let n = node(json!([{ "type": "Hostname", "address": "n" }]));
        assert_eq!(replication_address(&cluster, "n", Some(&n), &agent, 7700).unwrap(), None);
    }

    #[test]
    fn dedicated_link_by_cidr() {
        let l = link(json!({ "mode": "Dedicated", "cidr": "10.20.0.0/24" }));
        let n = node(json!([{ "type": "InternalIP", "address": "127.0.0.2" }]));
        let agent =
            reported(&[("lo", "127.0.0.1"), ("eth0", "10.1.0.4"), ("eth1", "10.20.0.7"), ("eth2", "10.20.0.8")]);
        assert_eq!(replication_address(&l, "n", Some(&n), &agent, 7700).unwrap().as_deref(), Some("10.20.0.7:7700"));
        assert_eq!(replication_address(&l, "n", Some(&n), &agent[..2], 7700).unwrap(), None);

        let l6 = link(json!({ "mode": "Dedicated", "cidr": "fd00:20::/64" }));
        let agent = reported(&[("eth1", "fd00:21::1"), ("eth1", "fd00:20::9")]);
        assert_eq!(replication_address(&l6, "n", None, &agent, 7700).unwrap().as_deref(), Some("[fd00:20::9]:7700"));

        let bad = link(json!({ "mode": "Dedicated", "cidr": "10.20.0.0/33" }));
        assert!(replication_address(&bad, "n", None, &agent, 7700).is_err());
    }

    #[test]
    fn dedicated_link_by_interface_with_node_overrides() {
        let l = link(json!({ "mode": "Dedicated", "interface": "eth1",
            "nodeInterfaces": [{ "node": "odd", "interface": "ens5" }] }));
        let agent = reported(&[
            ("eth0", "10.1.0.4"),
            ("eth1", "fe80::1"),
            ("eth1", "fd00::7"),
            ("eth1", "10.20.0.7"),
            ("ens5", "10.30.0.1"),
        ]);
        // IPv4 first, whatever the order.
        assert_eq!(replication_address(&l, "n", None, &agent, 7700).unwrap().as_deref(), Some("10.20.0.7:7700"));
        assert_eq!(replication_address(&l, "odd", None, &agent, 7700).unwrap().as_deref(), Some("10.30.0.1:7700"));
        // Only IPv6: the first that is not link-local.
        assert_eq!(replication_address(&l, "n", None, &agent[..3], 7700).unwrap().as_deref(), Some("[fd00::7]:7700"));
        assert_eq!(replication_address(&l, "n", None, &agent[..2], 7700).unwrap(), None);
        assert_eq!(replication_address(&l, "n", None, &[], 7700).unwrap(), None);
    }

    #[test]
    fn cidr_edges() {
        let all = Cidr::parse("0.0.0.0/0").unwrap();
        assert!(all.contains("192.0.2.1".parse().unwrap()));
        assert!(!all.contains("::1".parse().unwrap()));
        let host = Cidr::parse("10.0.0.5/32").unwrap();
        assert!(host.contains("10.0.0.5".parse().unwrap()));
        assert!(!host.contains("10.0.0.4".parse().unwrap()));
        let with_host_bits = Cidr::parse("10.20.0.7/24").unwrap();
        assert!(with_host_bits.contains("10.20.0.200".parse().unwrap()));
        for bad in ["10.0.0.0", "10.0.0.0/", "x/8", "::/129"] {
            assert!(Cidr::parse(bad).is_err(), "{bad}");
        }
    }
}
