//! One network namespace per node, joined pairwise by veth links, with faults on a link:
//! down/up (a real cut: the kernel drops the route, TCP retransmits into the void) and
//! rate limiting with `tc tbf`. The namespaces, and with them the veths, are deleted on drop.

use std::process::Command;

use peersan_node_agent::localcluster::LocalCluster;

/// The link between nodes `a` and `b` (a < b): a veth pair with a /30 of its own.
struct Link {
    a: usize,
    b: usize,
    /// Device name in `a`'s namespace, and in `b`'s.
    dev_a: String,
    dev_b: String,
    addr_a: String,
    addr_b: String,
}

pub struct Net {
    pub ns: Vec<String>,
    links: Vec<Link>,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip").args(args).output().map_err(|e| format!("ip {args:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("ip {args:?}: {}", String::from_utf8_lossy(&out.stderr).trim()))
    }
}

impl Net {
    /// Creates `n` namespaces `psan-<random>-n<i+1>` and a link between every two of them.
    pub fn new(n: usize) -> Result<Net, String> {
        let tag = format!("{:06x}", rand::random::<u32>() & 0xff_ffff);
        let mut net = Net { ns: Vec::new(), links: Vec::new() };
        for i in 0..n {
            let ns = format!("psan-{tag}-n{}", i + 1);
            ip(&["netns", "add", &ns])?;
            net.ns.push(ns.clone());
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        }
        let mut k = 0;
        for a in 0..n {
            for b in a + 1..n {
                let link = Link {
                    a,
                    b,
                    dev_a: format!("to-n{}", b + 1),
                    dev_b: format!("to-n{}", a + 1),
                    addr_a: format!("10.250.{k}.1"),
                    addr_b: format!("10.250.{k}.2"),
                };
                k += 1;
                let (na, nb) = (&net.ns[a], &net.ns[b]);
                ip(&[
                    "link",
                    "add",
                    &link.dev_a,
                    "netns",
                    na,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    &link.dev_b,
                    "netns",
                    nb,
                ])?;
                ip(&["-n", na, "addr", "add", &format!("{}/30", link.addr_a), "dev", &link.dev_a])?;
                ip(&["-n", nb, "addr", "add", &format!("{}/30", link.addr_b), "dev", &link.dev_b])?;
                net.links.push(link);
                net.set_link(a, b, true)?;
            }
        }
        Ok(net)
    }

    fn link(&self, i: usize, j: usize) -> &Link {
        let (a, b) = (i.min(j), i.max(j));
        self.links.iter().find(|l| l.a == a && l.b == b).unwrap_or_else(|| panic!("no link between {i} and {j}"))
    }

    /// The address of `of`'s end of its link to `towards`.
    pub fn addr(&self, of: usize, towards: usize) -> &str {
        let l = self.link(of, towards);
        if l.a == of { &l.addr_a } else { &l.addr_b }
    }

    /// Runs every agent in its namespace, listening on all its addresses and reaching each
    /// peer at that peer's end of their link.
    pub fn apply(&self, c: &mut LocalCluster) {
        let n = c.members.len();
        for i in 0..n {
            let m = &mut c.members[i];
            m.netns = Some(self.ns[i].clone());
            m.listen_host = "0.0.0.0".into();
            m.reach = (0..n).map(|j| if j == i { "127.0.0.1".into() } else { self.addr(j, i).to_owned() }).collect();
        }
    }

    fn ends(&self, i: usize, j: usize) -> [(&str, &str); 2] {
        let l = self.link(i, j);
        [(&self.ns[l.a], &l.dev_a), (&self.ns[l.b], &l.dev_b)]
    }

    fn set_link(&self, i: usize, j: usize, up: bool) -> Result<(), String> {
        for (ns, dev) in self.ends(i, j) {
            ip(&["-n", ns, "link", "set", dev, if up { "up" } else { "down" }])?;
        }
        Ok(())
    }

    pub fn link_down(&self, i: usize, j: usize) {
        self.set_link(i, j, false).unwrap();
    }

    pub fn link_up(&self, i: usize, j: usize) {
        self.set_link(i, j, true).unwrap();
    }

    /// Every link of node `i` down.
    pub fn partition(&self, i: usize) {
        for j in (0..self.ns.len()).filter(|&j| j != i) {
            self.link_down(i, j);
        }
    }

    pub fn heal(&self, i: usize) {
        for j in (0..self.ns.len()).filter(|&j| j != i) {
            self.link_up(i, j);
        }
    }

    /// Limits both directions of the link to `rate` (a `tc` rate such as `20mbit`), with a
    /// 50 ms queue: beyond it packets are dropped.
    pub fn slow(&self, i: usize, j: usize, rate: &str) {
        for (ns, dev) in self.ends(i, j) {
            let args = ["netns", "exec", ns, "tc", "qdisc", "replace", "dev", dev, "root", "tbf", "rate", rate];
            ip(&[&args[..], &["burst", "32kbit", "latency", "50ms"]].concat()).unwrap();
        }
    }

    pub fn unslow(&self, i: usize, j: usize) {
        for (ns, dev) in self.ends(i, j) {
            // No qdisc (never slowed) is fine.
            let _ = ip(&["netns", "exec", ns, "tc", "qdisc", "del", "dev", dev, "root"]);
        }
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in &self.ns {
            if let Err(e) = ip(&["netns", "del", ns]) {
                eprintln!("cleanup: {e}");
            }
        }
    }
}
