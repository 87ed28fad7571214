//! A real HTTP proxy for tests: Debian's tinyproxy, run in the foreground on 127.0.0.1 with
//! its own configuration, and stopped by its pid when dropped.

use std::{path::PathBuf, process::Child, time::Duration};

/// A tinyproxy process listening on 127.0.0.1. The requests it relays carry its `Via` header
/// (`1.1 tinyproxy (tinyproxy/VERSION)`), which [`crate::TestOrigin`] records.
pub struct TinyProxy {
    /// `http://127.0.0.1:PORT`.
    pub url: url::Url,
    child: Child,
    _dir: tempfile::TempDir,
}

impl TinyProxy {
    /// Starts tinyproxy on a free loopback port and waits until it accepts connections.
    ///
    /// # Panics
    /// When tinyproxy is not installed (`apt-get install tinyproxy`; `.ci/run` installs it)
    /// or does not listen within 10 s.
    pub async fn start() -> Self {
        let dir = tempfile::tempdir().expect("proxy dir");
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("free port");
            l.local_addr().expect("local addr").port()
        };
        let log: PathBuf = dir.path().join("tinyproxy.log");
        let conf = dir.path().join("tinyproxy.conf");
        std::fs::write(
            &conf,
            format!(
                "Port {port}\nListen 127.0.0.1\nTimeout 30\nMaxClients 32\nLogLevel Info\n\
                 LogFile \"{}\"\nAllow 127.0.0.1\n",
                log.display()
            ),
        )
        .expect("write tinyproxy.conf");
        let child = std::process::Command::new("tinyproxy")
            .arg("-d")
            .arg("-c")
            .arg(&conf)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("tinyproxy runs (apt-get install tinyproxy)");
        let proxy = Self {
            url: format!("http://127.0.0.1:{port}")
                .parse()
                .expect("proxy URL"),
            child,
            _dir: dir,
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "tinyproxy did not listen on 127.0.0.1:{port}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        proxy
    }
}

impl Drop for TinyProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether a request's headers say tinyproxy relayed it.
pub fn relayed(headers: &axum::http::HeaderMap) -> bool {
    headers
        .get_all(axum::http::header::VIA)
        .iter()
        .any(|v| v.to_str().is_ok_and(|v| v.contains("tinyproxy")))
}
