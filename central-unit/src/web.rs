//! The CU's HTTP side, on its metrics address: `GET /metrics`
//! (Prometheus), `/healthz`, and the live web view of the overlay: `/` (one
//! page, embedded in the binary), `/picture.json` (the matrix and recent
//! events now) and `/events` (the same picture as server-sent events,
//! pushed whenever it changes, so the page refreshes itself).
//!
//! axum serves it because the view needs long-lived connections (SSE),
//! which the daemons' one-answer metrics endpoint does not keep.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use pon_proto::pmon::{Event, Matrix};
use pon_telemetry::{PromWriter, Renderer};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use tokio::sync::broadcast;
use tokio_stream::StreamExt as _;

const INDEX: &str = include_str!("web/index.html");
/// Events the page lists (the newest).
const EVENTS_SHOWN: usize = 30;
/// Browsers streaming the view at once; more get 503 rather than tying up
/// the CU.
pub const MAX_STREAMS: usize = 64;
/// How long `/picture.json` waits for a fresh picture (one is built within
/// a tick of being asked for, 0.1 s, unless the CU is very busy).
const FRESH_WITHIN: std::time::Duration = std::time::Duration::from_secs(2);

/// The picture the view shows, as JSON, and its subscribers.
pub struct Picture {
    json: RwLock<Arc<str>>,
    tx: broadcast::Sender<Arc<str>>,
    streams: AtomicUsize,
    /// A `/picture.json` waits for the next picture.
    asked: AtomicBool,
}

impl Default for Picture {
    fn default() -> Self {
        Picture {
            json: RwLock::new(Arc::from("{}")),
            tx: broadcast::channel(16).0,
            streams: AtomicUsize::new(0),
            asked: AtomicBool::new(false),
        }
    }
}

impl Picture {
    /// A new picture: stored for new pages, pushed to open ones.
    pub fn publish<'a>(
        &self,
        matrix: &Matrix,
        events: impl DoubleEndedIterator<Item = &'a Event>,
        now_ms: u64,
    ) {
        let recent: Vec<&Event> = events.rev().take(EVENTS_SHOWN).collect();
        let v = serde_json::json!({"now_ms": now_ms, "matrix": matrix, "events": recent});
        let s: Arc<str> = Arc::from(v.to_string());
        if let Ok(mut j) = self.json.write() {
            *j = s.clone();
        }
        let _ = self.tx.send(s);
    }

    /// Whether anyone wants a picture now: a page streaming it, or a
    /// `/picture.json` waiting. Nobody watching, none is built.
    pub fn watched(&self) -> bool {
        self.streams.load(Ordering::Acquire) > 0 || self.asked.swap(false, Ordering::AcqRel)
    }

    /// For a one-shot answer: the next picture will be built and arrive
    /// on the returned receiver.
    pub(crate) fn ask(&self) -> broadcast::Receiver<Arc<str>> {
        let rx = self.tx.subscribe();
        self.asked.store(true, Ordering::Release);
        rx
    }

    /// A page streaming the view: its slot (None beyond `MAX_STREAMS`),
    /// the pictures to come, and the current one. Subscribed before the
    /// current one is read, so nothing published in between is missed.
    pub(crate) fn open_stream(
        self: &Arc<Self>,
    ) -> Option<(StreamSlot, broadcast::Receiver<Arc<str>>, Arc<str>)> {
        if self.streams.fetch_add(1, Ordering::AcqRel) >= MAX_STREAMS {
            self.streams.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        let slot = StreamSlot(self.clone());
        let rx = self.tx.subscribe();
        Some((slot, rx, self.current()))
    }

    pub(crate) fn current(&self) -> Arc<str> {
        self.json
            .read()
            .map(|j| j.clone())
            .unwrap_or_else(|_| Arc::from("{}"))
    }
}

#[derive(Clone)]
struct AppState {
    render: Renderer,
    picture: Arc<Picture>,
}

/// Binds `addr` and serves on the current tokio runtime.
pub async fn serve(
    addr: SocketAddr,
    render: Renderer,
    picture: Arc<Picture>,
) -> std::io::Result<SocketAddr> {
    let app = Router::new()
        .route("/", get(index))
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/picture.json", get(picture_json))
        .route("/events", get(events))
        .with_state(AppState { render, picture });
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "the metrics and web view endpoint stopped");
        }
    });
    Ok(bound)
}

async fn index() -> Response {
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], INDEX).into_response()
}

async fn metrics(State(s): State<AppState>) -> Response {
    let mut w = PromWriter::new();
    (s.render)(&mut w);
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        w.finish(),
    )
        .into_response()
}

/// The picture as it is now: the next one the CU builds (it builds none
/// while nobody looks), or the last one if that takes too long.
async fn picture_json(State(s): State<AppState>) -> Response {
    let mut rx = s.picture.ask();
    let picture = match tokio::time::timeout(FRESH_WITHIN, rx.recv()).await {
        Ok(Ok(p)) => p,
        _ => s.picture.current(),
    };
    (
        [(header::CONTENT_TYPE, "application/json")],
        picture.to_string(),
    )
        .into_response()
}

/// Gives its stream slot back when the browser goes.
pub(crate) struct StreamSlot(Arc<Picture>);

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.streams.fetch_sub(1, Ordering::AcqRel);
    }
}

async fn events(State(s): State<AppState>) -> Response {
    let Some((slot, rx, first)) = s.picture.open_stream() else {
        return (StatusCode::SERVICE_UNAVAILABLE, "too many viewers\n").into_response();
    };
    // A browser that falls behind skips pictures (each one is whole).
    let updates = tokio_stream::wrappers::BroadcastStream::new(rx).filter_map(|r| r.ok());
    let stream = tokio_stream::once(first).chain(updates).map(move |p| {
        let _keep = &slot;
        Ok::<_, std::convert::Infallible>(SseEvent::default().event("picture").data(&*p))
    });
    Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
}
