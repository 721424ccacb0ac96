//! Which destinations the TA intercepts: one kernel route per prefix to the
//! TUN, with this VM's address as source. Changed at run time by applying a
//! new wanted set; only the difference touches the routing table.

use anyhow::{bail, Context};
use ipnet::IpNet;
use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::process::Command;

pub struct Interception {
    tun: String,
    src: Ipv4Addr,
    active: BTreeSet<IpNet>,
    /// The last set asked for (config or CU view), before bypasses.
    wanted: BTreeSet<IpNet>,
    /// Prefixes the local proxy's router says the overlay cannot reach now:
    /// wanted prefixes inside them are left to the plain IP path.
    bypass: BTreeSet<IpNet>,
}

/// `wanted` less every prefix that lies inside one of `bypass`.
pub fn effective(wanted: &BTreeSet<IpNet>, bypass: &BTreeSet<IpNet>) -> BTreeSet<IpNet> {
    wanted
        .iter()
        .filter(|w| !bypass.iter().any(|b| b.contains(*w)))
        .copied()
        .collect()
}

/// The route changes that turn `active` into `wanted`.
pub fn diff(active: &BTreeSet<IpNet>, wanted: &BTreeSet<IpNet>) -> (Vec<IpNet>, Vec<IpNet>) {
    let add = wanted.difference(active).copied().collect();
    let remove = active.difference(wanted).copied().collect();
    (add, remove)
}

impl Interception {
    pub fn new(tun: &str, src: Ipv4Addr) -> Self {
        Interception {
            tun: tun.to_string(),
            src,
            active: BTreeSet::new(),
            wanted: BTreeSet::new(),
            bypass: BTreeSet::new(),
        }
    }

    pub fn bypass(&self) -> &BTreeSet<IpNet> {
        &self.bypass
    }

    /// Leaves the wanted prefixes inside `bypass` to the IP path (and takes
    /// back those no longer inside it).
    pub fn set_bypass(&mut self, bypass: &[IpNet]) -> anyhow::Result<()> {
        let bypass: BTreeSet<IpNet> = bypass.iter().map(|n| n.trunc()).collect();
        if bypass == self.bypass {
            return Ok(());
        }
        self.bypass = bypass;
        let wanted: Vec<IpNet> = self.wanted.iter().copied().collect();
        self.apply(&wanted)
    }

    pub fn active(&self) -> &BTreeSet<IpNet> {
        &self.active
    }

    /// Installs routes for new prefixes and removes those no longer wanted
    /// (prefixes currently bypassed are left out).
    pub fn apply(&mut self, wanted: &[IpNet]) -> anyhow::Result<()> {
        self.wanted = wanted.iter().map(|n| n.trunc()).collect();
        let wanted = effective(&self.wanted, &self.bypass);
        let (add, remove) = diff(&self.active, &wanted);
        for net in add {
            let mut args = vec![
                "route".to_string(),
                "replace".into(),
                net.to_string(),
                "dev".into(),
                self.tun.clone(),
            ];
            if net.addr().is_ipv4() {
                args.extend(["src".into(), self.src.to_string()]);
            }
            ip(&args).with_context(|| format!("intercepting {net}"))?;
            self.active.insert(net);
            tracing::info!(%net, tun = %self.tun, "intercepting");
        }
        for net in remove {
            ip(&[
                "route".into(),
                "del".into(),
                net.to_string(),
                "dev".into(),
                self.tun.clone(),
            ])
            .with_context(|| format!("releasing {net}"))?;
            self.active.remove(&net);
            tracing::info!(%net, "no longer intercepting");
        }
        Ok(())
    }
}

fn ip(args: &[String]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bypass_removes_prefixes_inside_it() {
        let set =
            |v: &[&str]| -> BTreeSet<IpNet> { v.iter().map(|s| s.parse().unwrap()).collect() };
        let wanted = set(&["198.18.2.11/32", "198.18.2.12/32", "198.18.3.11/32"]);
        assert_eq!(
            effective(&wanted, &set(&["198.18.2.0/24"])),
            set(&["198.18.3.11/32"])
        );
        assert_eq!(
            effective(&wanted, &set(&["198.18.3.11/32"])),
            set(&["198.18.2.11/32", "198.18.2.12/32"])
        );
        assert_eq!(effective(&wanted, &BTreeSet::new()), wanted);
    }

    #[test]
    fn diff_adds_and_removes_only_changes() {
        let a: BTreeSet<IpNet> = ["198.18.2.11/32", "198.18.3.11/32"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        let w: BTreeSet<IpNet> = ["198.18.3.11/32", "198.18.4.11/32"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        let (add, rm) = diff(&a, &w);
        assert_eq!(add, vec!["198.18.4.11/32".parse::<IpNet>().unwrap()]);
        assert_eq!(rm, vec!["198.18.2.11/32".parse::<IpNet>().unwrap()]);
    }
}
