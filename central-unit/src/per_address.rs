//! A bound on connections at once per source address, shared by the CU's
//! server and a proxy's PMon listener: a slot is taken before any TLS work
//! and given back when the connection ends.

use std::collections::HashMap;
use std::sync::Arc;

/// Open connections per source address, against a limit (the CU's
/// `[limits] connections_per_address`, a proxy's `[pmon] max_per_address`).
pub struct PerAddress {
    max: u32,
    open: std::sync::Mutex<HashMap<std::net::IpAddr, u32>>,
}

impl PerAddress {
    pub fn new(max: u32) -> Self {
        PerAddress {
            max,
            open: std::sync::Mutex::new(HashMap::new()),
        }
    }

    /// A slot for one more connection from `ip`, if it has one left;
    /// dropping the slot gives it back.
    pub fn take(self: &Arc<Self>, ip: std::net::IpAddr) -> Option<AddressSlot> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let n = open.entry(ip).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(AddressSlot(self.clone(), ip))
    }
}

/// One connection's slot, given back when dropped.
pub struct AddressSlot(Arc<PerAddress>, std::net::IpAddr);
impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut open = self.0.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.1);
            }
        }
    }
}
