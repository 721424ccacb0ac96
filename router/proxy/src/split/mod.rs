//! The proxy split over processes: pon-forwarder, pon-monitor and pon-router
//! exchanging [`pon_proto::local::LocalMsg`] datagrams (on one host over
//! loopback, or across hosts). The same sans-I/O cores run as in pon-proxy;
//! only the hand-offs between them become datagrams.
//!
//! - [`forwarder::ForwarderLink`]: pon-forwarder's side. It stays the one
//!   writer of its table: it composes the base (config or CU view) with the
//!   routes the router sends, steers its TAs, hands probes that end here to
//!   the monitor and sends the monitor's packets from its PON socket.
//! - [`monitor::MonitorDaemon`]: the monitor, probing on the router's
//!   requests and answering other monitors.
//! - [`router::RouterDaemon`]: the router, fed the topology by the
//!   forwarder and probe results by the monitor.

pub mod forwarder;
pub mod link;
pub mod monitor;
pub mod router;
