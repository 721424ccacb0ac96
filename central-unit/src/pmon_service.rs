//! PMon's place in the CU daemon: between the actor (which owns the
//! registry) and the [`Hub`] (the engine and its subscribers) it says who
//! is speaking and who may subscribe, and publishes the picture for the
//! web view. It does no I/O itself: what it wants sent comes back as
//! `(conn, message)`.

use crate::pmon::{Directory, PmonSettings};
use crate::pmon_hub::{Hub, Limits, Names};
pub use crate::pmon_hub::{Out, PmonStats};
use crate::registry::{ConnId, Registry};
use crate::trust::KeyId;
use pon_proto::pmon::{Report, Subscription};
use pon_telemetry::PromWriter;
use std::sync::Arc;
use std::time::Duration;

/// The web view is refreshed at most this often while things change ...
const PUBLISH_MIN: Duration = Duration::from_millis(250);
/// ... and at least this often (report ages, proxies joining).
const PUBLISH_MAX: Duration = Duration::from_secs(1);

/// The CU's PMon metrics (`pon_cu_pmon_*`).
pub fn render(stats: &PmonStats, w: &mut PromWriter) {
    stats.render(&Names::CU, w)
}

pub struct Service {
    hub: Hub,
    web: Arc<crate::web::Picture>,
    last_publish: Option<Duration>,
    dirty: bool,
}

impl Service {
    pub fn new(
        settings: PmonSettings,
        stats: Arc<PmonStats>,
        web: Arc<crate::web::Picture>,
    ) -> Self {
        Service {
            hub: Hub::new(settings, stats, Limits::default()),
            web,
            last_publish: None,
            dirty: true,
        }
    }

    /// A report on connection `conn`: filed under the proxy registered on
    /// it, whatever it says.
    pub fn report(
        &mut self,
        registry: &Registry,
        conn: ConnId,
        report: &Report,
        now_ms: u64,
    ) -> Vec<Out> {
        let dir = registry.online_proxies();
        let from = registry.id_of(conn).unwrap_or(0);
        self.dirty = true;
        self.hub.report(from, report, &dir, now_ms)
    }

    /// A consumer's first message. Refused unless it presents the admin
    /// certificate or an enrolled agent's.
    pub fn subscribe(
        &mut self,
        registry: &Registry,
        conn: ConnId,
        key: Option<KeyId>,
        version: u16,
        sub: Subscription,
        now_ms: u64,
    ) -> Vec<Out> {
        let authorised = if registry.may_subscribe(key) {
            Ok(())
        } else {
            Err("subscribing needs the admin certificate or an enrolled agent's certificate")
        };
        let dir = registry.online_proxies();
        self.hub
            .subscribe(conn, authorised, version, sub, &dir, now_ms)
    }

    /// Connection `conn` ended; `proxy` is the proxy it carried, if any.
    pub fn gone(&mut self, conn: ConnId, proxy: Option<u32>) {
        self.hub.gone(conn);
        if let Some(id) = proxy {
            self.hub.forget(id);
            self.dirty = true;
        }
    }

    /// Every tick: changed cells and due snapshots to the streams; the web
    /// view's picture refreshed when due.
    pub fn tick(&mut self, registry: &Registry, now: Duration, now_ms: u64) -> Vec<Out> {
        let since = self.last_publish.map(|t| now.saturating_sub(t));
        let due = match since {
            None => true,
            Some(s) => s >= PUBLISH_MAX || (self.dirty && s >= PUBLISH_MIN),
        };
        // The web view's picture is the whole matrix (a million pairs at a
        // thousand sites): built only while someone looks at it.
        let publish = due && self.web.watched();
        if !publish && !self.hub.needs_tick(now_ms) {
            return Vec::new();
        }
        let dir: Directory = registry.online_proxies();
        let out = self.hub.tick(&dir, now_ms);
        if publish {
            let pmon = self.hub.pmon();
            let matrix = pmon.matrix(&Subscription::default(), &dir, now_ms);
            self.web.publish(&matrix, pmon.recent(), now_ms);
            self.last_publish = Some(now);
            self.dirty = false;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Policy;
    use crate::registry::Settings;

    #[test]
    fn the_web_picture_is_built_only_while_someone_looks() {
        let web = Arc::new(crate::web::Picture::default());
        let mut s = Service::new(
            PmonSettings::default(),
            Arc::new(PmonStats::default()),
            web.clone(),
        );
        let r = Registry::new(Settings::default(), Policy::default());
        let ms = Duration::from_millis;
        // Nobody looks: no picture, however long.
        s.tick(&r, ms(0), 0);
        s.tick(&r, ms(5000), 5000);
        assert_eq!(&*web.current(), "{}");
        // A one-shot request gets the next tick's picture, and only one.
        let mut asked = web.ask();
        s.tick(&r, ms(5100), 5100);
        assert!(asked.try_recv().is_ok());
        s.tick(&r, ms(9000), 9000);
        assert!(asked.try_recv().is_err(), "built again with nobody asking");
        // A streaming page gets one every second while it stays.
        let (slot, mut rx, _) = web.open_stream().expect("a slot");
        s.tick(&r, ms(9100), 9100);
        s.tick(&r, ms(10100), 10100);
        assert!(rx.try_recv().is_ok() && rx.try_recv().is_ok());
        drop(slot);
        s.tick(&r, ms(11100), 11100);
        assert!(rx.try_recv().is_err(), "built after the page went");
    }
}
