//! apt's acquire-method protocol, as the `shoal-apt` method speaks it.
//!
//! apt runs a transport method as a child process and talks to it over its stdin and stdout
//! in messages (apt-pkg/acquire-method.cc, apt-pkg/acquire-worker.cc; summarized in the
//! project's `shared/APT-METHOD.md`): a status line `NNN Text`, then RFC 822 `Field: value`
//! lines, then a blank line. apt sends `600 URI Acquire` (a file to fetch) and `601
//! Configuration`; the method answers with `100 Capabilities` first, then `200 URI Start`,
//! `102 Status`, `201 URI Done`, `400 URI Failure`, `104 Warning` and, when it cannot go on,
//! `401 General Failure`.
//!
//! This module parses and writes messages and reads a `600` into an [`Acquire`]; it does no
//! I/O of its own. A line that continues a field (it starts with a space or a tab, RFC 822
//! folding) adds a line to that field's value; a field apt sends that this module does not
//! know is kept and ignored.

pub mod method;

use std::path::PathBuf;

use shoal_validator::Sha256Digest;
use thiserror::Error;
use url::Url;

/// The longest message [`MessageReader`] accepts, in bytes: a `601 Configuration` carries one
/// line per apt configuration entry (tens of KiB on a usual system).
pub const MAX_MESSAGE_BYTES: usize = 4 << 20;

/// What was wrong with a message from apt, or with a field of it.
#[derive(Debug, Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum AptError {
    /// The first line of a message is not `NNN Text` with a three-digit code.
    #[error("not an apt method message: {line:?} (a message starts with a three-digit code)")]
    BadStatusLine {
        /// The line, cut to 200 characters.
        line: String,
    },
    /// A line inside a message is neither `Field: value` nor the continuation of one.
    #[error("not a `Field: value` line in a message from apt: {line:?}")]
    BadFieldLine {
        /// The line, cut to 200 characters.
        line: String,
    },
    /// A message grew past [`MAX_MESSAGE_BYTES`].
    #[error("a message from apt is longer than {MAX_MESSAGE_BYTES} bytes")]
    TooLong,
    /// A `600 URI Acquire` lacks a field the method needs.
    #[error("600 URI Acquire without a {0} field")]
    MissingField(&'static str),
    /// A field's value is malformed.
    #[error("600 URI Acquire: bad {field} {value:?}: {why}")]
    BadField {
        /// The field's name.
        field: &'static str,
        /// Its value, cut to 200 characters.
        value: String,
        /// What is wrong with it.
        why: String,
    },
}

/// Cuts `s` to at most 200 characters, for error messages.
fn cut(s: &str) -> String {
    s.chars().take(200).collect()
}

/// One message: a status code and text, and its fields in the order they came.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// The three-digit status code (`600` for URI Acquire).
    pub code: u16,
    /// The text after the code (`URI Acquire`).
    pub text: String,
    /// The fields, names as sent; a folded value has its lines joined by `\n`.
    pub fields: Vec<(String, String)>,
}

impl Message {
    /// A message with no fields.
    #[must_use]
    pub fn new(code: u16, text: &str) -> Self {
        Self {
            code,
            text: text.to_owned(),
            fields: Vec::new(),
        }
    }

    /// The message with one more field.
    #[must_use]
    pub fn with(mut self, name: &str, value: impl std::fmt::Display) -> Self {
        self.fields.push((name.to_owned(), value.to_string()));
        self
    }

    /// The value of the first field named `name` (field names compare without regard to case,
    /// as in RFC 822).
    #[must_use]
    pub fn get(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Every value of the fields named `name`, in order (`601` repeats `Config-Item`).
    pub fn all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.fields
            .iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The message as apt reads it: the status line, one line per field (a value with line
    /// breaks folded onto continuation lines that start with a space; a line break inside a
    /// name or the text becomes a space), and the blank line that ends it.
    #[must_use]
    pub fn encode(&self) -> String {
        let flat = |s: &str| s.replace(['\r', '\n'], " ");
        let mut out = format!("{} {}\n", self.code, flat(&self.text));
        for (name, value) in &self.fields {
            let value = value.replace('\r', "");
            let mut lines = value.split('\n');
            out.push_str(&flat(name));
            out.push_str(": ");
            out.push_str(lines.next().unwrap_or(""));
            out.push('\n');
            for l in lines {
                out.push(' ');
                out.push_str(l);
                out.push('\n');
            }
        }
        out.push('\n');
        out
    }
}

/// Builds messages from lines as they are read (from apt's pipe to the method's stdin).
#[derive(Debug, Default)]
pub struct MessageReader {
    current: Option<Message>,
    bytes: usize,
}

impl MessageReader {
    /// An empty reader.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes one line (with or without its `\n` or `\r\n`). Returns the message the line ended
    /// (a blank line ends a message; blank lines between messages are skipped).
    ///
    /// # Errors
    /// [`AptError::BadStatusLine`], [`AptError::BadFieldLine`] or [`AptError::TooLong`]; the
    /// reader is then empty again.
    pub fn push_line(&mut self, line: &str) -> Result<Option<Message>, AptError> {
        let line = line.strip_suffix('\n').unwrap_or(line);
        let line = line.strip_suffix('\r').unwrap_or(line);
        let r = self.take(line);
        if r.is_err() {
            *self = Self::default();
        }
        r
    }

    fn take(&mut self, line: &str) -> Result<Option<Message>, AptError> {
        if line.trim().is_empty() {
            self.bytes = 0;
            return Ok(self.current.take());
        }
        self.bytes += line.len() + 1;
        if self.bytes > MAX_MESSAGE_BYTES {
            return Err(AptError::TooLong);
        }
        let Some(msg) = &mut self.current else {
            self.current = Some(status_line(line)?);
            return Ok(None);
        };
        if line.starts_with([' ', '\t']) {
            let Some((_, value)) = msg.fields.last_mut() else {
                return Err(AptError::BadFieldLine { line: cut(line) });
            };
            value.push('\n');
            value.push_str(line.trim());
            return Ok(None);
        }
        match line.split_once(':') {
            Some((name, value))
                if !name.is_empty() && !name.contains(|c: char| c.is_whitespace()) =>
            {
                msg.fields.push((name.to_owned(), value.trim().to_owned()));
                Ok(None)
            }
            _ => Err(AptError::BadFieldLine { line: cut(line) }),
        }
    }
}

/// `NNN Text`: a three-digit code, a space and any text.
fn status_line(line: &str) -> Result<Message, AptError> {
    let bad = || AptError::BadStatusLine { line: cut(line) };
    let (code, text) = line.split_once(' ').unwrap_or((line, ""));
    if code.len() != 3 || !code.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    Ok(Message::new(code.parse().map_err(|_| bad())?, text.trim()))
}

/// The `100 Capabilities` the method sends first: apt may send any number of `600`s at once
/// (`Pipeline`), sends its configuration (`Send-Config`), and URI-encodes the URIs
/// (`Send-URI-Encoded`, so that a `.deb` name with `+` or `~` comes through intact).
#[must_use]
pub fn capabilities(version: &str) -> Message {
    Message::new(100, "Capabilities")
        .with("Version", version)
        .with("Pipeline", "true")
        .with("Send-Config", "true")
        .with("Send-URI-Encoded", "true")
}

/// A `600 URI Acquire`: one file apt wants, with what the signed index says of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acquire {
    /// The URI exactly as apt sent it: every answer about this file carries it back.
    pub uri: String,
    /// Where apt wants the file (`Filename`): `…/partial/NAME` under `Dir::Cache` or
    /// `Dir::State`.
    pub filename: PathBuf,
    /// `Expected-SHA256`: the SHA-256 the signed index lists (every `.deb`, by-hash indexes).
    pub sha256: Option<Sha256Digest>,
    /// `Expected-SHA512`, lower-case hex (answered with `SHA512-Hash` over the same bytes).
    pub sha512: Option<String>,
    /// `Expected-Checksum-FileSize`, in bytes.
    pub size: Option<u64>,
    /// `Maximum-Size`, in bytes: apt's bound for files whose size it does not know
    /// (`InRelease`: `Acquire::MaxReleaseFileSize`).
    pub maximum_size: Option<u64>,
    /// `Last-Modified` of the copy apt has, for `If-Modified-Since` (an HTTP date).
    pub last_modified: Option<String>,
    /// `Proxy`: the per-host proxy apt chose (`Acquire::http::Proxy::HOST`), or `DIRECT`.
    pub proxy: Option<String>,
}

impl Acquire {
    /// Reads a `600 URI Acquire`.
    ///
    /// # Errors
    /// [`AptError::MissingField`] without `URI` or `Filename`; [`AptError::BadField`] for a
    /// digest that is not 64 (SHA-256) or 128 (SHA-512) hex digits, or a size that is not a
    /// number of bytes.
    pub fn from_message(m: &Message) -> Result<Self, AptError> {
        let uri = m.get("URI").ok_or(AptError::MissingField("URI"))?;
        let filename = m
            .get("Filename")
            .filter(|f| !f.is_empty())
            .ok_or(AptError::MissingField("Filename"))?;
        let bad = |field: &'static str, value: &str, why: String| AptError::BadField {
            field,
            value: cut(value),
            why,
        };
        let sha256 = m
            .get("Expected-SHA256")
            .map(|v| {
                v.parse::<Sha256Digest>()
                    .map_err(|e| bad("Expected-SHA256", v, e.to_string()))
            })
            .transpose()?;
        let sha512 = m
            .get("Expected-SHA512")
            .map(|v| {
                if v.len() == 128 && v.bytes().all(|b| b.is_ascii_hexdigit()) {
                    Ok(v.to_ascii_lowercase())
                } else {
                    Err(bad(
                        "Expected-SHA512",
                        v,
                        "not 128 hexadecimal digits".into(),
                    ))
                }
            })
            .transpose()?;
        let bytes = |field: &'static str| {
            m.get(field)
                .map(|v| v.parse::<u64>().map_err(|e| bad(field, v, e.to_string())))
                .transpose()
        };
        Ok(Self {
            uri: uri.to_owned(),
            filename: PathBuf::from(filename),
            sha256,
            sha512,
            size: bytes("Expected-Checksum-FileSize")?,
            maximum_size: bytes("Maximum-Size")?,
            last_modified: m.get("Last-Modified").map(str::to_owned),
            proxy: m.get("Proxy").map(str::to_owned),
        })
    }

    /// The origin URL: the URI without the `shoal+` of its scheme (`shoal+https://host/path`
    /// is fetched as `https://host/path`). Percent-encoding is kept as sent.
    ///
    /// # Errors
    /// [`AptError::BadField`] when the URI does not parse, or its scheme is not `shoal+http`
    /// or `shoal+https` (or plain `http`, `https`: apt sends those when a method is run under
    /// another name).
    pub fn origin_url(&self) -> Result<Url, AptError> {
        let bad = |why: &str| AptError::BadField {
            field: "URI",
            value: cut(&self.uri),
            why: why.to_owned(),
        };
        let plain = self.uri.strip_prefix("shoal+").unwrap_or(&self.uri);
        let url = Url::parse(plain).map_err(|e| bad(&e.to_string()))?;
        match url.scheme() {
            "http" | "https" if url.host().is_some() => Ok(url),
            "http" | "https" => Err(bad("no host")),
            _ => Err(bad("only shoal+http and shoal+https URIs are served")),
        }
    }
}

/// `201 URI Done` for `uri`, fetched into `filename`: its size in bytes, `Last-Modified`
/// when the origin sent one, and the hashes computed over the very bytes at `filename` (apt
/// trusts the hashes a method reports, so only computed ones are given).
#[must_use]
pub fn done(
    uri: &str,
    filename: &std::path::Path,
    size: u64,
    last_modified: Option<&str>,
    sha256: &Sha256Digest,
    sha512: Option<&str>,
) -> Message {
    let mut m = Message::new(201, "URI Done")
        .with("URI", uri)
        .with("Filename", filename.display())
        .with("Size", size);
    if let Some(lm) = last_modified {
        m = m.with("Last-Modified", lm);
    }
    m = m.with("SHA256-Hash", sha256);
    if let Some(h) = sha512 {
        m = m.with("SHA512-Hash", h);
    }
    m
}

/// `400 URI Failure` for `uri`: `message` for the user, apt's `FailReason` (`HashSumMismatch`,
/// `MaximumSizeExceeded`, `HttpError404`, `Timeout`, ...), and whether a retry may help
/// (`Transient-Failure`, which apt retries `Acquire::Retries` times).
#[must_use]
pub fn failure(uri: &str, message: &str, reason: &str, transient: bool) -> Message {
    let mut m = Message::new(400, "URI Failure")
        .with("URI", uri)
        .with("Message", message)
        .with("FailReason", reason);
    if transient {
        m = m.with("Transient-Failure", "true");
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_all(text: &str) -> Vec<Result<Message, AptError>> {
        let mut r = MessageReader::new();
        text.split_inclusive('\n')
            .filter_map(|l| r.push_line(l).transpose())
            .collect()
    }

    const SHA: &str = "b4480d64c4e339bddb1be7d3a69385f4c7057b1ea6d5816e0f3e9bb1277026b4";

    #[test]
    fn a_600_with_its_hashes_folded_lines_and_unknown_fields_reads_as_apt_meant_it() {
        let text = format!(
            "\n600 URI Acquire\r\n\
             URI: shoal+http://deb.example/debian/pool/main/h/hello/hello_2.12-1%2bb1_amd64.deb\n\
             Filename: /var/cache/apt/archives/partial/hello_2.12-1+b1_amd64.deb\n\
             Expected-SHA256: {SHA}\n\
             expected-checksum-filesize: 53184\n\
             Target-Type: deb\n\
             Alternate-URIs: http://a.example/x\n \thttp://b.example/x\n\
             X-Something-New: kept\n\
             \n\
             601 Configuration\n\
             Config-Item: Acquire::shoal::Socket=/run/shoal/shoal.sock\n\
             Config-Item: APT::Sandbox::User=_apt\n\n"
        );
        let msgs: Vec<Message> = read_all(&text).into_iter().map(Result::unwrap).collect();
        assert_eq!(msgs.len(), 2);
        let m = &msgs[0];
        assert_eq!((m.code, m.text.as_str()), (600, "URI Acquire"));
        assert_eq!(
            m.get("alternate-uris"),
            Some("http://a.example/x\nhttp://b.example/x")
        );
        assert_eq!(m.get("X-Something-New"), Some("kept"));
        let a = Acquire::from_message(m).unwrap();
        assert_eq!(a.sha256, Some(SHA.parse().unwrap()));
        assert_eq!(a.size, Some(53184));
        assert_eq!(a.sha512, None);
        assert_eq!(
            a.filename,
            PathBuf::from("/var/cache/apt/archives/partial/hello_2.12-1+b1_amd64.deb")
        );
        // The URI is answered as sent; the origin URL keeps its percent-encoding.
        assert!(a.uri.starts_with("shoal+http://"));
        assert_eq!(
            a.origin_url().unwrap().as_str(),
            "http://deb.example/debian/pool/main/h/hello/hello_2.12-1%2bb1_amd64.deb"
        );
        let items: Vec<&str> = msgs[1].all("Config-Item").collect();
        assert_eq!(
            items,
            [
                "Acquire::shoal::Socket=/run/shoal/shoal.sock",
                "APT::Sandbox::User=_apt"
            ]
        );
    }

    #[test]
    fn a_600_without_filename_or_with_bad_values_is_refused_with_the_field_named() {
        let m = |fields: &[(&str, &str)]| {
            let mut m = Message::new(600, "URI Acquire");
            for (n, v) in fields {
                m = m.with(n, v);
            }
            Acquire::from_message(&m)
        };
        assert_eq!(
            m(&[("URI", "shoal+http://h/x")]),
            Err(AptError::MissingField("Filename"))
        );
        assert_eq!(
            m(&[("Filename", "/tmp/x")]),
            Err(AptError::MissingField("URI"))
        );
        let e = m(&[
            ("URI", "shoal+http://h/x"),
            ("Filename", "/tmp/x"),
            ("Expected-SHA256", "abc"),
        ])
        .unwrap_err();
        assert!(
            matches!(
                e,
                AptError::BadField {
                    field: "Expected-SHA256",
                    ..
                }
            ),
            "{e}"
        );
        let e = m(&[
            ("URI", "shoal+http://h/x"),
            ("Filename", "/tmp/x"),
            ("Maximum-Size", "-1"),
        ])
        .unwrap_err();
        assert!(
            matches!(
                e,
                AptError::BadField {
                    field: "Maximum-Size",
                    ..
                }
            ),
            "{e}"
        );
        let other = m(&[("URI", "ftp://h/x"), ("Filename", "/tmp/x")]).unwrap();
        assert!(matches!(
            other.origin_url(),
            Err(AptError::BadField { field: "URI", .. })
        ));
        let https = m(&[("URI", "shoal+https://h/a%20b"), ("Filename", "/tmp/x")]).unwrap();
        assert_eq!(https.origin_url().unwrap().as_str(), "https://h/a%20b");
    }

    #[test]
    fn garbage_is_an_error_never_a_panic_and_the_reader_goes_on_after_it() {
        for junk in [
            "hello\n\n",
            "60 URI Acquire\n\n",
            "6000 x\n\n",
            "600 URI Acquire\nno colon here\n\n",
            "600 URI Acquire\n: empty name\n\n",
            "\u{0}\u{1}\u{2}\n\n",
            "600 URI Acquire\nURI: x\nbad field name: y\n\n",
        ] {
            let r = read_all(junk);
            assert!(r.iter().any(Result::is_err), "{junk:?} was accepted: {r:?}");
        }
        // A continuation line before any field is refused.
        assert!(read_all("600 URI Acquire\n folded\n\n")[0].is_err());
        // After an error the next message reads.
        let mut r = MessageReader::new();
        assert!(r.push_line("garbage").is_err());
        assert_eq!(r.push_line("601 Configuration").unwrap(), None);
        assert_eq!(r.push_line("").unwrap().map(|m| m.code), Some(601));
        // Endless lines without a blank one end in TooLong, not in unbounded memory.
        let mut r = MessageReader::new();
        r.push_line("600 URI Acquire").unwrap();
        let line = format!("X: {}", "a".repeat(1 << 16));
        let e = (0..100).find_map(|_| r.push_line(&line).err());
        assert_eq!(e, Some(AptError::TooLong));
    }

    #[test]
    fn messages_encode_as_apt_reads_them_and_read_back_the_same() {
        let caps = capabilities("1.0");
        assert_eq!(
            caps.encode(),
            "100 Capabilities\nVersion: 1.0\nPipeline: true\nSend-Config: true\nSend-URI-Encoded: true\n\n"
        );
        let f = failure("shoal+http://h/x", "two\nlines", "HashSumMismatch", false);
        assert_eq!(
            f.encode(),
            "400 URI Failure\nURI: shoal+http://h/x\nMessage: two\n lines\nFailReason: HashSumMismatch\n\n"
        );
        let d = done(
            "shoal+http://h/x",
            std::path::Path::new("/var/cache/apt/archives/partial/x.deb"),
            5,
            Some("Tue, 01 Dec 2026 10:00:00 GMT"),
            &SHA.parse().unwrap(),
            None,
        );
        let back: Vec<Message> = read_all(&d.encode())
            .into_iter()
            .map(Result::unwrap)
            .collect();
        assert_eq!(back, std::slice::from_ref(&d));
        assert_eq!(d.get("SHA256-Hash"), Some(SHA));
        assert_eq!(d.get("Size"), Some("5"));
    }
}
