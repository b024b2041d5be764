//! Test hosts in network namespaces: a node behind a veth pair whose link
//! can be cut, for real partitions (packets silently dropped, no reset).
//! Needs root (CAP_NET_ADMIN) and `ip` from iproute2.

use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::Command;

pub struct Netns {
    name: String,
    host_link: String,
    ns_link: String,
    /// This side's address (the root namespace's end of the link).
    pub host_ip: IpAddr,
    /// The namespace's address.
    pub ns_ip: IpAddr,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Netns {
    /// A namespace linked to this one, or why the machine cannot make one.
    pub fn create() -> Result<Netns, String> {
        let id = std::process::id() % 10_000;
        let (third, fourth) = (rand_byte(), (rand_byte() % 60) * 4);
        let ns = Netns {
            name: format!("ac-{id}"),
            host_link: format!("ach{id}"),
            ns_link: format!("acn{id}"),
            host_ip: Ipv4Addr::new(10, 231, third, fourth + 1).into(),
            ns_ip: Ipv4Addr::new(10, 231, third, fourth + 2).into(),
        };
        let (name, host, peer) = (&ns.name, &ns.host_link, &ns.ns_link);
        let host_cidr = format!("{}/30", ns.host_ip);
        let ns_cidr = format!("{}/30", ns.ns_ip);
        ip(&["netns", "add", name])?;
        let made = (|| {
            ip(&["link", "add", host, "type", "veth", "peer", "name", peer])?;
            ip(&["link", "set", peer, "netns", name])?;
            ip(&["addr", "add", &host_cidr, "dev", host])?;
            ip(&["link", "set", host, "up"])?;
            ip(&["-n", name, "addr", "add", &ns_cidr, "dev", peer])?;
            ip(&["-n", name, "link", "set", peer, "up"])?;
            ip(&["-n", name, "link", "set", "lo", "up"])
        })();
        made.map(|()| ns)
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// Cut the link: packets are dropped, no side is told.
    pub fn partition(&self) {
        ip(&["-n", &self.name, "link", "set", &self.ns_link, "down"]).expect("cut the link");
    }

    /// Run `f` on a thread inside the namespace (sockets it opens are there).
    pub fn run_in<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let file = std::fs::File::open(self.path()).expect("namespace file");
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    // SAFETY: setns on this thread only.
                    let joined = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                    assert_eq!(joined, 0, "setns: {}", std::io::Error::last_os_error());
                    f()
                })
                .join()
                .expect("thread in the namespace")
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["link", "del", &self.host_link]);
        let _ = ip(&["netns", "del", &self.name]);
    }
}

fn rand_byte() -> u8 {
    (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos())
        % 251) as u8
}
