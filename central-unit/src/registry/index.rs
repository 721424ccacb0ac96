//! Lookups that would otherwise scan every agent on every registration,
//! which at 100,000 agents made registrations O(N) each and a join storm
//! O(N²): who claims an IP address, the proxies and the app VMs of each
//! cloud, and the agents that are neither proxies nor app VMs. It holds every entry of
//! the registry, present or not; the registry keeps it in step wherever
//! an entry is added, removed or changes its information.

use crate::trust::claims;
use pon_proto::control::{AgentInfo, Endpoints};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Index {
    /// Agents by every IP address their endpoints claim.
    by_ip: HashMap<IpAddr, BTreeSet<u32>>,
    /// Proxies by cloud, lowest id first.
    proxies: BTreeMap<String, BTreeSet<u32>>,
    /// App VMs by cloud.
    apps: BTreeMap<String, BTreeSet<u32>>,
    /// Agents that are neither proxies nor app VMs (monitoring).
    others: BTreeSet<u32>,
}

impl Index {
    /// An index of `infos`, built from scratch (what the kept one must
    /// always equal).
    #[cfg(test)]
    pub fn of<'a>(infos: impl IntoIterator<Item = &'a AgentInfo>) -> Index {
        let mut index = Index::default();
        for i in infos {
            index.add(i);
        }
        index
    }

    pub fn add(&mut self, info: &AgentInfo) {
        for c in claims(&info.endpoints) {
            self.by_ip.entry(c.ip()).or_default().insert(info.id);
        }
        match info.endpoints {
            Endpoints::Proxy { .. } => {
                self.proxies
                    .entry(info.cloud.clone())
                    .or_default()
                    .insert(info.id);
            }
            Endpoints::App { .. } => {
                self.apps
                    .entry(info.cloud.clone())
                    .or_default()
                    .insert(info.id);
            }
            Endpoints::Other { .. } => {
                self.others.insert(info.id);
            }
        }
    }

    pub fn remove(&mut self, info: &AgentInfo) {
        for c in claims(&info.endpoints) {
            let ip = c.ip();
            if let Some(ids) = self.by_ip.get_mut(&ip) {
                ids.remove(&info.id);
                if ids.is_empty() {
                    self.by_ip.remove(&ip);
                }
            }
        }
        match info.endpoints {
            Endpoints::Proxy { .. } => {
                if let Some(ids) = self.proxies.get_mut(&info.cloud) {
                    ids.remove(&info.id);
                    if ids.is_empty() {
                        self.proxies.remove(&info.cloud);
                    }
                }
            }
            Endpoints::App { .. } => {
                if let Some(ids) = self.apps.get_mut(&info.cloud) {
                    ids.remove(&info.id);
                    if ids.is_empty() {
                        self.apps.remove(&info.cloud);
                    }
                }
            }
            Endpoints::Other { .. } => {
                self.others.remove(&info.id);
            }
        }
    }

    /// The agents claiming `ip` (an address or a UDP endpoint on it).
    pub fn at(&self, ip: IpAddr) -> impl Iterator<Item = u32> + '_ {
        self.by_ip.get(&ip).into_iter().flatten().copied()
    }

    /// Every cloud's proxies, lowest id first.
    pub fn proxies(&self) -> impl Iterator<Item = (&str, &BTreeSet<u32>)> {
        self.proxies.iter().map(|(c, ids)| (c.as_str(), ids))
    }

    /// The proxies of `cloud`, lowest id first.
    pub fn proxies_of(&self, cloud: &str) -> impl Iterator<Item = u32> + '_ {
        self.proxies.get(cloud).into_iter().flatten().copied()
    }

    /// The app VMs of `cloud`.
    pub fn apps_of(&self, cloud: &str) -> impl Iterator<Item = u32> + '_ {
        self.apps.get(cloud).into_iter().flatten().copied()
    }

    pub fn others(&self) -> impl Iterator<Item = u32> + '_ {
        self.others.iter().copied()
    }
}
