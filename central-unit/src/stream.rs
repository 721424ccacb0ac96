//! The byte streams control frames travel on, for both ends: an agent's own
//! QUIC stream, or TLS inside a stream its site proxy relays (see
//! `relay`). Frames and messages are the same on both; only how bytes
//! arrive and how a session ends differ.

use crate::session::Failure;
use pon_proto::control::{ControlError, FrameDecoder};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Why reading a message failed.
#[derive(Debug)]
pub enum ReadFail {
    /// The peer sent something that is not a well-formed message.
    Bad(ControlError),
    /// The stream broke: how, for the client's policy, and what happened.
    Lost(Failure, String),
}

/// Where frames arrive from.
pub trait FrameSource: Send {
    /// Reads what has arrived into `dec`; `Ok(false)` at a clean end of
    /// stream.
    fn read_into(
        &mut self,
        dec: &mut FrameDecoder,
    ) -> impl Future<Output = Result<bool, ReadFail>> + Send;
}

/// Reads one message; `Ok(None)` at a clean end of stream.
pub async fn read_msg<T: serde::de::DeserializeOwned>(
    src: &mut impl FrameSource,
    dec: &mut FrameDecoder,
) -> Result<Option<T>, ReadFail> {
    loop {
        if let Some(m) = dec.next_msg::<T>().map_err(ReadFail::Bad)? {
            return Ok(Some(m));
        }
        if !src.read_into(dec).await? {
            return match dec.pending() {
                0 => Ok(None),
                n => Err(ReadFail::Bad(ControlError::Truncated(n))),
            };
        }
    }
}

/// An agent's own QUIC stream: chunks as QUIC delivers them, no copy.
impl FrameSource for quinn::RecvStream {
    async fn read_into(&mut self, dec: &mut FrameDecoder) -> Result<bool, ReadFail> {
        match self.read_chunk(64 * 1024, true).await {
            Ok(Some(c)) => dec.push(&c.bytes).map(|_| true).map_err(ReadFail::Bad),
            Ok(None) => Ok(false),
            Err(e) => Err(ReadFail::Lost(failure_of_read(&e), e.to_string())),
        }
    }
}

/// Any other byte stream (TLS inside a relayed stream), read straight into
/// the decoder's buffer: a buffer of its own would live in every idle
/// session's state, and what agents send between registrations is
/// heartbeats of a few bytes.
pub struct Bytes<R>(pub R);

impl<R: AsyncRead + Unpin + Send> FrameSource for Bytes<R> {
    async fn read_into(&mut self, dec: &mut FrameDecoder) -> Result<bool, ReadFail> {
        let tail = dec.tail();
        // Room for a heartbeat or a few at once; a longer frame grows it.
        tail.reserve(64);
        match self.0.read_buf(tail).await {
            Ok(0) => Ok(false),
            Ok(_) => dec.appended().map(|_| true).map_err(ReadFail::Bad),
            Err(e) => Err(ReadFail::Lost(failure_of_io(&e), e.to_string())),
        }
    }
}

/// The sending side of a session, and how it ends cleanly: what was
/// written reaches the peer before the session is torn down.
pub trait FrameSink: AsyncWrite + Unpin + Send {
    fn end(&mut self) -> impl Future<Output = ()> + Send;
}

impl FrameSink for quinn::SendStream {
    async fn end(&mut self) {
        let _ = self.finish();
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), self.stopped()).await;
    }
}

/// A TLS stream (relayed) ends with its close_notify, then the end of the
/// stream under it.
impl<W: AsyncWrite + Unpin + Send> FrameSink for Bytes<W> {
    async fn end(&mut self) {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), self.shutdown()).await;
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for Bytes<W> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
}

/// A session's two directions as one object (one task reads and writes
/// it): an agent's own QUIC stream's halves.
pub struct Duplex<R, W> {
    pub recv: R,
    pub send: W,
}

impl<R: FrameSource, W: Send> FrameSource for Duplex<R, W> {
    fn read_into(
        &mut self,
        dec: &mut FrameDecoder,
    ) -> impl Future<Output = Result<bool, ReadFail>> + Send {
        self.recv.read_into(dec)
    }
}

impl<R: Unpin, W: AsyncWrite + Unpin> AsyncWrite for Duplex<R, W> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().send).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().send).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().send).poll_shutdown(cx)
    }
}

impl<R: Unpin + Send, W: FrameSink> FrameSink for Duplex<R, W> {
    fn end(&mut self) -> impl Future<Output = ()> + Send {
        self.send.end()
    }
}

/// What a QUIC connection error means: QUIC carries TLS alerts as the error
/// codes 0x100-0x1ff (RFC 9001), whichever side found the problem.
pub fn failure_of(e: &quinn::ConnectionError) -> Failure {
    let tls = |code: u64| (0x100..0x200).contains(&code);
    match e {
        quinn::ConnectionError::TransportError(t) if tls(u64::from(t.code)) => Failure::Tls,
        quinn::ConnectionError::ConnectionClosed(c) if tls(u64::from(c.error_code)) => Failure::Tls,
        quinn::ConnectionError::TimedOut => Failure::Timeout,
        _ => Failure::Closed,
    }
}

fn failure_of_read(e: &quinn::ReadError) -> Failure {
    match e {
        quinn::ReadError::ConnectionLost(c) => failure_of(c),
        _ => Failure::Closed,
    }
}

/// What an error of a byte stream means. TLS errors (a certificate of
/// another CA, a bad record) come out of tokio-rustls as `InvalidData`;
/// the QUIC stream under a relay reports its own.
pub fn failure_of_io(e: &std::io::Error) -> Failure {
    if let Some(inner) = e.get_ref() {
        if let Some(r) = inner.downcast_ref::<quinn::ReadError>() {
            return failure_of_read(r);
        }
        if let Some(quinn::WriteError::ConnectionLost(c)) =
            inner.downcast_ref::<quinn::WriteError>()
        {
            return failure_of(c);
        }
        if inner.downcast_ref::<rustls::Error>().is_some() {
            return Failure::Tls;
        }
    }
    match e.kind() {
        std::io::ErrorKind::InvalidData => Failure::Tls,
        std::io::ErrorKind::TimedOut => Failure::Timeout,
        _ => Failure::Closed,
    }
}

/// Writes `frame` (for the client's error reporting: how it failed).
pub async fn write_frame(w: &mut (impl AsyncWrite + Unpin), frame: &[u8]) -> Result<(), ReadFail> {
    w.write_all(frame)
        .await
        .map_err(|e| ReadFail::Lost(failure_of_io(&e), e.to_string()))?;
    w.flush()
        .await
        .map_err(|e| ReadFail::Lost(failure_of_io(&e), e.to_string()))
}
