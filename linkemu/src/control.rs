//! Run-time control (`lab impair`): one JSON request per line on a Unix
//! socket, one JSON response line back.
//!
//! ```text
//! {"op":"show"}
//! {"op":"set","links":[{"from":"paris","to":"tokyo","delay_ms":50,"down":true}]}
//! {"op":"set","sites":[{"index":4,"name":"rome","prefix":"198.18.4.0/24"}],"links":[...]}
//! ```
//!
//! A `set` changes only the fields it names (a new link starts from "no
//! effect"), and applies all its changes or none. The socket thread parses
//! and hands the request to the data-path thread, which applies it between
//! two packets: nothing is locked per packet, and the reply is sent only once
//! the change is in force, so `impair` returning means packets see it.

use crate::config::{InvalidSetting, LinkSettings, Site, Sites};
use crate::emulator::{Emulator, LinkParams};
use crate::metrics::Registry;
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;

/// Longest accepted request line.
const MAX_REQUEST: u64 = 1 << 20;
const IO_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    Show,
    Set {
        #[serde(default)]
        sites: Vec<Site>,
        #[serde(default)]
        links: Vec<LinkChange>,
    },
}

/// Changes to one direction of a link: absent fields keep their value.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkChange {
    pub from: String,
    pub to: String,
    pub delay_ms: Option<f64>,
    pub jitter_ms: Option<f64>,
    pub loss: Option<f64>,
    pub rate_mbit: Option<f64>,
    pub down: Option<bool>,
}

impl LinkChange {
    fn apply_to(&self, s: &mut LinkSettings) {
        if let Some(v) = self.delay_ms {
            s.delay_ms = v;
        }
        if let Some(v) = self.jitter_ms {
            s.jitter_ms = v;
        }
        if let Some(v) = self.loss {
            s.loss = v;
        }
        if let Some(v) = self.rate_mbit {
            s.rate_mbit = v;
        }
        if let Some(v) = self.down {
            s.down = v;
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LinkStatus {
    pub from: String,
    pub to: String,
    #[serde(flatten)]
    pub settings: LinkSettings,
    pub rx_packets: u64,
    pub tx_packets: u64,
    pub drops_loss: u64,
    pub drops_down: u64,
    pub drops_queue: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Response {
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub links: Vec<LinkStatus>,
}

/// The emulator with what the control path needs next to it.
pub struct Controlled<P> {
    pub emu: Emulator<P>,
    pub sites: Sites,
    pub registry: std::sync::Arc<Registry>,
}

impl<P> Controlled<P> {
    /// Creates or changes one direction of a link, registering the metrics
    /// of a new one.
    pub fn set_link(&mut self, from: u8, to: u8, params: LinkParams) {
        if self.emu.set_link(from, to, params) {
            let counters = self
                .emu
                .link(from, to)
                .expect("just created")
                .counters
                .clone();
            self.registry
                .register(&self.sites.name(from), &self.sites.name(to), counters);
        }
    }

    pub fn handle(&mut self, req: Request) -> Response {
        let result = match req {
            Request::Show => Ok(()),
            Request::Set { sites, links } => self.set(sites, links),
        };
        let c = &self.registry.emu;
        match &result {
            Ok(()) => c.control_requests.inc(),
            Err(_) => c.control_errors.inc(),
        }
        Response {
            ok: result.is_ok(),
            error: result.err().map(|e| e.to_string()),
            links: self.status(),
        }
    }

    fn set(&mut self, sites: Vec<Site>, links: Vec<LinkChange>) -> Result<(), InvalidSetting> {
        // Validate everything before changing anything.
        let mut next_sites = self.sites.clone();
        next_sites.merge(sites)?;
        let mut plan = Vec::with_capacity(links.len());
        for (n, change) in links.iter().enumerate() {
            let field = |f: &str| format!("links[{n}].{f}");
            let site = |f: &str, name: &str| {
                next_sites
                    .by_name(name)
                    .map(|s| s.index)
                    .ok_or_else(|| InvalidSetting {
                        field: field(f),
                        msg: format!("unknown site {name:?}"),
                    })
            };
            let (from, to) = (site("from", &change.from)?, site("to", &change.to)?);
            if from == to {
                return Err(InvalidSetting {
                    field: field("to"),
                    msg: "must differ from `from`".into(),
                });
            }
            // Earlier changes to the same link in this request count.
            let mut settings = plan
                .iter()
                .rev()
                .find(|(f, t, _)| (*f, *t) == (from, to))
                .map(|(_, _, s)| *s)
                .or_else(|| {
                    self.emu
                        .link(from, to)
                        .map(|l| LinkSettings::from_params(&l.params))
                })
                .unwrap_or_default();
            change.apply_to(&mut settings);
            settings.validate().map_err(|e| InvalidSetting {
                field: field(&e.field),
                msg: e.msg,
            })?;
            plan.push((from, to, settings));
        }
        self.sites = next_sites;
        for (from, to, settings) in plan {
            tracing::info!(from = %self.sites.name(from), to = %self.sites.name(to), ?settings, "link set");
            self.set_link(from, to, settings.params());
        }
        Ok(())
    }

    pub fn status(&self) -> Vec<LinkStatus> {
        self.emu
            .links()
            .map(|l| {
                let c = &l.counters;
                LinkStatus {
                    from: self.sites.name(l.from),
                    to: self.sites.name(l.to),
                    settings: LinkSettings::from_params(&l.params),
                    rx_packets: c.rx_packets.get(),
                    tx_packets: c.tx_packets.get(),
                    drops_loss: c.drop_loss.get(),
                    drops_down: c.drop_down.get(),
                    drops_queue: c.drop_queue.get(),
                }
            })
            .collect()
    }
}

/// A request on its way to the data path, with where to send the answer.
pub type Job = (Request, mpsc::SyncSender<Response>);

/// Serves the control socket at `path` from a background thread. Each
/// request is passed through `jobs` and `wake` is called so the data path
/// looks at it.
pub fn serve(
    path: &Path,
    jobs: mpsc::Sender<Job>,
    wake: impl Fn() + Send + 'static,
) -> std::io::Result<()> {
    // A stale socket of an earlier run would make bind fail.
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let listener = UnixListener::bind(path)?;
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            for stream in listener.incoming().flatten() {
                if let Err(e) = answer(stream, &jobs, &wake) {
                    tracing::warn!(error = %e, "control request failed");
                }
            }
        })?;
    Ok(())
}

fn answer(stream: UnixStream, jobs: &mpsc::Sender<Job>, wake: &impl Fn()) -> std::io::Result<()> {
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut line = String::new();
    BufReader::new((&stream).take(MAX_REQUEST)).read_line(&mut line)?;
    let response = match serde_json::from_str::<Request>(&line) {
        Err(e) => Response {
            ok: false,
            error: Some(format!("bad request: {e}")),
            links: Vec::new(),
        },
        Ok(req) => {
            let (tx, rx) = mpsc::sync_channel(1);
            if jobs.send((req, tx)).is_err() {
                return Err(std::io::Error::other("data path is gone"));
            }
            wake();
            rx.recv_timeout(IO_TIMEOUT)
                .map_err(|e| std::io::Error::other(format!("no answer from the data path: {e}")))?
        }
    };
    let mut out = serde_json::to_vec(&response).map_err(std::io::Error::other)?;
    out.push(b'\n');
    (&stream).write_all(&out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    fn controlled() -> Controlled<u32> {
        let site = |index, name: &str| Site {
            index,
            name: name.into(),
            prefix: format!("198.18.{index}.0/24").parse().unwrap(),
        };
        Controlled {
            emu: Emulator::new(10, 1),
            sites: Sites::new(vec![site(1, "paris"), site(2, "tokyo")]).unwrap(),
            registry: Arc::new(Registry::default()),
        }
    }

    fn req(json: &str) -> Request {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn set_changes_only_named_fields() {
        let mut c = controlled();
        let r = c.handle(req(
            r#"{"op":"set","links":[{"from":"paris","to":"tokyo","delay_ms":120,"loss":0.01}]}"#,
        ));
        assert!(r.ok, "{r:?}");
        let r = c.handle(req(
            r#"{"op":"set","links":[{"from":"paris","to":"tokyo","down":true}]}"#,
        ));
        let s = r.links[0].settings;
        assert_eq!((s.delay_ms, s.loss, s.down), (120.0, 0.01, true));
        let p = c.emu.link(1, 2).unwrap().params;
        assert_eq!(p.delay, Duration::from_millis(120));
        assert!(p.down);
        let r = c.handle(req(
            r#"{"op":"set","links":[{"from":"paris","to":"tokyo","down":false}]}"#,
        ));
        assert_eq!(
            r.links[0].settings.delay_ms, 120.0,
            "up restores the settings"
        );
    }

    #[test]
    fn bad_changes_apply_nothing_and_name_the_field() {
        let mut c = controlled();
        let r = c.handle(req(r#"{"op":"set","links":[
            {"from":"paris","to":"tokyo","delay_ms":10},
            {"from":"tokyo","to":"paris","loss":2}]}"#));
        assert!(!r.ok);
        assert_eq!(
            r.error.as_deref(),
            Some("links[1].loss: must be a number in 0..=1, got 2")
        );
        assert!(c.emu.link(1, 2).is_none(), "all or nothing");
        let r = c.handle(req(
            r#"{"op":"set","links":[{"from":"paris","to":"rome"}]}"#,
        ));
        assert_eq!(
            r.error.as_deref(),
            Some("links[0].to: unknown site \"rome\"")
        );
    }

    #[test]
    fn sites_can_be_added_with_their_links() {
        let mut c = controlled();
        let r = c.handle(req(
            r#"{"op":"set","sites":[{"index":3,"name":"rome","prefix":"198.18.3.0/24"}],
            "links":[{"from":"rome","to":"paris","delay_ms":5}]}"#,
        ));
        assert!(r.ok, "{r:?}");
        assert_eq!(c.sites.site_of("198.18.3.7".parse().unwrap()), 3);
        assert_eq!(r.links[0].from, "rome");
    }

    #[test]
    fn socket_round_trip() {
        let dir = std::env::temp_dir().join(format!("linkemu-ctl-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("ctl.sock");
        let (tx, rx) = mpsc::channel::<Job>();
        serve(&path, tx, || {}).unwrap();
        let data_path = std::thread::spawn(move || {
            let mut c = controlled();
            for _ in 0..2 {
                let (req, reply) = rx.recv().unwrap();
                reply.send(c.handle(req)).unwrap();
            }
        });
        let ask = |line: &str| {
            let mut s = UnixStream::connect(&path).unwrap();
            s.write_all(line.as_bytes()).unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).unwrap();
            out
        };
        let out = ask(
            "{\"op\":\"set\",\"links\":[{\"from\":\"paris\",\"to\":\"tokyo\",\"delay_ms\":7}]}\n",
        );
        assert!(out.starts_with("{\"ok\":true"), "{out}");
        assert!(out.contains("\"delay_ms\":7.0"), "{out}");
        let out = ask("{\"op\":\"nope\"}\n");
        assert!(out.contains("bad request"), "{out}");
        let out = ask("{\"op\":\"show\"}\n");
        assert!(out.contains("\"from\":\"paris\""), "{out}");
        data_path.join().unwrap();
        let _ = std::fs::remove_dir_all(dir);
    }
}
