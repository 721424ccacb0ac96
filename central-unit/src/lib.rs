//! The PON Central Unit (CU), off the data path: agents register (R), get
//! their id and configuration (C), and are pushed topology updates (U) when
//! agents they are concerned with join or leave.
//!
//! - `policy`, `registry`, `trust`: the CU's logic, sans-I/O (events +
//!   `now` in, actions out), unit-tested; `trust` is who may be an agent
//!   (tokens, enrolments, revocations, address grants).
//! - `view`, `session`: the agent's side, sans-I/O.
//! - `client`: the thread every PON daemon embeds to talk to the CU;
//!   `targets`: where it finds the CU (names resolved at each attempt).
//! - `server`, `store`, `config`, `pki` (feature `server`): the CU daemon:
//!   QUIC server, redb store, configuration file, the CA (init, signing
//!   agents' certificates).
//! - `pmon`, `pmon_hub` (sans-I/O), `pmon_service` and `web` (feature
//!   `server`): monitoring as a service: the proxies' reports as a
//!   site-by-site matrix and events, for `ponctl matrix` / `ponctl watch`
//!   (each subscriber with its own thresholds, metrics and schedule if it
//!   likes) and the live web view; `pmon_listen` (feature `pmon-listen`):
//!   the same service on a proxy, over its own reports.

pub mod client;
pub mod enrolment;
pub mod pmon;
pub mod pmon_hub;
pub mod policy;
pub mod registry;
pub mod relay;
pub mod session;
pub mod stream;
pub mod targets;
pub mod tls;
pub mod trust;
pub mod view;

#[cfg(feature = "server")]
pub mod admission;
#[cfg(feature = "server")]
pub mod config;
#[cfg(feature = "server")]
pub mod etcd;
#[cfg(feature = "pmon-listen")]
pub mod per_address;
#[cfg(feature = "server")]
pub mod pki;
#[cfg(feature = "pmon-listen")]
pub mod pmon_listen;
#[cfg(feature = "server")]
pub mod pmon_service;
#[cfg(feature = "server")]
pub mod pmon_text;
#[cfg(feature = "server")]
pub mod replica;
#[cfg(feature = "server")]
pub mod server;
#[cfg(feature = "server")]
pub mod store;
#[cfg(feature = "server")]
pub mod web;
#[cfg(feature = "server")]
pub mod write_order;

/// Wall-clock time in Unix milliseconds (0 before 1970): the stamps of
/// records, events and snapshots.
pub fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

pub use policy::Policy;
pub use registry::Registry;
pub use view::View;
