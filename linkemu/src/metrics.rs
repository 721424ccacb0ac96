//! Counters of the emulator and their Prometheus page.
//!
//! Per-link counters are relaxed atomics written only by the data-path
//! thread; the metrics thread reads them through a registry that changes
//! only when a link is created (control path), never per packet.

use pon_telemetry::{Counter, PromWriter};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Counters of one direction of a link.
#[derive(Debug, Default)]
pub struct LinkCounters {
    pub rx_packets: Counter,
    pub rx_bytes: Counter,
    pub tx_packets: Counter,
    pub tx_bytes: Counter,
    pub drop_loss: Counter,
    pub drop_down: Counter,
    pub drop_queue: Counter,
}

pon_telemetry::counters! {
    /// Counters of the emulator as a whole.
    pub struct EmuCounters {
        passthrough_packets => ("pon_linkemu_passthrough_packets_total", "", "Packets between pairs of sites without a link (sent unimpaired)."),
        foreign_packets => ("pon_linkemu_foreign_packets_total", "", "Packets that are not IPv4 or not between two known sites (sent unimpaired)."),
        rx_errors => ("pon_linkemu_errors_total", "op=\"rx\"", "TUN read/write errors."),
        tx_errors => ("pon_linkemu_errors_total", "op=\"tx\"", "TUN read/write errors."),
        control_requests => ("pon_linkemu_control_requests_total", "result=\"ok\"", "Control socket requests."),
        control_errors => ("pon_linkemu_control_requests_total", "result=\"error\"", "Control socket requests."),
    }
}

struct Registered {
    labels: String,
    counters: Arc<LinkCounters>,
}

/// What the metrics endpoint renders.
#[derive(Default)]
pub struct Registry {
    pub emu: EmuCounters,
    links: Mutex<Vec<Registered>>,
    in_flight: AtomicU64,
}

impl Registry {
    /// Makes a link's counters visible, labelled by site names.
    pub fn register(&self, from: &str, to: &str, counters: Arc<LinkCounters>) {
        let labels = format!("from=\"{}\",to=\"{}\"", escape(from), escape(to));
        self.links
            .lock()
            .expect("metrics registry poisoned")
            .push(Registered { labels, counters });
    }

    /// The number of packets held, as last reported by the data path.
    pub fn set_in_flight(&self, n: usize) {
        self.in_flight.store(n as u64, Ordering::Relaxed);
    }

    pub fn render(&self, w: &mut PromWriter) {
        self.emu.render(w);
        w.gauge(
            "pon_linkemu_in_flight_packets",
            "",
            "Packets held by the emulator (delayed or queued).",
            self.in_flight.load(Ordering::Relaxed) as f64,
        );
        let links = self.links.lock().expect("metrics registry poisoned");
        const PACKETS: &str = "Packets per ordered pair of sites with a link, by direction (rx: arrived, tx: sent on).";
        const BYTES: &str = "IP bytes per ordered pair of sites with a link, by direction.";
        const DROPS: &str =
            "Packets dropped per ordered pair of sites, by reason (loss, down, queue).";
        for l in links.iter() {
            let c = &l.counters;
            let lb = &l.labels;
            w.counter(
                "pon_linkemu_packets_total",
                &format!("{lb},dir=\"rx\""),
                PACKETS,
                c.rx_packets.get(),
            );
            w.counter(
                "pon_linkemu_packets_total",
                &format!("{lb},dir=\"tx\""),
                PACKETS,
                c.tx_packets.get(),
            );
            w.counter(
                "pon_linkemu_bytes_total",
                &format!("{lb},dir=\"rx\""),
                BYTES,
                c.rx_bytes.get(),
            );
            w.counter(
                "pon_linkemu_bytes_total",
                &format!("{lb},dir=\"tx\""),
                BYTES,
                c.tx_bytes.get(),
            );
            w.counter(
                "pon_linkemu_drops_total",
                &format!("{lb},reason=\"loss\""),
                DROPS,
                c.drop_loss.get(),
            );
            w.counter(
                "pon_linkemu_drops_total",
                &format!("{lb},reason=\"down\""),
                DROPS,
                c.drop_down.get(),
            );
            w.counter(
                "pon_linkemu_drops_total",
                &format!("{lb},reason=\"queue\""),
                DROPS,
                c.drop_queue.get(),
            );
        }
    }
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_per_link_samples_and_gauge() {
        let r = Registry::default();
        let c = Arc::new(LinkCounters::default());
        c.drop_loss.add(4);
        r.register("paris", "tokyo", c);
        r.set_in_flight(7);
        r.set_in_flight(3);
        let mut w = PromWriter::new();
        r.render(&mut w);
        let page = w.finish();
        assert!(
            page.contains(
                "pon_linkemu_drops_total{from=\"paris\",to=\"tokyo\",reason=\"loss\"} 4\n"
            ),
            "{page}"
        );
        assert!(page.contains("pon_linkemu_in_flight_packets 3\n"), "{page}");
        assert_eq!(page.matches("# HELP pon_linkemu_packets_total").count(), 1);
    }
}
