//! The cache node role (Delivery Optimization's Connected Cache, Dragonfly's seed peer, without
//! a cloud): a node that, asked by a peer for content it lacks (a have request carrying the
//! origin URL), fetches the content itself and serves it.
//!
//! A fill is a download of the node's own, not a job: no caller, no Complete. It runs like any
//! download (peers first, the origin as needed, every piece verified), in the cache's `fills`
//! directory, with the asker's key as its only expected digest; while it runs, peers see the
//! pieces it fetches and claims, and once the piece layer verifies they fetch its verified
//! pieces. When the file verified it enters the cache (whatever its size) and is served from
//! there; the fill's own file is deleted.
//!
//! Only URLs under the configured origin prefixes are fetched, and redirects are followed only
//! to URLs under them too: with none configured the node fetches nothing for peers (it is not
//! an open proxy). At most [`CacheNodeRole::max_fills`] run at once, at most
//! [`FILLS_PER_PEER`] for one asking peer; a key whose fill failed is not fetched again for
//! [`FAILED_BACKOFF`]. URLs with user information or a query string are never fetched for
//! peers, and URLs are logged without them.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
    time::Duration,
};

use shoal_protocol::HaveKey;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::{
    Expected, Node,
    download::{self, FileTask, Update},
    job::Priority,
    swarm::FillRequest,
};

/// How long a key whose fill failed is not fetched again.
pub(crate) const FAILED_BACKOFF: Duration = Duration::from_secs(30);
/// Fills one asking peer may have running at once.
pub(crate) const FILLS_PER_PEER: usize = 2;

/// Settings of the cache node role.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CacheNodeRole {
    /// URL prefixes the node fetches from on a peer's behalf, like `https://deb.example.org/`;
    /// empty: none (the node fetches nothing for peers).
    pub origins: Vec<String>,
    /// Fills running at once; further requests wait for the asker's next have round.
    /// Default 8.
    pub max_fills: usize,
}

impl Default for CacheNodeRole {
    fn default() -> Self {
        Self {
            origins: Vec::new(),
            max_fills: 8,
        }
    }
}

impl CacheNodeRole {
    /// Whether the node may fetch `url` for a peer (or follow a redirect to it): an
    /// `http`/`https` URL without user information or query whose scheme, host and port equal
    /// a configured origin's, and whose path starts with the origin's path at a `/` boundary
    /// (so `https://a.example` allows neither `https://a.example.evil.net/` nor
    /// `https://a.example@evil.net/`). With no origin configured, nothing.
    pub(crate) fn allows(&self, url: &url::Url) -> bool {
        if !matches!(url.scheme(), "http" | "https")
            || crate::source::origin::has_secrets(url)
            || url.host_str().is_none()
        {
            return false;
        }
        self.origins.iter().any(|o| {
            url::Url::parse(o).is_ok_and(|o| {
                let base = o.path().trim_end_matches('/');
                o.scheme() == url.scheme()
                    && o.host_str() == url.host_str()
                    && o.port_or_known_default() == url.port_or_known_default()
                    && (url.path() == base || url.path().starts_with(&format!("{base}/")))
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_match_scheme_host_port_and_whole_path_segments() {
        let role = CacheNodeRole {
            origins: vec![
                "https://deb.example.org".into(),
                "http://10.0.0.5:8080/pool/".into(),
            ],
            ..CacheNodeRole::default()
        };
        let ok = |u: &str| role.allows(&url::Url::parse(u).unwrap());
        assert!(ok("https://deb.example.org/a.deb"));
        assert!(ok("https://DEB.example.org:443/a.deb"));
        assert!(ok("http://10.0.0.5:8080/pool/x/y.deb"));
        assert!(!ok("https://deb.example.org.evil.net/a.deb"));
        assert!(!ok("https://deb.example.org@evil.net/a.deb"));
        assert!(!ok("http://deb.example.org/a.deb"));
        assert!(!ok("http://10.0.0.5:8081/pool/x.deb"));
        assert!(!ok("http://10.0.0.5:8080/poolside/x.deb"));
        assert!(!ok("ftp://deb.example.org/a.deb"));
        assert!(!ok("https://deb.example.org/a.deb?X-Amz-Signature=1"));
        // No origin configured: nothing is fetched for peers.
        let none = CacheNodeRole::default();
        assert!(!none.allows(&url::Url::parse("http://x.example/f").unwrap()));
        assert!(!none.allows(&url::Url::parse("file:///etc/passwd").unwrap()));
    }
}

/// The fills running and failed lately, by key.
#[derive(Default)]
struct Fills {
    running: HashSet<HaveKey>,
    /// Fills running per asking peer.
    per_peer: HashMap<libp2p::PeerId, usize>,
    failed: HashMap<HaveKey, tokio::time::Instant>,
}

/// Runs the cache node role: takes fill requests from the swarm until `shutdown`.
pub(crate) async fn run(
    node: Node,
    role: CacheNodeRole,
    mut requests: mpsc::Receiver<FillRequest>,
    shutdown: CancellationToken,
) {
    let fills = Arc::new(Mutex::new(Fills::default()));
    if role.origins.is_empty() {
        info!("cache node role: no origins configured, so nothing is fetched for peers");
    }
    // Fills follow redirects only within the configured origins.
    let origin = {
        let role = role.clone();
        match crate::source::origin::Client::with_redirect_filter(
            node.env().origin.config().clone(),
            move |u| role.allows(u),
        ) {
            Ok(c) => c,
            Err(e) => {
                warn!("cache node role off: cannot build its HTTP client: {e}");
                return;
            }
        }
    };
    loop {
        let req = tokio::select! {
            () = shutdown.cancelled() => return,
            r = requests.recv() => match r {
                Some(r) => r,
                None => return,
            },
        };
        let url = match url::Url::parse(&req.origin_url) {
            Ok(u) if role.allows(&u) => u,
            Ok(u) => {
                debug!(peer = %req.peer, url = %crate::source::origin::redact(&u), "not fetching for a peer: the URL is not under a configured origin");
                continue;
            }
            Err(e) => {
                debug!(peer = %req.peer, "not fetching for a peer: bad URL {:?}: {e}", req.origin_url);
                continue;
            }
        };
        if node.env().store.have(&req.key).is_some() {
            continue;
        }
        {
            let mut f = fills.lock().unwrap_or_else(|e| e.into_inner());
            let now = tokio::time::Instant::now();
            f.failed
                .retain(|_, at| now.duration_since(*at) < FAILED_BACKOFF);
            if f.running.contains(&req.key)
                || f.failed.contains_key(&req.key)
                || f.running.len() >= role.max_fills
                || f.per_peer.get(&req.peer).copied().unwrap_or(0) >= FILLS_PER_PEER
            {
                continue;
            }
            f.running.insert(req.key);
            *f.per_peer.entry(req.peer).or_default() += 1;
        }
        info!(peer = %req.peer, key = %req.key, url = %crate::source::origin::redact(&url), "fetching for a peer (cache node)");
        let (node, fills, token) = (node.clone(), fills.clone(), shutdown.child_token());
        let origin = origin.clone();
        tokio::spawn(async move {
            let ok = fill(&node, &origin, req.key, url, &token).await;
            let mut f = fills.lock().unwrap_or_else(|e| e.into_inner());
            f.running.remove(&req.key);
            if let Some(n) = f.per_peer.get_mut(&req.peer) {
                *n -= 1;
                if *n == 0 {
                    f.per_peer.remove(&req.peer);
                }
            }
            if !ok {
                f.failed.insert(req.key, tokio::time::Instant::now());
            }
        });
    }
}

/// Fetches `key` from `url` (and peers) into the cache; true when it is cached.
async fn fill(
    node: &Node,
    origin: &crate::source::origin::Client,
    key: HaveKey,
    url: url::Url,
    cancel: &CancellationToken,
) -> bool {
    let mut env = node.env().clone();
    env.origin = origin.clone();
    let Some(cache) = env.cache.clone() else {
        return false;
    };
    // Refuse what cannot be kept before fetching it: the origin's length against the room
    // the cache has beside its pinned files.
    match env.origin.probe(&url).await {
        Ok(r) => {
            let usage = cache.usage();
            if r.length > usage.limit.saturating_sub(usage.pinned_bytes) {
                info!(url = %crate::source::origin::redact(&url), length = r.length, "not fetching for a peer: the file does not fit the cache");
                return false;
            }
        }
        Err(e) => {
            warn!(url = %crate::source::origin::redact(&url), "not fetching for a peer: {e}");
            return false;
        }
    }
    let dir = cache.fills_dir();
    if let Err(e) = tokio::fs::create_dir_all(&dir).await {
        warn!(dir = %dir.display(), "cannot make the fills directory: {e}");
        return false;
    }
    let (expected, name) = match key {
        HaveKey::Blake3(h) => (
            Expected {
                blake3: Some(h),
                sha256: None,
            },
            format!("blake3-{}", hex::encode(h)),
        ),
        HaveKey::Sha256(d) => (
            Expected {
                blake3: None,
                sha256: Some(d),
            },
            format!("sha256-{d}"),
        ),
    };
    let task = FileTask {
        index: 0,
        priority: Priority::High,
        url: url.clone(),
        expected,
        ranges: Vec::new(),
        temp: dir.join(name),
        origin_only: false,
        resume: None,
        durable: None,
        owner: None,
        left: Mutex::new(None),
        cache_any_size: true,
        private_url: false,
    };
    let progress = |u: Update| {
        if let Update::Piece { bytes, source } = u {
            node.count_bytes(source, bytes);
        }
    };
    let result = download::download_file(&env, &task, cancel, &progress).await;
    let cached = match &result {
        Ok(d) => {
            let at_cache = cache.path_of(&d.content_id);
            // Served from the cache's copy now, if it was admitted; else from nowhere.
            let admitted = cache.items().iter().any(|i| i.path == at_cache);
            if !admitted {
                warn!(url = %crate::source::origin::redact(&url), "the fetched file does not fit the cache; it is not kept");
            } else {
                info!(url = %crate::source::origin::redact(&url), id = %d.content_id, "fetched for peers and cached");
            }
            admitted
        }
        Err(e) => {
            warn!(url = %crate::source::origin::redact(&url), key = %key, "fetching for a peer failed: {e:?}");
            false
        }
    };
    env.store.remove_path(&task.temp);
    let _ = tokio::fs::remove_file(&task.temp).await;
    cached
}
