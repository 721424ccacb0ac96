//! pon-proxy's own PMon listener (`[pmon]`): the subscription service of
//! the CU, served by the proxy from its own reports (see
//! `pon_cu::pmon_listen`). Here only what ties it to the daemon: the CU's
//! views and the published status's reports go to its feed.

use crate::config::ProxyConfig;
use anyhow::Context;
use pon_cu::pmon_listen::{self, Feed};
use std::sync::Arc;

/// The listener's feed, and how the proxy names itself in the matrix.
#[derive(Clone)]
pub struct LocalPmon {
    pub feed: Arc<Feed>,
    site: String,
    name: String,
}

impl LocalPmon {
    /// Starts the listener when the configuration has `[pmon]` (which
    /// needs `[cu]`: the overlay CA, and the sites of the destinations).
    pub fn start(cfg: &ProxyConfig) -> anyhow::Result<Option<LocalPmon>> {
        let (Some(p), Some(cu)) = (&cfg.pmon, &cfg.forwarder.cu) else {
            return Ok(None);
        };
        let (feed, _) = pmon_listen::start(p, &cu.ca).context("starting [pmon]")?;
        let name = cu
            .name
            .clone()
            .unwrap_or_else(|| cfg.forwarder.local_addr.to_string());
        Ok(Some(LocalPmon {
            feed,
            site: cu.cloud.clone(),
            name,
        }))
    }

    /// A new view from the CU: who the destinations are, who may subscribe.
    pub fn view(&self, v: &pon_cu::View) {
        self.feed.offer_view(v, &self.site, &self.name);
    }
}
