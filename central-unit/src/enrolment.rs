//! An agent's credentials towards the CU: the certificate kept in its state
//! directory, or, on its first start, an enrolment with the join token
//! that earns one. Also the one-request exchange that enrolment and
//! `ponctl` share.

use crate::client::{failure_of, seed, ClientError, ClientStatus, CuClientConfig, CU_IDLE_TIMEOUT};
use crate::session::{Backoff, Failure};
use crate::targets::CuAddrs;
use crate::tls::{self, ClientCert};
use pon_identity::Identity;
use pon_proto::control::{
    self, AgentMsg, CuMsg, Enrol, FrameDecoder, Register, MAX_CU_FRAME, PROTOCOL_VERSION,
};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// How long the CU has to answer one request.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Credentials {
    ca: PathBuf,
    identity: Arc<Identity>,
    /// Enrolled already: the configuration with the certificate.
    ready: Option<Ready>,
    /// Not enrolled: what to ask the CU.
    enrol: Option<Enrol>,
}

impl Credentials {
    /// Checks what can be checked before the first connection: the CA file,
    /// the certificate if there is one, else the token to enrol with.
    pub fn new(
        cfg: &CuClientConfig,
        identity: Arc<Identity>,
        register: &Register,
    ) -> Result<Self, ClientError> {
        tls::client_config(&cfg.ca, CU_IDLE_TIMEOUT, None)?;
        let mut c = Credentials {
            ca: cfg.ca.clone(),
            identity,
            ready: None,
            enrol: None,
        };
        match c.identity.certificate()? {
            Some(pem) => c.ready = Some(c.with_certificate(&pem)?),
            None => {
                let token = cfg.token()?.ok_or_else(|| ClientError::NoToken {
                    state_dir: c.identity.dir().display().to_string(),
                })?;
                c.enrol = Some(Enrol {
                    version: PROTOCOL_VERSION,
                    token,
                    cloud: register.cloud.clone(),
                    role: register.role.clone(),
                    name: register.name.clone(),
                    noise_key: register.noise_key,
                    csr: c
                        .identity
                        .certificate_request(&register.cloud, &register.name)?,
                });
            }
        }
        Ok(c)
    }

    fn with_certificate(&self, pem: &str) -> Result<Ready, ClientError> {
        let chain = tls::certs_from_pem(pem).map_err(|why| ClientError::Certificate {
            path: self.identity.certificate_path().display().to_string(),
            why,
        })?;
        let cert = ClientCert::new(chain, self.identity.tls_key_der());
        let tls = tls::client_tls(&self.ca, Some(cert))?;
        Ok(Ready {
            quic: tls::quic_client(tls.clone(), CU_IDLE_TIMEOUT)?,
            tls: Arc::new(tls),
        })
    }

    /// The QUIC configuration with this agent's certificate, enrolling
    /// first if it has none: retried with backoff while the CU cannot be
    /// reached, final when the CU refuses or the TLS handshake fails (a
    /// first start with a bad token or CA is a configuration error: the
    /// session's policy for an agent without a view). Every failure is
    /// counted by reason, as the session's are. `Err` says why the agent
    /// cannot go on.
    /// `attempt`: where in `addrs` to start; left at the attempt that
    /// enrolled, so registering starts with the CU that answered (with
    /// several CU replicas, one being down costs one timeout, not two).
    pub async fn client_config(
        self,
        endpoint: &quinn::Endpoint,
        addrs: &CuAddrs,
        server_name: &str,
        status: &ClientStatus,
        attempt: &mut usize,
    ) -> Result<Ready, String> {
        if let Some(q) = self.ready {
            return Ok(q);
        }
        let msg = AgentMsg::Enrol(self.enrol.clone().expect("no certificate: enrol"));
        let anon =
            tls::client_config(&self.ca, CU_IDLE_TIMEOUT, None).map_err(|e| e.to_string())?;
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5), seed());
        for n in *attempt.. {
            *attempt = n;
            let picked = addrs
                .pick(n, |a| CuAddrs::reachable(endpoint, a))
                .await
                .map_err(|why| Attempt::Retry(Failure::Resolve, why));
            let connected = match picked {
                Ok(addr) => connect(endpoint, anon.clone(), addr, server_name).await,
                Err(e) => Err(e),
            };
            let answer = match connected {
                Ok(conn) => {
                    let a = request(&conn, &msg).await.map_err(|why| {
                        let lost = conn
                            .close_reason()
                            .map_or(Failure::Closed, |e| failure_of(&e));
                        Attempt::Retry(lost, why)
                    });
                    conn.close(0u32.into(), b"done");
                    a
                }
                Err(e) => Err(e),
            };
            let (failed, why) = match answer {
                Ok(CuMsg::Enrolled { certificate }) => {
                    self.identity
                        .save_certificate(&certificate)
                        .map_err(|e| format!("keeping the certificate: {e}"))?;
                    status.counters.enrolments.inc();
                    tracing::info!(cert = %self.identity.certificate_path().display(), "enrolled with the CU");
                    return self
                        .with_certificate(&certificate)
                        .map_err(|e| e.to_string());
                }
                Ok(CuMsg::Refused(why)) => {
                    status.counters.failures(Failure::Refused).inc();
                    return Err(format!("the CU refused to enrol this agent: {why}"));
                }
                Ok(other) => (
                    Failure::BadMessage,
                    format!("unexpected answer to an enrolment: {other:?}"),
                ),
                Err(Attempt::Fatal(failed, why)) => {
                    status.counters.failures(failed).inc();
                    return Err(why);
                }
                Err(Attempt::Retry(failed, why)) => (failed, why),
            };
            status.counters.failures(failed).inc();
            let d = backoff.next_delay();
            tracing::warn!(
                reason = failed.label(),
                retry_in_ms = d.as_millis() as u64,
                "enrolment: {why}"
            );
            tokio::time::sleep(d).await;
        }
        unreachable!("the attempts never run out")
    }
}

/// A failed request to the CU, with the reason it is counted under.
/// An enrolled agent's TLS set-up: over QUIC to the CU, and as it is for
/// a session its proxy relays.
#[derive(Clone)]
pub struct Ready {
    pub quic: quinn::ClientConfig,
    pub tls: Arc<rustls::ClientConfig>,
}

pub enum Attempt {
    /// Retrying cannot help (certificate problems, a `[cu]` section that
    /// cannot make a connection).
    Fatal(Failure, String),
    Retry(Failure, String),
}

impl Attempt {
    /// What to tell the operator.
    pub fn message(self) -> String {
        match self {
            Attempt::Fatal(_, why) | Attempt::Retry(_, why) => why,
        }
    }
}

/// A connection to the CU with `cfg`.
pub async fn connect(
    endpoint: &quinn::Endpoint,
    cfg: quinn::ClientConfig,
    addr: SocketAddr,
    server_name: &str,
) -> Result<quinn::Connection, Attempt> {
    let connecting = endpoint.connect_with(cfg, addr, server_name).map_err(|e| {
        Attempt::Fatal(
            Failure::Config,
            format!("connecting to the CU at {addr}: {e}"),
        )
    })?;
    match tokio::time::timeout(ANSWER_TIMEOUT, connecting).await {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) => match failure_of(&e) {
            Failure::Tls => Err(Attempt::Fatal(Failure::Tls, format!(
                "TLS handshake with the CU at {addr} failed: {e} (is [cu] ca the CA that made the CU's certificate, and server_name = {server_name:?} in it?)"
            ))),
            failed => Err(Attempt::Retry(failed, format!("cannot reach the CU at {addr}: {e}"))),
        },
        Err(_) => Err(Attempt::Retry(
            Failure::Timeout,
            format!("the CU at {addr} did not answer"),
        )),
    }
}

/// Sends `msg` on a new stream of `conn` and returns the CU's one answer.
pub async fn request(conn: &quinn::Connection, msg: &AgentMsg) -> Result<CuMsg, String> {
    let (mut send, mut recv) = conn
        .open_bi()
        .await
        .map_err(|e| format!("opening a stream to the CU: {e}"))?;
    send.write_all(&control::encode(msg))
        .await
        .map_err(|e| format!("sending to the CU: {e}"))?;
    let _ = send.finish();
    let mut dec = FrameDecoder::new(MAX_CU_FRAME);
    let read = crate::stream::read_msg::<CuMsg>(&mut recv, &mut dec);
    match tokio::time::timeout(ANSWER_TIMEOUT, read).await {
        Ok(Ok(Some(m))) => Ok(m),
        Ok(Ok(None)) => Err("the CU closed the stream without answering".into()),
        Ok(Err(crate::stream::ReadFail::Bad(e))) => Err(e.to_string()),
        Ok(Err(crate::stream::ReadFail::Lost(_, e))) => Err(format!("reading from the CU: {e}")),
        Err(_) => Err(format!(
            "the CU did not answer within {} s",
            ANSWER_TIMEOUT.as_secs()
        )),
    }
}
