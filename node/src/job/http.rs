//! A job's HTTP options: what its origin requests carry besides the URL.
//!
//! They follow BITS: custom headers (`IBackgroundCopyJobHttpOptions::SetCustomHeaders`),
//! credentials (`IBackgroundCopyJob2::SetCredentials` with `BG_AUTH_TARGET_SERVER`, the Basic
//! scheme, plus a Bearer token), a client certificate
//! (`IBackgroundCopyJobHttpOptions::SetClientCertificateByName`, here PEM files), extra trusted
//! CA certificates, and proxies (`IBackgroundCopyJob::SetProxySettings` with
//! `BG_JOB_PROXY_USAGE`). See `docs/jobs.md`, "HTTP options and proxies".
//!
//! Only the origin client sees them: peers and cache nodes are never told a job's headers or
//! credentials, and a job that has any never asks a cache node to fetch its URL.

use std::{fmt, path::PathBuf};

use url::Url;

use crate::Error;

/// A job's HTTP options (BITS `IBackgroundCopyJobHttpOptions`, `SetCredentials`,
/// `SetProxySettings`). The default is none of them, with the node's proxy setting.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HttpOptions {
    /// Request headers sent with every origin request of the job, in order, as
    /// `(name, value)` (BITS `SetCustomHeaders`). Names that the piece protocol sets itself
    /// (`Range`, `If-Range`, `Host`, `Content-Length`, `Transfer-Encoding`, `Connection`) are
    /// refused. The values are write-only: snapshots given to others show the names alone.
    pub headers: Vec<(String, String)>,
    /// Credentials for the origin (BITS `SetCredentials`, `BG_AUTH_TARGET_SERVER`). Sent only
    /// to the origin; dropped on a redirect to another host.
    pub credentials: Option<Credentials>,
    /// A client certificate for TLS client authentication, read as the job's owner.
    pub client_certificate: Option<ClientCertificate>,
    /// PEM files of CA certificates trusted besides the system's, read as the job's owner.
    pub ca_certificates: Vec<PathBuf>,
    /// Which proxy the job's requests go through.
    pub proxy: ProxyUsage,
}

impl HttpOptions {
    /// True when the job's requests carry something a bare URL does not (headers,
    /// credentials, a client certificate): a cache node could not fetch it from the URL alone,
    /// and is not asked to.
    #[must_use]
    pub fn is_private(&self) -> bool {
        !self.headers.is_empty() || self.credentials.is_some() || self.client_certificate.is_some()
    }

    /// Checks what can be checked without the file system: header names and values, the
    /// proxy URLs and bypass entries, the credentials' characters.
    ///
    /// # Errors
    /// [`Error::BadHttpOption`] naming the option and what was wrong with it.
    pub fn check(&self) -> Result<(), Error> {
        for (name, value) in &self.headers {
            check_header(name, value)?;
        }
        if let Some(c) = &self.credentials {
            c.check()?;
        }
        if let Some(c) = &self.client_certificate
            && (c.certificate.as_os_str().is_empty() || c.key.as_os_str().is_empty())
        {
            return Err(bad(
                "client certificate",
                "both the certificate and the key file are needed",
            ));
        }
        if self
            .ca_certificates
            .iter()
            .any(|p| p.as_os_str().is_empty())
        {
            return Err(bad("CA certificates", "an empty path"));
        }
        self.proxy.check()
    }

    /// The options as they may be shown to anybody who may see the job: header values,
    /// passwords, tokens and proxy credentials replaced by `…`.
    #[must_use]
    pub fn redacted(&self) -> Self {
        Self {
            headers: self
                .headers
                .iter()
                .map(|(n, _)| (n.clone(), "…".to_owned()))
                .collect(),
            credentials: self.credentials.as_ref().map(|c| match c {
                Credentials::Basic { user, .. } => Credentials::Basic {
                    user: user.clone(),
                    password: "…".to_owned(),
                },
                Credentials::Bearer { .. } => Credentials::Bearer {
                    token: "…".to_owned(),
                },
            }),
            client_certificate: self.client_certificate.clone(),
            ca_certificates: self.ca_certificates.clone(),
            proxy: match &self.proxy {
                ProxyUsage::Override { proxies, bypass } => ProxyUsage::Override {
                    proxies: proxies.iter().map(redact_proxy).collect(),
                    bypass: bypass.clone(),
                },
                other => other.clone(),
            },
        }
    }
}

/// A proxy URL without its user information.
fn redact_proxy(u: &Url) -> Url {
    let mut u = u.clone();
    if !u.username().is_empty() || u.password().is_some() {
        let _ = u.set_username("…");
        let _ = u.set_password(None);
    }
    u
}

fn bad(option: &str, reason: impl Into<String>) -> Error {
    Error::BadHttpOption {
        option: option.to_owned(),
        reason: reason.into(),
    }
}

/// Header names the origin client sets itself: a job may not set them.
const RESERVED_HEADERS: [&str; 6] = [
    "range",
    "if-range",
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
];

fn check_header(name: &str, value: &str) -> Result<(), Error> {
    let what = format!("header {name:?}");
    let parsed = reqwest::header::HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| bad(&what, "not a valid HTTP header name"))?;
    if RESERVED_HEADERS.contains(&parsed.as_str()) {
        return Err(bad(
            &what,
            "Shoal sets this header itself for piece requests",
        ));
    }
    reqwest::header::HeaderValue::from_str(value)
        .map_err(|_| bad(&what, "the value holds a line break or a control character"))?;
    Ok(())
}

/// Credentials for the origin (BITS `BG_AUTH_CREDENTIALS` with `BG_AUTH_TARGET_SERVER`).
/// `Debug` never shows the secret.
#[derive(Clone, PartialEq, Eq)]
pub enum Credentials {
    /// HTTP Basic (RFC 7617; BITS `BG_AUTH_SCHEME_BASIC`).
    Basic {
        /// The user name; may not contain `:`.
        user: String,
        /// The password.
        password: String,
    },
    /// A Bearer token (RFC 6750), sent as `Authorization: Bearer TOKEN`.
    Bearer {
        /// The token.
        token: String,
    },
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Basic { user, .. } => f
                .debug_struct("Basic")
                .field("user", user)
                .field("password", &"…")
                .finish(),
            Self::Bearer { .. } => f.debug_struct("Bearer").field("token", &"…").finish(),
        }
    }
}

impl Credentials {
    /// The scheme's name as `Authorization` spells it: `Basic` or `Bearer`.
    #[must_use]
    pub fn scheme(&self) -> &'static str {
        match self {
            Self::Basic { .. } => "Basic",
            Self::Bearer { .. } => "Bearer",
        }
    }

    fn check(&self) -> Result<(), Error> {
        let printable = |s: &str| !s.chars().any(char::is_control);
        match self {
            Self::Basic { user, password } => {
                if user.contains(':') {
                    return Err(bad("credentials", "a Basic user name may not contain ':'"));
                }
                if !printable(user) || !printable(password) {
                    return Err(bad("credentials", "a control character"));
                }
            }
            Self::Bearer { token } => {
                if token.is_empty() || !token.chars().all(|c| c.is_ascii_graphic()) {
                    return Err(bad(
                        "credentials",
                        "a Bearer token is one word of printable ASCII",
                    ));
                }
            }
        }
        Ok(())
    }
}

/// A TLS client certificate and its private key, PEM files read as the job's owner when a
/// transfer starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientCertificate {
    /// The certificate chain, PEM.
    pub certificate: PathBuf,
    /// The private key (PKCS#8, PKCS#1 or SEC1), PEM.
    pub key: PathBuf,
}

/// Which proxy a job's origin requests go through (BITS `BG_JOB_PROXY_USAGE`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum ProxyUsage {
    /// The node's setting (`BG_JOB_PROXY_USAGE_PRECONFIG`): `[origin] proxy` in its
    /// configuration, else the `http_proxy`, `https_proxy` and `no_proxy` environment
    /// variables of the node's process.
    #[default]
    Preconfig,
    /// Direct connections, whatever the node's setting (`BG_JOB_PROXY_USAGE_NO_PROXY`).
    NoProxy,
    /// These proxies (`BG_JOB_PROXY_USAGE_OVERRIDE`): the first is used, and the next one
    /// after a request through it failed at the network level; hosts in `bypass` are reached
    /// directly.
    Override {
        /// `http://HOST:PORT` or `https://HOST:PORT`, optionally with `USER:PASSWORD@` for
        /// the proxy's Basic authentication.
        proxies: Vec<Url>,
        /// Host names (`example.org` also matches its subdomains), IP addresses or CIDR
        /// ranges, and `*` for every host, as the `no_proxy` variable takes them.
        bypass: Vec<String>,
    },
}

impl ProxyUsage {
    fn check(&self) -> Result<(), Error> {
        if let Self::Override { proxies, bypass } = self {
            if proxies.is_empty() {
                return Err(bad("proxy", "override needs at least one proxy"));
            }
            for p in proxies {
                if !matches!(p.scheme(), "http" | "https") || p.host_str().is_none() {
                    return Err(bad(
                        "proxy",
                        format!(
                            "{} is not an http:// or https:// proxy URL",
                            redact_proxy(p)
                        ),
                    ));
                }
            }
            for b in bypass {
                if b.is_empty() || b.contains([',', ' ']) {
                    return Err(bad(
                        "proxy bypass",
                        format!("{b:?} is not one host name, address or range"),
                    ));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_never_show_in_debug_or_redacted_snapshots() {
        let o = HttpOptions {
            headers: vec![("X-Api-Key".into(), "k3y".into())],
            credentials: Some(Credentials::Basic {
                user: "ann".into(),
                password: "s3cret".into(),
            }),
            proxy: ProxyUsage::Override {
                proxies: vec!["http://pu:pp@proxy.lan:3128".parse().unwrap()],
                bypass: vec![],
            },
            ..HttpOptions::default()
        };
        let debug = format!("{:?}", o.redacted());
        for secret in ["k3y", "s3cret", "pp", "pu"] {
            assert!(!debug.contains(secret), "{secret} in {debug}");
        }
        assert!(!format!("{o:?}").contains("s3cret"));
        assert!(debug.contains("X-Api-Key") && debug.contains("ann"));
        assert!(o.is_private());
        assert!(!HttpOptions::default().is_private());
    }

    #[test]
    fn bad_options_are_named() {
        let header = |n: &str, v: &str| HttpOptions {
            headers: vec![(n.into(), v.into())],
            ..HttpOptions::default()
        };
        assert!(header("X-Ok", "fine").check().is_ok());
        let e = header("Range", "bytes=0-").check().unwrap_err().to_string();
        assert!(e.contains("Range") && e.contains("itself"), "{e}");
        assert!(header("X-Bad", "a\r\nInjected: 1").check().is_err());
        assert!(header("bad name", "v").check().is_err());
        let basic = HttpOptions {
            credentials: Some(Credentials::Basic {
                user: "a:b".into(),
                password: String::new(),
            }),
            ..HttpOptions::default()
        };
        assert!(basic.check().is_err());
        let proxy = |p: &str| HttpOptions {
            proxy: ProxyUsage::Override {
                proxies: vec![p.parse().unwrap()],
                bypass: vec!["localhost".into()],
            },
            ..HttpOptions::default()
        };
        assert!(proxy("http://127.0.0.1:8888").check().is_ok());
        let e = proxy("ftp://u:p@x/").check().unwrap_err().to_string();
        assert!(e.contains("ftp://") && !e.contains("u:p"), "{e}");
    }
}
