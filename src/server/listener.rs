//! The HTTP accept loop, with the limits an unauthenticated peer must not be able to exceed.
//!
//! `axum::serve` has no header timeout, no connection cap and no write deadline, so a lab
//! host could hold thousands of idle or slowloris connections, or open event streams it never
//! reads. This loop serves the same router through hyper's HTTP/1 connection with:
//!
//! - a header-read timeout (hyper restarts it whenever it waits for the next request, so it
//!   also closes idle keep-alive connections);
//! - a write deadline: a connection whose response makes no progress for `write_timeout` is
//!   closed ([`Deadline`]), which is how a client that stopped reading an event stream is
//!   dropped instead of pinning buffers;
//! - a bounded write buffer per connection (hyper's `max_buf_size`): hyper stops pulling a
//!   response body while its buffer is full, so an unread stream holds at most this much plus
//!   one event;
//! - a cap on open connections: over it, a new connection is closed as soon as it is
//!   accepted;
//! - a backoff when `accept` fails for lack of file descriptors, logging once per interval.
//!
//! - with a [`TlsAcceptor`] (the HTTPS listener), a TLS handshake bounded by the header
//!   timeout before any of that.
//!
//! Each request carries its [`Transport`], so that the API can refuse tokens sent in clear
//! once HTTPS is configured.
//!
//! Tasks: this loop, and one task per connection, tracked so that shutdown waits for them.
//! HTTP/2 is not offered: every client of this server (agents, the CLI, browsers on plain
//! HTTP) speaks HTTP/1.1.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::ConnectInfo;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

/// How long `accept` pauses after failing for want of file descriptors (or any other reason
/// that is not one connection's): long enough not to spin, short enough that service resumes
/// at once when descriptors free up.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// At most one log line per this interval for each kind of repeated trouble (accept errors,
/// connections over the cap); the rest are counted in `/metrics`.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// Largest write buffer of one connection. hyper's default is about 400 KiB; with hundreds
/// of event streams open that is most of the server's memory, and 64 KiB already holds the
/// biggest API answers' frames without extra round trips.
const MAX_BUF_SIZE: usize = 64 * 1024;

/// How long connections get to finish their request after shutdown began.
const DRAIN: Duration = Duration::from_secs(5);

/// The limits of [`serve`]; see the config fields of the same names.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub header_timeout: Duration,
    pub write_timeout: Duration,
    pub max_connections: usize,
}

/// Counters of the listener, rendered into `/metrics`.
#[derive(Debug, Default)]
pub struct ListenerStats {
    open: AtomicU64,
    accepted: AtomicU64,
    over_cap: AtomicU64,
    accept_errors: AtomicU64,
    write_timeouts: AtomicU64,
}

impl ListenerStats {
    /// Appends the listener's metric families in the Prometheus text format.
    pub fn render(&self, out: &mut String) {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        for (name, kind, help, value) in [
            (
                "boottorrent_http_connections_open",
                "gauge",
                "HTTP connections open now.",
                get(&self.open),
            ),
            (
                "boottorrent_http_connections_accepted_total",
                "counter",
                "HTTP connections accepted and served.",
                get(&self.accepted),
            ),
            (
                "boottorrent_http_connections_over_cap_total",
                "counter",
                "HTTP connections closed at once because http_max_connections were open.",
                get(&self.over_cap),
            ),
            (
                "boottorrent_http_accept_errors_total",
                "counter",
                "Failed accepts on the HTTP port (e.g. out of file descriptors).",
                get(&self.accept_errors),
            ),
            (
                "boottorrent_http_write_timeouts_total",
                "counter",
                "HTTP connections closed because a response made no progress for http_write_timeout_secs (a client that stopped reading).",
                get(&self.write_timeouts),
            ),
        ] {
            out.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"
            ));
        }
    }
}

/// How a request reached the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Plain,
    Tls,
}

/// The server side of TLS, from the same PEM files as the MQTT TLS listener.
pub type TlsAcceptor = tokio_rustls::TlsAcceptor;

/// A TLS acceptor for `cert` (a PEM chain) and `key` (a PEM private key), offering the
/// application protocols `alpn` (none for MQTT: its clients rarely send any).
pub fn tls_acceptor(
    cert: &std::path::Path,
    key: &std::path::Path,
    alpn: &[&[u8]],
) -> anyhow::Result<TlsAcceptor> {
    use anyhow::Context as _;
    let certs = rustls_pemfile::certs(&mut io::BufReader::new(
        std::fs::File::open(cert).with_context(|| format!("opening {}", cert.display()))?,
    ))
    .collect::<Result<Vec<_>, _>>()
    .with_context(|| format!("reading TLS certificate {}", cert.display()))?;
    let key = rustls_pemfile::private_key(&mut io::BufReader::new(
        std::fs::File::open(key).with_context(|| format!("opening {}", key.display()))?,
    ))
    .with_context(|| format!("reading TLS private key {}", key.display()))?
    .with_context(|| format!("TLS private key {} holds no private key", key.display()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .context("setting up TLS")?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .with_context(|| {
        format!(
            "the TLS certificate {} does not match its key",
            cert.display()
        )
    })?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Serves `app` on `listener` (over TLS with `tls`) until `shutdown` is cancelled, then gives
/// open connections [`DRAIN`] to finish.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    stats: Arc<ListenerStats>,
    tls: Option<TlsAcceptor>,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let permits = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(MAX_BUF_SIZE);
    let connections = TaskTracker::new();
    let mut accept_log = Throttle::default();
    let mut cap_log = Throttle::default();
    let count_error = || {
        stats.accept_errors.fetch_add(1, Ordering::Relaxed);
    };
    while let Some((stream, remote)) = accept(
        &listener,
        &shutdown,
        &mut accept_log,
        "an HTTP",
        count_error,
    )
    .await
    {
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            stats.over_cap.fetch_add(1, Ordering::Relaxed);
            if let Some(suppressed) = cap_log.due() {
                tracing::warn!(
                    %remote,
                    suppressed,
                    max = limits.max_connections,
                    "closing a new HTTP connection: http_max_connections are open"
                );
            }
            drop(stream);
            continue;
        };
        stats.accepted.fetch_add(1, Ordering::Relaxed);
        // Small answers (tracker, API) should leave at once, not wait for Nagle.
        let _ = stream.set_nodelay(true);
        let stream = Deadline::new(stream, limits.write_timeout, stats.clone());
        let transport = if tls.is_some() {
            Transport::Tls
        } else {
            Transport::Plain
        };
        let app = app.clone();
        let service = hyper::service::service_fn(move |mut request| {
            // The tracker hands out the TCP source address, never a claimed one.
            request.extensions_mut().insert(ConnectInfo(remote));
            request.extensions_mut().insert(transport);
            app.clone().oneshot(request)
        });
        let builder = builder.clone();
        let stats = stats.clone();
        let shutdown = shutdown.clone();
        let tls = tls.clone();
        let header_timeout = limits.header_timeout;
        connections.spawn(async move {
            let _permit = permit;
            let _open = OpenGuard::new(&stats);
            let result = match tls {
                None => {
                    drive(
                        builder.serve_connection(TokioIo::new(stream), service),
                        &shutdown,
                    )
                    .await
                }
                Some(tls) => {
                    // The handshake is part of what a slow client must finish in time.
                    match tokio::time::timeout(header_timeout, tls.accept(stream)).await {
                        Ok(Ok(stream)) => {
                            drive(
                                builder.serve_connection(TokioIo::new(stream), service),
                                &shutdown,
                            )
                            .await
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(%remote, error = %e, "TLS handshake failed");
                            Ok(())
                        }
                        Err(_) => {
                            tracing::debug!(%remote, "no TLS handshake within the header timeout");
                            Ok(())
                        }
                    }
                }
            };
            if let Err(e) = result {
                // Timeouts, resets and garbage are the client's business, not an operator's.
                tracing::debug!(%remote, error = %e, "HTTP connection ended");
            }
        });
    }
    connections.close();
    connections.wait().await;
    Ok(())
}

/// Runs one connection until it ends, or until shutdown and then [`DRAIN`] more.
async fn drive<I, S>(
    connection: hyper::server::conn::http1::Connection<I, S>,
    shutdown: &CancellationToken,
) -> hyper::Result<()>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin,
    S: hyper::service::HttpService<hyper::body::Incoming>,
    S::ResBody: 'static,
    <S::ResBody as hyper::body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    tokio::pin!(connection);
    tokio::select! {
        result = connection.as_mut() => result,
        _ = shutdown.cancelled() => {
            connection.as_mut().graceful_shutdown();
            tokio::time::timeout(DRAIN, connection.as_mut())
                .await
                .unwrap_or(Ok(()))
        }
    }
}

/// Errors of one connection that `accept` reports; the listener itself is fine.
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// The next connection on `listener`, or `None` once `shutdown` is cancelled. A failure that
/// is not one connection's own (out of file descriptors, say) is counted by `on_error`,
/// logged at most once per interval as a failure to accept `what` connection, and followed
/// by a pause of [`ACCEPT_BACKOFF`] rather than a spin.
pub async fn accept(
    listener: &TcpListener,
    shutdown: &CancellationToken,
    log: &mut Throttle,
    what: &str,
    on_error: impl Fn(),
) -> Option<(TcpStream, std::net::SocketAddr)> {
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return None,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok(accepted) => return Some(accepted),
            Err(e) if is_connection_error(&e) => continue,
            Err(e) => {
                on_error();
                if let Some(suppressed) = log.due() {
                    tracing::warn!(
                        error = %e,
                        suppressed,
                        "accepting {what} connection failed; pausing {} ms between attempts \
                         (out of file descriptors? see `ulimit -n`)",
                        ACCEPT_BACKOFF.as_millis()
                    );
                }
                tokio::time::sleep(ACCEPT_BACKOFF).await;
            }
        }
    }
}

/// Lets one log line through per [`LOG_EVERY`], counting the others.
#[derive(Default)]
pub struct Throttle {
    last: Option<Instant>,
    suppressed: u64,
}

impl Throttle {
    /// `Some(lines suppressed since the last one)` when a line may be logged now.
    pub fn due(&mut self) -> Option<u64> {
        let now = Instant::now();
        if self.last.is_some_and(|last| now < last + LOG_EVERY) {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }
}

/// Counts a connection as open for as long as it lives.
struct OpenGuard<'a>(&'a ListenerStats);

impl<'a> OpenGuard<'a> {
    fn new(stats: &'a ListenerStats) -> Self {
        stats.open.fetch_add(1, Ordering::Relaxed);
        OpenGuard(stats)
    }
}

impl Drop for OpenGuard<'_> {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A TCP stream whose writes fail with `TimedOut` once one has been pending, without a byte
/// going out, for the deadline. Reads are left alone: an event stream's client legitimately
/// sends nothing for hours, and hyper's header timeout covers waiting for requests.
struct Deadline {
    inner: TcpStream,
    timeout: Duration,
    /// Running while a write is pending; dropped as soon as one makes progress.
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
    stats: Arc<ListenerStats>,
}

impl Deadline {
    fn new(inner: TcpStream, timeout: Duration, stats: Arc<ListenerStats>) -> Self {
        Deadline {
            inner,
            timeout,
            stalled: None,
            stats,
        }
    }

    /// Maps a write-side poll: progress clears the clock, `Pending` starts or checks it.
    fn watch<T>(&mut self, cx: &mut Context<'_>, poll: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if poll.is_ready() {
            self.stalled = None;
            return poll;
        }
        let timeout = self.timeout;
        let clock = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        if clock.as_mut().poll(cx).is_ready() {
            self.stalled = None;
            self.stats.write_timeouts.fetch_add(1, Ordering::Relaxed);
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "the client read nothing for {} s; dropping it",
                    timeout.as_secs()
                ),
            )));
        }
        Poll::Pending
    }
}

impl AsyncRead for Deadline {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Deadline {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.watch(cx, poll)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.watch(cx, poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let poll = Pin::new(&mut self.inner).poll_flush(cx);
        self.watch(cx, poll)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let poll = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.watch(cx, poll)
    }
}

/// This process's soft open-file limit, if it can be read.
pub fn open_file_limit() -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return None;
    }
    Some(limit.rlim_cur)
}

/// Raises this process's soft open-file limit to its hard limit. Every agent holds an MQTT
/// connection and the HTTP port takes thousands more; the usual soft limit of 1,024 would be
/// reached by a fleet, let alone a flood. Logged once; a failure only costs headroom.
pub fn raise_open_file_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        tracing::warn!(
            error = %io::Error::last_os_error(),
            "cannot read the open-file limit; keeping it"
        );
        return;
    }
    let before = limit.rlim_cur;
    if before >= limit.rlim_max {
        tracing::info!(limit = before, "open-file limit already at its hard limit");
        return;
    }
    limit.rlim_cur = limit.rlim_max;
    // SAFETY: setrlimit reads the struct we pass.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
        tracing::warn!(
            error = %io::Error::last_os_error(),
            soft = before,
            hard = limit.rlim_max,
            "cannot raise the open-file limit; raise it for the service (LimitNOFILE=)"
        );
        return;
    }
    tracing::info!(
        from = before,
        to = limit.rlim_max,
        "raised the open-file limit to the hard limit"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_throttle_lets_one_line_through_per_interval_and_counts_the_rest() {
        let mut throttle = Throttle::default();
        assert_eq!(throttle.due(), Some(0));
        for _ in 0..1000 {
            assert_eq!(throttle.due(), None);
        }
        throttle.last = Some(Instant::now() - LOG_EVERY);
        assert_eq!(throttle.due(), Some(1000));
    }
}
