//! Where an agent finds the CU: one or more `host:port`, each a DNS name
//! or an address (`addr = "cu.example.net:7400"`, or a list of them). A
//! name is resolved again at every connection attempt, so a CU that moved
//! (a new address behind its name) is found without restarting anything;
//! after a failure the next entry of the list is tried, with the backoff
//! the session already applies.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

/// One `host:port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CuAddr {
    host: String,
    port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not host:port (a DNS name or an address, and a port; [v6]:port for IPv6)")]
pub struct BadCuAddr(String);

impl FromStr for CuAddr {
    type Err = BadCuAddr;
    fn from_str(s: &str) -> Result<Self, BadCuAddr> {
        let bad = || BadCuAddr(s.to_string());
        if let Ok(a) = s.parse::<SocketAddr>() {
            return Ok(CuAddr {
                host: a.ip().to_string(),
                port: a.port(),
            });
        }
        let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
        let port: u16 = port.parse().map_err(|_| bad())?;
        // A DNS name (RFC 1123 labels); anything else with a colon in it
        // is a malformed IPv6 address.
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        };
        let host = host.strip_suffix('.').unwrap_or(host);
        if port == 0 || host.len() > 253 || !host.split('.').all(label_ok) {
            return Err(bad());
        }
        Ok(CuAddr {
            host: host.to_ascii_lowercase(),
            port,
        })
    }
}

impl fmt::Display for CuAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.host.parse::<IpAddr>() {
            Ok(IpAddr::V6(a)) => write!(f, "[{a}]:{}", self.port),
            _ => write!(f, "{}:{}", self.host, self.port),
        }
    }
}

impl CuAddr {
    /// Its addresses now: an address as it is, a name through the system's
    /// resolver. Only those `usable` accepts (the socket's family).
    pub async fn resolve(
        &self,
        usable: impl Fn(&SocketAddr) -> bool,
    ) -> Result<Vec<SocketAddr>, String> {
        let all: Vec<SocketAddr> = match self.host.parse::<IpAddr>() {
            Ok(ip) => vec![SocketAddr::new(ip, self.port)],
            Err(_) => tokio::net::lookup_host((self.host.as_str(), self.port))
                .await
                .map_err(|e| format!("cannot resolve the CU's name {}: {e}", self.host))?
                .collect(),
        };
        let found: Vec<SocketAddr> = all.iter().copied().filter(|a| usable(a)).collect();
        if found.is_empty() {
            return Err(format!(
                "the CU's name {} resolves to no address this agent can reach ({all:?})",
                self.host
            ));
        }
        Ok(found)
    }
}

/// The CU's addresses, in the order they are tried (at least one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CuAddrs(Vec<CuAddr>);

impl CuAddrs {
    pub fn new(addrs: Vec<CuAddr>) -> Option<Self> {
        (!addrs.is_empty()).then_some(CuAddrs(addrs))
    }

    pub fn iter(&self) -> impl Iterator<Item = &CuAddr> {
        self.0.iter()
    }

    /// Entry `n` of the list, round-robin (after `n` failures).
    pub fn nth(&self, n: usize) -> &CuAddr {
        &self.0[n % self.0.len()]
    }

    /// The address to try at attempt `n` (0, 1, ... counting failures):
    /// the list's entries in turn, resolved now, and across rounds each
    /// entry's addresses in turn (a name with several records).
    pub async fn pick(
        &self,
        n: usize,
        usable: impl Fn(&SocketAddr) -> bool,
    ) -> Result<SocketAddr, String> {
        let found = self.nth(n).resolve(usable).await?;
        Ok(found[(n / self.0.len()) % found.len()])
    }

    /// A client endpoint that can reach them: dual-stack where the host
    /// has IPv6, else IPv4 only.
    pub fn endpoint() -> std::io::Result<quinn::Endpoint> {
        quinn::Endpoint::client("[::]:0".parse().expect("literal"))
            .or_else(|_| quinn::Endpoint::client("0.0.0.0:0".parse().expect("literal")))
    }

    /// Whether `endpoint` can send to `addr` (an IPv4-only socket cannot
    /// reach IPv6 addresses).
    pub fn reachable(endpoint: &quinn::Endpoint, addr: &SocketAddr) -> bool {
        addr.is_ipv4() || endpoint.local_addr().is_ok_and(|l| l.is_ipv6())
    }
}

impl fmt::Display for CuAddrs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, a) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{a}")?;
        }
        Ok(())
    }
}

impl FromStr for CuAddrs {
    type Err = BadCuAddr;
    /// One address, or several separated by commas.
    fn from_str(s: &str) -> Result<Self, BadCuAddr> {
        let addrs = s
            .split(',')
            .map(|a| a.trim().parse())
            .collect::<Result<Vec<CuAddr>, _>>()?;
        CuAddrs::new(addrs).ok_or_else(|| BadCuAddr(s.to_string()))
    }
}

/// `addr = "host:port"` or `addr = ["host:port", ...]`.
impl<'de> Deserialize<'de> for CuAddrs {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum OneOrMany {
            One(String),
            Many(Vec<String>),
        }
        let list = match OneOrMany::deserialize(d)? {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        };
        let addrs = list
            .iter()
            .map(|s| s.parse::<CuAddr>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(serde::de::Error::custom)?;
        CuAddrs::new(addrs).ok_or_else(|| serde::de::Error::custom("an empty list of CU addresses"))
    }
}

/// In configuration files: one `host:port` or a list of them.
impl schemars::JsonSchema for CuAddrs {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "CuAddrs".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "anyOf": [
                {"type": "string", "format": "host-port"},
                {"type": "array", "items": {"type": "string", "format": "host-port"}}
            ]
        })
    }
}

impl Serialize for CuAddrs {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.0.len() == 1 {
            s.collect_str(&self.0[0])
        } else {
            s.collect_seq(self.0.iter().map(ToString::to_string))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_addresses_and_lists_parse_and_bad_ones_say_why() {
        let one: CuAddrs = toml::from_str::<toml::Value>("addr = \"CU.example.net:7400\"").unwrap()
            ["addr"]
            .clone()
            .try_into()
            .unwrap();
        assert_eq!(one.to_string(), "cu.example.net:7400");
        #[derive(Deserialize)]
        struct C {
            addr: CuAddrs,
        }
        let many: C =
            toml::from_str("addr = [\"198.18.250.1:7400\", \"[2001:db8::1]:7400\", \"cu2:7401\"]")
                .unwrap();
        assert_eq!(
            many.addr.to_string(),
            "198.18.250.1:7400, [2001:db8::1]:7400, cu2:7401"
        );
        assert_eq!(many.addr.nth(4).to_string(), "[2001:db8::1]:7400");
        for bad in [
            "addr = \"cu.example.net\"",
            "addr = \"cu.example.net:0\"",
            "addr = \"cu..net:7400\"",
            "addr = \"-cu:7400\"",
            "addr = \"2001:db8::1:7400:x\"",
            "addr = []",
            "addr = \"cu_1:7400\"",
        ] {
            let e = toml::from_str::<C>(bad).err().expect(bad).to_string();
            assert!(
                e.contains("host:port") || e.contains("empty list"),
                "{bad}: {e}"
            );
        }
        // Written back as it was read.
        let round: CuAddrs = "a:1, b:2".parse().unwrap();
        assert_eq!(
            toml::to_string(&std::collections::BTreeMap::from([("addr", &round)])).unwrap(),
            "addr = [\"a:1\", \"b:2\"]\n"
        );
    }

    #[tokio::test]
    async fn an_address_needs_no_resolver_and_a_name_resolves_each_time() {
        let a: CuAddr = "198.18.250.1:7400".parse().unwrap();
        assert_eq!(
            a.resolve(|_| true).await.unwrap(),
            vec!["198.18.250.1:7400".parse().unwrap()]
        );
        assert!(a
            .resolve(SocketAddr::is_ipv6)
            .await
            .unwrap_err()
            .contains("no address this agent can reach"));
        // "localhost" is in every resolver's hosts file.
        let l: CuAddr = "localhost:7400".parse().unwrap();
        let found = l.resolve(SocketAddr::is_ipv4).await.unwrap();
        assert!(found
            .iter()
            .all(|s| s.ip().is_loopback() && s.port() == 7400));
        let nx: CuAddr = "no-such-cu.invalid:7400".parse().unwrap();
        assert!(nx
            .resolve(|_| true)
            .await
            .unwrap_err()
            .contains("cannot resolve the CU's name no-such-cu.invalid"));
    }
}
