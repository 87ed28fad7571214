//! The origin client: HTTP and HTTPS downloads of byte ranges with reqwest.
//!
//! - Pieces are fetched with `Range` requests (RFC 9110 §14). A server that ignores `Range` and
//!   answers 200 with the whole body still works: the client then reads from the start and skips
//!   to the bytes it needs.
//! - Redirects are followed (reqwest's default policy, at most 10).
//! - 5xx, 408, 429, connection resets and timeouts are retried with exponential backoff
//!   ([`Config::retries`], [`Config::backoff`]); once retries run out the error is transient, and
//!   the job goes to TransientError rather than Error.
//! - The first response's `ETag` (or `Last-Modified`) is remembered and sent as `If-Range` on
//!   every later request. Content that changes mid-job (a 200 where a 206 was asked for, another
//!   ETag, another length) is [`OriginError::Changed`], never a corrupt file.
//! - 404, 410, 403 and 401 are fatal errors naming the URL.
//! - A server certificate that does not verify, or a TLS handshake the server refused (a client
//!   certificate it did not accept), is fatal at once: retrying cannot fix it.
//! - A job's HTTP options ([`crate::job::HttpOptions`]) give its own client
//!   ([`Client::for_job`]): headers and credentials on every request, a client certificate,
//!   extra CA certificates, and its proxies, tried in order.

use std::{
    ops::Range,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use reqwest::{StatusCode, header};
use thiserror::Error;
use url::Url;

/// Origin client settings.
#[derive(Clone, Debug)]
pub struct Config {
    /// Retries of one request after a transient failure.
    pub retries: u32,
    /// The first retry's delay; doubled each time, at most 8 s.
    pub backoff: Duration,
    /// Connect timeout.
    pub connect_timeout: Duration,
    /// Longest wait for the next bytes of a response.
    pub read_timeout: Duration,
    /// The node's proxy (`[origin] proxy`), which jobs with
    /// [`crate::job::ProxyUsage::Preconfig`] use.
    pub proxy: ProxySetting,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            retries: 5,
            backoff: Duration::from_millis(500),
            connect_timeout: Duration::from_secs(10),
            read_timeout: Duration::from_secs(30),
            proxy: ProxySetting::default(),
        }
    }
}

/// The node's proxy setting (`[origin] proxy` and `proxy_bypass`), BITS's "preconfig" proxy.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum ProxySetting {
    /// The standard environment variables of the node's process: `http_proxy` for `http://`
    /// URLs, `https_proxy` for `https://` URLs (either case), and `no_proxy` for the hosts
    /// reached directly.
    #[default]
    Environment,
    /// Direct connections, whatever the environment says.
    Direct,
    /// This proxy (`http://` or `https://`, optionally with `USER:PASSWORD@`) for every
    /// origin, except the hosts in `bypass` (as `no_proxy` takes them).
    Proxy {
        /// The proxy.
        url: Url,
        /// Hosts, addresses or CIDR ranges reached directly.
        bypass: Vec<String>,
    },
}

/// The files a job's TLS options name, read (as the job's owner) before its client is built.
#[derive(Default)]
pub(crate) struct TlsFiles {
    /// The client certificate chain and its key, PEM, concatenated.
    pub(crate) identity: Option<(PathBuf, Vec<u8>)>,
    /// Each extra CA file and its PEM content.
    pub(crate) cas: Vec<(PathBuf, Vec<u8>)>,
}

impl TlsFiles {
    /// Reads the files `http` names, in the calling thread's file-system identity (call it
    /// under [`crate::store::fsuser::as_owner`]).
    ///
    /// # Errors
    /// The path and the I/O error of the first file that cannot be read.
    pub(crate) fn read(http: &crate::job::HttpOptions) -> Result<Self, (PathBuf, std::io::Error)> {
        let read = |p: &PathBuf| {
            // At most 1 MiB: a certificate file is a few KiB, and a FIFO or a huge file a user
            // names must not stall or swell the daemon.
            use std::io::Read;
            let f = std::fs::File::open(p).map_err(|e| (p.clone(), e))?;
            if !f.metadata().map_err(|e| (p.clone(), e))?.is_file() {
                return Err((
                    p.clone(),
                    std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a regular file"),
                ));
            }
            let mut buf = Vec::new();
            f.take(1 << 20)
                .read_to_end(&mut buf)
                .map_err(|e| (p.clone(), e))?;
            Ok(buf)
        };
        let mut files = Self::default();
        if let Some(c) = &http.client_certificate {
            let mut pem = read(&c.key)?;
            pem.push(b'\n');
            pem.extend(read(&c.certificate)?);
            files.identity = Some((c.certificate.clone(), pem));
        }
        for p in &http.ca_certificates {
            files.cas.push((p.clone(), read(p)?));
        }
        Ok(files)
    }
}

/// An origin failure.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub(crate) enum OriginError {
    /// 404 or 410.
    #[error("{} was not found (HTTP {status})", redact(.url))]
    NotFound {
        /// The URL.
        url: Url,
        /// The status code.
        status: u16,
    },
    /// 401 or 403.
    #[error("access to {} was denied (HTTP {status})", redact(.url))]
    Denied {
        /// The URL.
        url: Url,
        /// The status code.
        status: u16,
    },
    /// Another 4xx the client cannot fix by retrying.
    #[error("{} answered HTTP {status}", redact(.url))]
    Status {
        /// The URL.
        url: Url,
        /// The status code.
        status: u16,
    },
    /// The content changed during the job (ETag, Last-Modified or length differ, or `If-Range`
    /// failed).
    #[error("the content at {} changed during the job: {detail}", redact(.url))]
    Changed {
        /// The URL.
        url: Url,
        /// What differed.
        detail: String,
    },
    /// The server's TLS certificate did not verify.
    #[error("the TLS certificate of {} did not verify: {detail}", redact(.url))]
    Certificate {
        /// The URL.
        url: Url,
        /// What the TLS stack said.
        detail: String,
    },
    /// The server refused the TLS handshake (a client certificate it did not accept, or
    /// none where it requires one).
    #[error("{} refused the TLS handshake: {detail}", redact(.url))]
    TlsRefused {
        /// The URL.
        url: Url,
        /// What the TLS stack said.
        detail: String,
    },
    /// The response is unusable (no length, a wrong Content-Range).
    #[error("{} gave an unusable response: {detail}", redact(.url))]
    BadResponse {
        /// The URL.
        url: Url,
        /// What was wrong.
        detail: String,
    },
    /// Network failures or 5xx that outlasted the retries.
    #[error("{} is unreachable: {detail}", redact(.url))]
    Unreachable {
        /// The URL.
        url: Url,
        /// The last failure.
        detail: String,
    },
}

impl OriginError {
    /// True when trying again later may succeed (the job goes to TransientError).
    #[must_use]
    pub(crate) fn is_transient(&self) -> bool {
        matches!(self, Self::Unreachable { .. })
    }
}

/// `url` as it may be logged or told to others: without user information, and with the query
/// and fragment (where presigned tokens live) replaced by `?…`.
#[must_use]
pub(crate) fn redact(url: &Url) -> String {
    let mut u = url.clone();
    let _ = u.set_username("");
    let _ = u.set_password(None);
    let hidden = u.query().is_some() || u.fragment().is_some();
    u.set_query(None);
    u.set_fragment(None);
    if hidden {
        format!("{u}?…")
    } else {
        u.to_string()
    }
}

/// Whether `url` carries something secret: user information or a query string (presigned
/// URLs carry their signature there). Such URLs are never sent to peers or cache nodes.
#[must_use]
pub(crate) fn has_secrets(url: &Url) -> bool {
    !url.username().is_empty() || url.password().is_some() || url.query().is_some()
}

/// What the origin told about a resource on first contact.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Remote {
    /// The resource's length in bytes.
    pub length: u64,
    /// Whether the server honours `Range`.
    pub ranges: bool,
    /// The validator to send as `If-Range` and compare: the ETag, else Last-Modified.
    pub validator: Option<String>,
}

/// The origin HTTP client; cheap to clone.
#[derive(Clone, Debug)]
pub(crate) struct Client {
    /// One client per proxy to try, in order (one for the usual single choice).
    clients: Arc<[reqwest::Client]>,
    /// The client in use; the next one after a request failed at the network level.
    current: Arc<AtomicUsize>,
    /// The job's credentials, set on each request.
    credentials: Option<crate::job::Credentials>,
    config: Config,
}

/// How one of a client's connections reaches the origin.
enum Route {
    Environment,
    Direct,
    Proxy(Url, Vec<String>),
}

pub(crate) enum Attempt<T> {
    Done(T),
    Retry(String),
}

fn install_crypto_provider() {
    // reqwest is built without a default provider; ring is the one libp2p already uses.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

impl Client {
    /// A client with `config`.
    ///
    /// # Errors
    /// The `reqwest::Error` when the HTTP client or its TLS stack cannot be built; the node
    /// reports it as [`crate::Error::Origin`].
    pub(crate) fn new(config: Config) -> Result<Self, reqwest::Error> {
        Self::build(config, reqwest::redirect::Policy::default())
    }

    /// A client like [`Client::new`]'s that follows a redirect only to a URL `allowed` says
    /// yes to (at most 10 hops); any other redirect is returned as the response, which the
    /// caller then sees as a failed request (the cache node role: fetches for peers stay
    /// within the configured origins).
    ///
    /// # Errors
    /// As [`Client::new`].
    pub(crate) fn with_redirect_filter(
        config: Config,
        allowed: impl Fn(&Url) -> bool + Send + Sync + 'static,
    ) -> Result<Self, reqwest::Error> {
        let policy = reqwest::redirect::Policy::custom(move |attempt| {
            if attempt.previous().len() >= 10 {
                attempt.error("too many redirects")
            } else if allowed(attempt.url()) {
                attempt.follow()
            } else {
                tracing::info!(url = %redact(attempt.url()), "redirect outside the allowed origins not followed");
                attempt.stop()
            }
        });
        Self::build(config, policy)
    }

    fn build(config: Config, redirect: reqwest::redirect::Policy) -> Result<Self, reqwest::Error> {
        let route = Self::node_route(&config);
        let http = Self::builder(&config, route)?.redirect(redirect).build()?;
        Ok(Self {
            clients: Arc::from([http]),
            current: Arc::default(),
            credentials: None,
            config,
        })
    }

    fn node_route(config: &Config) -> Route {
        match &config.proxy {
            ProxySetting::Environment => Route::Environment,
            ProxySetting::Direct => Route::Direct,
            ProxySetting::Proxy { url, bypass } => Route::Proxy(url.clone(), bypass.clone()),
        }
    }

    /// A builder with the node's timeouts and user agent, going by `route`.
    fn builder(config: &Config, route: Route) -> Result<reqwest::ClientBuilder, reqwest::Error> {
        install_crypto_provider();
        let b = reqwest::Client::builder()
            .connect_timeout(config.connect_timeout)
            .read_timeout(config.read_timeout)
            .user_agent(concat!("shoal/", env!("CARGO_PKG_VERSION")));
        Ok(match route {
            // reqwest reads http_proxy, https_proxy and no_proxy itself unless told otherwise.
            Route::Environment => b,
            Route::Direct => b.no_proxy(),
            Route::Proxy(url, bypass) => b.proxy(
                reqwest::Proxy::all(url)?
                    .no_proxy(reqwest::NoProxy::from_string(&bypass.join(","))),
            ),
        })
    }

    /// The client of a job with HTTP options `http`: `files` are the TLS files they name,
    /// already read as the job's owner. A job without options uses the node's client.
    ///
    /// # Errors
    /// A description naming the option that cannot be used (a header that does not parse, a
    /// certificate or key file that is not PEM, a proxy URL reqwest refuses).
    pub(crate) fn for_job(
        config: &Config,
        http: &crate::job::HttpOptions,
        files: &TlsFiles,
    ) -> Result<Self, String> {
        use crate::job::ProxyUsage;
        let mut headers = header::HeaderMap::new();
        for (name, value) in &http.headers {
            let n = header::HeaderName::from_bytes(name.as_bytes())
                .map_err(|e| format!("header {name:?}: {e}"))?;
            let mut v = header::HeaderValue::from_str(value)
                .map_err(|e| format!("header {name:?}: {e}"))?;
            v.set_sensitive(true);
            headers.append(n, v);
        }
        let identity = files
            .identity
            .as_ref()
            .map(|(path, pem)| {
                reqwest::Identity::from_pem(pem).map_err(|e| {
                    format!(
                        "client certificate {}: not a PEM certificate and key: {}",
                        path.display(),
                        describe(&e)
                    )
                })
            })
            .transpose()?;
        let mut cas = Vec::new();
        for (path, pem) in &files.cas {
            let certs = reqwest::Certificate::from_pem_bundle(pem)
                .map_err(|e| format!("CA certificates {}: {}", path.display(), describe(&e)))?;
            if certs.is_empty() {
                return Err(format!(
                    "CA certificates {}: no PEM certificate in it",
                    path.display()
                ));
            }
            cas.extend(certs);
        }
        let routes = match &http.proxy {
            ProxyUsage::Preconfig => vec![Self::node_route(config)],
            ProxyUsage::NoProxy => vec![Route::Direct],
            ProxyUsage::Override { proxies, bypass } => proxies
                .iter()
                .map(|p| Route::Proxy(p.clone(), bypass.clone()))
                .collect(),
        };
        let mut clients = Vec::with_capacity(routes.len());
        for route in routes {
            let mut b = Self::builder(config, route)
                .map_err(|e| format!("proxy: {}", describe(&e)))?
                .default_headers(headers.clone());
            if let Some(id) = &identity {
                b = b.identity(id.clone());
            }
            if !cas.is_empty() {
                b = b.tls_certs_merge(cas.iter().cloned());
            }
            clients.push(b.build().map_err(|e| describe(&e))?);
        }
        Ok(Self {
            clients: Arc::from(clients),
            current: Arc::default(),
            credentials: http.credentials.clone(),
            config: config.clone(),
        })
    }

    /// A GET of `url` through the client in use, with the job's credentials.
    pub(crate) fn get(&self, url: &Url) -> reqwest::RequestBuilder {
        self.request(reqwest::Method::GET, url)
    }

    /// A request of `method` to `url` through the client in use, with the job's credentials
    /// (the BITS upload protocol's `BITS_POST`, too).
    pub(crate) fn request(&self, method: reqwest::Method, url: &Url) -> reqwest::RequestBuilder {
        let i = self.current.load(Ordering::Relaxed) % self.clients.len();
        let req = self.clients[i].request(method, url.clone());
        match &self.credentials {
            None => req,
            Some(crate::job::Credentials::Basic { user, password }) => {
                req.basic_auth(user, Some(password))
            }
            Some(crate::job::Credentials::Bearer { token }) => req.bearer_auth(token),
        }
    }

    /// The error of a request that failed before a response: fatal when TLS verification
    /// failed or the server refused the handshake, else worth a retry.
    pub(crate) fn send_failure<T>(
        url: &Url,
        e: &reqwest::Error,
    ) -> Result<Attempt<T>, OriginError> {
        match tls_failure(e) {
            Some(TlsFailure::Certificate(detail)) => Err(OriginError::Certificate {
                url: url.clone(),
                detail,
            }),
            Some(TlsFailure::Refused(detail)) => Err(OriginError::TlsRefused {
                url: url.clone(),
                detail,
            }),
            None => Ok(Attempt::Retry(describe(e))),
        }
    }

    /// The settings the client was built with.
    #[must_use]
    pub(crate) fn config(&self) -> &Config {
        &self.config
    }

    /// Waits before retry `attempt` (0-based) after `detail`, or gives up with
    /// [`OriginError::Unreachable`] once the retries are spent.
    pub(crate) async fn backoff(
        &self,
        url: &Url,
        attempt: u32,
        detail: String,
    ) -> Result<(), OriginError> {
        if attempt >= self.config.retries {
            return Err(OriginError::Unreachable {
                url: url.clone(),
                detail,
            });
        }
        tracing::debug!(url = %redact(url), attempt, "origin retry after: {detail}");
        if self.clients.len() > 1 {
            // The next proxy of the job's list.
            self.current.fetch_add(1, Ordering::Relaxed);
        }
        let delay = self
            .config
            .backoff
            .saturating_mul(1 << attempt.min(16))
            .min(Duration::from_secs(8));
        tokio::time::sleep(delay).await;
        Ok(())
    }

    fn classify(url: &Url, status: StatusCode) -> Result<Attempt<()>, OriginError> {
        let code = status.as_u16();
        match code {
            200..=299 => Ok(Attempt::Done(())),
            404 | 410 => Err(OriginError::NotFound {
                url: url.clone(),
                status: code,
            }),
            401 | 403 => Err(OriginError::Denied {
                url: url.clone(),
                status: code,
            }),
            408 | 429 | 500..=599 => Ok(Attempt::Retry(format!("HTTP {code}"))),
            _ => Err(OriginError::Status {
                url: url.clone(),
                status: code,
            }),
        }
    }

    /// Learns the resource's length, Range support and validator with a one-byte range request.
    ///
    /// # Errors
    /// Fatal [`OriginError`]s for 4xx, [`OriginError::BadResponse`] without a length, and
    /// [`OriginError::Unreachable`] after the retries.
    pub(crate) async fn probe(&self, url: &Url) -> Result<Remote, OriginError> {
        let mut attempt = 0;
        loop {
            match self.probe_once(url).await? {
                Attempt::Done(r) => return Ok(r),
                Attempt::Retry(detail) => self.backoff(url, attempt, detail).await?,
            }
            attempt += 1;
        }
    }

    async fn probe_once(&self, url: &Url) -> Result<Attempt<Remote>, OriginError> {
        let resp = match self
            .get(url)
            .header(header::RANGE, "bytes=0-0")
            .send()
            .await
        {
            Ok(r) => r,
            Err(e) => return Self::send_failure(url, &e),
        };
        if resp.status() == StatusCode::RANGE_NOT_SATISFIABLE {
            // An empty resource has no byte 0: `Content-Range: bytes */0`.
            let length = resp
                .headers()
                .get(header::CONTENT_RANGE)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("bytes */"))
                .and_then(|n| n.trim().parse::<u64>().ok())
                .ok_or_else(|| OriginError::BadResponse {
                    url: url.clone(),
                    detail: "416 without a Content-Range length".into(),
                })?;
            return Ok(Attempt::Done(Remote {
                length,
                ranges: true,
                validator: validator_of(resp.headers()),
            }));
        }
        if let Attempt::Retry(d) = Self::classify(url, resp.status())? {
            return Ok(Attempt::Retry(d));
        }
        let validator = validator_of(resp.headers());
        let remote = if resp.status() == StatusCode::PARTIAL_CONTENT {
            let (_, total) =
                content_range(resp.headers()).ok_or_else(|| OriginError::BadResponse {
                    url: url.clone(),
                    detail: "206 without a Content-Range total".into(),
                })?;
            Remote {
                length: total,
                ranges: true,
                validator,
            }
        } else {
            let length = resp
                .content_length()
                .ok_or_else(|| OriginError::BadResponse {
                    url: url.clone(),
                    detail: "no Content-Length".into(),
                })?;
            Remote {
                length,
                ranges: false,
                validator,
            }
        };
        // Dropping the response closes a 200's body early.
        Ok(Attempt::Done(remote))
    }

    /// Streams bytes `range` of the resource (end exclusive) as pieces of `piece_size` bytes
    /// aligned to `range.start`; each complete piece is passed to `sink`, which returns false
    /// to stop. A stream broken midway is resumed from the next missing piece, within the
    /// retries.
    ///
    /// # Errors
    /// As [`Client::probe`], plus [`OriginError::Changed`] when the content changed.
    pub(crate) async fn fetch<F>(
        &self,
        url: &Url,
        remote: &Remote,
        range: Range<u64>,
        piece_size: u64,
        mut sink: impl FnMut(Bytes) -> F,
    ) -> Result<(), OriginError>
    where
        F: Future<Output = bool>,
    {
        let mut pos = range.start;
        let mut attempt = 0;
        loop {
            let before = pos;
            match self
                .fetch_once(url, remote, &mut pos, range.end, piece_size, &mut sink)
                .await?
            {
                Attempt::Done(()) => return Ok(()),
                Attempt::Retry(detail) => {
                    if pos > before {
                        // Progress resets the count: a long transfer over a flaky link goes on.
                        attempt = 0;
                    }
                    self.backoff(url, attempt, detail).await?;
                    attempt += 1;
                }
            }
        }
    }

    async fn fetch_once<F>(
        &self,
        url: &Url,
        remote: &Remote,
        pos: &mut u64,
        end: u64,
        piece_size: u64,
        sink: &mut impl FnMut(Bytes) -> F,
    ) -> Result<Attempt<()>, OriginError>
    where
        F: Future<Output = bool>,
    {
        if *pos >= end {
            return Ok(Attempt::Done(()));
        }
        let mut req = self.get(url);
        if remote.ranges {
            req = req.header(header::RANGE, format!("bytes={}-{}", *pos, end - 1));
            if let Some(v) = &remote.validator {
                req = req.header(header::IF_RANGE, v);
            }
        }
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) => return Self::send_failure(url, &e),
        };
        if let Attempt::Retry(d) = Self::classify(url, resp.status())? {
            return Ok(Attempt::Retry(d));
        }
        check_same(url, remote, &resp, *pos, end)?;
        let mut skip = if remote.ranges { 0 } else { *pos };
        // Fewer wake-ups while a long body trickles in (decision 0023).
        let mut mark = super::lowat::LowWater::for_response(&resp);
        let mut body = resp.bytes_stream();
        // Each piece in a reused buffer, aligned for a direct write.
        let mut buf = crate::bufpool::Filling::new(piece_size.min(end - *pos) as usize);
        while let Some(chunk) = super::lowat::next_chunk(&mut mark, &mut body).await {
            let mut chunk = match chunk {
                Ok(c) => c,
                Err(e) => return Ok(Attempt::Retry(describe(&e))),
            };
            if skip > 0 {
                let n = skip.min(chunk.len() as u64);
                let _ = chunk.split_to(n as usize);
                skip -= n;
            }
            while !chunk.is_empty() {
                let took = buf.extend(&chunk);
                let _ = chunk.split_to(took);
                if buf.remaining() == 0 {
                    let next_len = piece_size.min(end - *pos - buf.len() as u64) as usize;
                    let piece = std::mem::replace(&mut buf, crate::bufpool::Filling::new(next_len))
                        .freeze();
                    *pos += piece.len() as u64;
                    let more = sink(piece).await;
                    if !more || *pos >= end {
                        return Ok(Attempt::Done(()));
                    }
                }
            }
        }
        Ok(Attempt::Retry(format!(
            "response ended at byte {} of {end}",
            *pos + buf.len() as u64
        )))
    }
}

enum TlsFailure {
    Certificate(String),
    Refused(String),
}

/// The TLS failure behind `e`, if any: rustls's error, found in the chain of causes. An
/// `io::Error` hides the error it wraps from `source()` (and hyper wraps one `io::Error` in
/// another), so each is opened instead of asked for its source.
fn tls_failure(e: &(dyn std::error::Error + 'static)) -> Option<TlsFailure> {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cause {
        match c.downcast_ref::<rustls::Error>() {
            Some(
                t @ (rustls::Error::InvalidCertificate(_)
                | rustls::Error::NoCertificatesPresented
                | rustls::Error::UnsupportedNameType),
            ) => return Some(TlsFailure::Certificate(t.to_string())),
            Some(t @ rustls::Error::AlertReceived(_)) => {
                return Some(TlsFailure::Refused(t.to_string()));
            }
            _ => {}
        }
        cause = match c
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            Some(inner) => Some(inner as &(dyn std::error::Error + 'static)),
            None => c.source(),
        };
    }
    None
}

/// An error with its chain of causes (`pub(crate)` for the upload client) ("error sending request: connection refused").
pub(crate) fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

fn validator_of(h: &header::HeaderMap) -> Option<String> {
    let etag = h
        .get(header::ETAG)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.starts_with("W/"));
    etag.or_else(|| h.get(header::LAST_MODIFIED).and_then(|v| v.to_str().ok()))
        .map(str::to_owned)
}

/// `Content-Range: bytes START-END/TOTAL` → (START, TOTAL).
fn content_range(h: &header::HeaderMap) -> Option<(u64, u64)> {
    let v = h.get(header::CONTENT_RANGE)?.to_str().ok()?;
    let rest = v.strip_prefix("bytes ")?;
    let (span, total) = rest.split_once('/')?;
    let (start, _) = span.split_once('-')?;
    Some((start.trim().parse().ok()?, total.trim().parse().ok()?))
}

fn check_same(
    url: &Url,
    remote: &Remote,
    resp: &reqwest::Response,
    start: u64,
    end: u64,
) -> Result<(), OriginError> {
    let changed = |detail: String| OriginError::Changed {
        url: url.clone(),
        detail,
    };
    let validator = validator_of(resp.headers());
    if remote.validator.is_some() && validator.is_some() && validator != remote.validator {
        return Err(changed(format!(
            "validator {:?} became {:?}",
            remote.validator, validator
        )));
    }
    if remote.ranges {
        if resp.status() != StatusCode::PARTIAL_CONTENT {
            return Err(changed(format!(
                "asked for bytes {start}-{} and got HTTP {} (If-Range failed)",
                end - 1,
                resp.status().as_u16()
            )));
        }
        match content_range(resp.headers()) {
            Some((s, total)) if s == start && total == remote.length => {}
            Some((s, total)) => {
                return Err(changed(format!(
                    "Content-Range starts at {s} of {total}, expected {start} of {}",
                    remote.length
                )));
            }
            None => {
                return Err(OriginError::BadResponse {
                    url: url.clone(),
                    detail: "206 without Content-Range".into(),
                });
            }
        }
    } else if let Some(len) = resp.content_length()
        && len != remote.length
    {
        return Err(changed(format!(
            "length {len} bytes, was {} bytes",
            remote.length
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_logged_without_credentials_or_query_tokens() {
        let u: Url = "https://user:pw@mirror.example/pool/a.deb?X-Amz-Signature=abc#f"
            .parse()
            .unwrap();
        assert!(has_secrets(&u));
        assert_eq!(redact(&u), "https://mirror.example/pool/a.deb?…");
        let plain: Url = "https://mirror.example/pool/a.deb".parse().unwrap();
        assert!(!has_secrets(&plain));
        assert_eq!(redact(&plain), plain.as_str());
        let e = OriginError::NotFound {
            url: u,
            status: 404,
        };
        assert!(
            !e.to_string().contains("pw") && !e.to_string().contains("abc"),
            "{e}"
        );
    }
}
