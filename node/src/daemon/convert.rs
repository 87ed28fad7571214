//! Conversions between the control API's messages (`control.proto`) and the node's own types,
//! shared by the service and the watch hub.

use shoal_validator::ValidationState;
use tonic::Status;

use crate::timestamp::to_ms;
use crate::{
    Node,
    daemon::control as pb,
    job::{ErrorContext, FileInfo, JobError, JobId, JobInfo, Priority, State},
};

pub(super) fn parse_job(text: &str) -> Result<JobId, Status> {
    text.parse()
        .map_err(|_| Status::invalid_argument(format!("{text:?} is not a job id (a UUID)")))
}

pub(super) fn priority_of(p: i32) -> Result<Priority, Status> {
    match pb::Priority::try_from(p) {
        Ok(pb::Priority::Foreground) => Ok(Priority::Foreground),
        Ok(pb::Priority::High) => Ok(Priority::High),
        Ok(pb::Priority::Normal | pb::Priority::Unspecified) => Ok(Priority::Normal),
        Ok(pb::Priority::Low) => Ok(Priority::Low),
        Err(_) => Err(Status::invalid_argument(format!("unknown priority {p}"))),
    }
}

pub(super) fn priority_to_pb(p: Priority) -> pb::Priority {
    match p {
        Priority::Foreground => pb::Priority::Foreground,
        Priority::High => pb::Priority::High,
        Priority::Normal => pb::Priority::Normal,
        Priority::Low => pb::Priority::Low,
    }
}

pub(super) fn state_to_pb(s: State) -> pb::JobState {
    match s {
        State::Queued => pb::JobState::Queued,
        State::Connecting => pb::JobState::Connecting,
        State::Transferring => pb::JobState::Transferring,
        State::Suspended => pb::JobState::Suspended,
        State::Error => pb::JobState::Error,
        State::TransientError => pb::JobState::TransientError,
        State::Transferred => pb::JobState::Transferred,
        State::Acknowledged => pb::JobState::Acknowledged,
        State::Cancelled => pb::JobState::Cancelled,
    }
}

/// The wire form of a job error.
pub(super) fn error_to_pb(e: &JobError) -> pb::JobError {
    pb::JobError {
        context: match e.context {
            ErrorContext::None => pb::ErrorContext::None,
            ErrorContext::RemoteFile => pb::ErrorContext::RemoteFile,
            ErrorContext::LocalFile => pb::ErrorContext::LocalFile,
            ErrorContext::Transport => pb::ErrorContext::Transport,
            ErrorContext::Validation => pb::ErrorContext::Validation,
            ErrorContext::Notification => pb::ErrorContext::Notification,
            ErrorContext::ServerCertificate => pb::ErrorContext::ServerCertificate,
        } as i32,
        file: e.file.map(|f| u32::try_from(f).unwrap_or(u32::MAX)),
        description: e.description.clone(),
    }
}

pub(super) fn validation_to_pb(v: ValidationState) -> pb::ValidationState {
    match v {
        ValidationState::Unknown => pb::ValidationState::Unknown,
        ValidationState::Valid => pb::ValidationState::Valid,
        ValidationState::Invalid => pb::ValidationState::Invalid,
    }
}

pub(super) fn file_to_pb(f: &FileInfo) -> pb::File {
    pb::File {
        url: f.url.to_string(),
        local_name: f.local_name.display().to_string(),
        temp_name: f.temp_name.display().to_string(),
        expected_blake3: f.expected.blake3.map(hex::encode).unwrap_or_default(),
        expected_sha256: f.expected.sha256.map(|d| d.to_string()).unwrap_or_default(),
        content_id: f.content_id.map(|c| c.to_string()).unwrap_or_default(),
        sha256: f.sha256.map(|d| d.to_string()).unwrap_or_default(),
        bytes_total: f.bytes_total,
        bytes_transferred: f.bytes_transferred,
        bytes_from_peers: f.bytes_from.peers(),
        bytes_from_origin: f.bytes_from.origin,
        bytes_from_lan_peers: f.bytes_from.lan_peers,
        bytes_from_group_peers: f.bytes_from.group_peers,
        bytes_from_cache: f.bytes_from.cache,
        transferred: f.transferred,
        validation_state: validation_to_pb(f.validation_state) as i32,
        ranges: f
            .ranges
            .iter()
            .map(|r| pb::ByteRange {
                offset: r.offset,
                length: r.length,
            })
            .collect(),
    }
}

/// The wire form of a job snapshot.
pub(super) fn job_to_pb(info: &JobInfo) -> pb::Job {
    let from = info.bytes_from();
    pb::Job {
        id: info.id.to_string(),
        display_name: info.display_name.clone(),
        priority: priority_to_pb(info.priority) as i32,
        state: state_to_pb(info.state) as i32,
        owner: info.owner.unwrap_or(0),
        files: info.files.iter().map(file_to_pb).collect(),
        error: info.error.as_ref().map(error_to_pb),
        created_ms: to_ms(info.created),
        modified_ms: to_ms(info.modified),
        transfer_completed_ms: info.transfer_completed.map_or(0, to_ms),
        bytes_total: info.bytes_total(),
        bytes_transferred: info.bytes_transferred(),
        bytes_from_peers: from.peers(),
        bytes_from_origin: from.origin,
        bytes_from_lan_peers: from.lan_peers,
        bytes_from_group_peers: from.group_peers,
        bytes_from_cache: from.cache,
        percent_peer_caching: from.percent_peer_caching(),
        pieces_rejected: info.peer_stats.pieces_rejected,
        peers_banned: info.peer_stats.peers_banned,
        retry_delay_seconds: info.properties.retry_delay.as_secs(),
        no_progress_timeout_seconds: info.properties.no_progress_timeout.as_secs(),
        notify_flags: info.properties.notify_flags,
        notify_cmdline: info.properties.notify_cmdline.clone().unwrap_or_default(),
        max_download_time_seconds: info.properties.max_download_time.as_secs(),
        r#type: match info.job_type {
            crate::job::JobType::Download => pb::JobType::Download,
            crate::job::JobType::Upload => pb::JobType::Upload,
            crate::job::JobType::UploadReply => pb::JobType::UploadReply,
        } as i32,
        reply_file_name: info
            .reply_file_name
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
        active_time_ms: u64::try_from(info.active_time.as_millis()).unwrap_or(u64::MAX),
        http: Some(http_to_pb(&info.properties.http)),
    }
}

/// What a job snapshot shows of its HTTP options: header names, the credentials' scheme and
/// user, paths, proxies without user information; never a secret.
pub(super) fn http_to_pb(o: &crate::job::HttpOptions) -> pb::HttpOptionsInfo {
    use crate::job::{Credentials, ProxyUsage};
    let o = o.redacted();
    let (scheme, user) = match &o.credentials {
        None => ("", String::new()),
        Some(c @ Credentials::Basic { user, .. }) => (c.scheme(), user.clone()),
        Some(c @ Credentials::Bearer { .. }) => (c.scheme(), String::new()),
    };
    pb::HttpOptionsInfo {
        header_names: o.headers.iter().map(|(n, _)| n.clone()).collect(),
        credentials_scheme: scheme.to_owned(),
        credentials_user: user,
        client_certificate: o
            .client_certificate
            .as_ref()
            .map(|c| pb::ClientCertificate {
                certificate: c.certificate.display().to_string(),
                key: c.key.display().to_string(),
            }),
        ca_certificates: o
            .ca_certificates
            .iter()
            .map(|p| p.display().to_string())
            .collect(),
        proxy: Some(match &o.proxy {
            ProxyUsage::Preconfig => pb::ProxySettings {
                usage: pb::ProxyUsage::Preconfig as i32,
                ..pb::ProxySettings::default()
            },
            ProxyUsage::NoProxy => pb::ProxySettings {
                usage: pb::ProxyUsage::NoProxy as i32,
                ..pb::ProxySettings::default()
            },
            ProxyUsage::Override { proxies, bypass } => pb::ProxySettings {
                usage: pb::ProxyUsage::Override as i32,
                proxies: proxies.iter().map(ToString::to_string).collect(),
                bypass: bypass.clone(),
            },
        }),
    }
}

/// The progress event of a job.
pub(super) fn progress_of(info: &JobInfo) -> pb::Event {
    let from = info.bytes_from();
    pb::Event {
        job: info.id.to_string(),
        kind: Some(pb::event::Kind::Progress(pb::Progress {
            state: state_to_pb(info.state) as i32,
            bytes_total: info.bytes_total(),
            bytes_transferred: info.bytes_transferred(),
            bytes_from_peers: from.peers(),
            bytes_from_origin: from.origin,
            files: info
                .files
                .iter()
                .map(|f| pb::FileProgress {
                    bytes_total: f.bytes_total,
                    bytes_transferred: f.bytes_transferred,
                })
                .collect(),
        })),
    }
}

pub(super) fn parse_digest(field: &str, text: &str) -> Result<Option<[u8; 32]>, Status> {
    if text.is_empty() {
        return Ok(None);
    }
    shoal_protocol::parse_blake3_hex(text)
        .map(Some)
        .map_err(|_| Status::invalid_argument(format!("{field}: {text:?} is not 64 hex digits")))
}

/// The API form of a cache entry.
pub(super) fn cache_entry_to_pb(i: &crate::store::cache::CacheItem) -> pb::CacheEntry {
    pb::CacheEntry {
        content_id: i.content_id.to_string(),
        sha256: i.sha256.map(|d| d.to_string()).unwrap_or_default(),
        bytes: i.bytes,
        added_ms: crate::timestamp::to_ms(i.added),
        used_ms: crate::timestamp::to_ms(i.used),
        pinned: i.pinned,
        path: i.path.display().to_string(),
    }
}

pub(super) fn cache_usage_to_pb(u: &crate::store::cache::CacheUsage) -> pb::CacheUsage {
    pb::CacheUsage {
        bytes: u.bytes,
        limit: u.limit,
        entries: u32::try_from(u.entries).unwrap_or(u32::MAX),
        pinned_bytes: u.pinned_bytes,
    }
}

pub(super) fn bandwidth_to_pb(node: &Node) -> pb::Bandwidth {
    let b = node.bandwidth();
    let l = b.limits;
    pb::Bandwidth {
        download_foreground_bytes_per_sec: l.download_foreground.unwrap_or(0),
        download_background_bytes_per_sec: l.download_background.unwrap_or(0),
        upload_bytes_per_sec: l.upload.unwrap_or(0),
        monthly_upload_cap_bytes: l.monthly_upload_cap.unwrap_or(0),
        max_upload_peers: u32::try_from(node.max_upload_peers()).unwrap_or(u32::MAX),
        month: b.month,
        uploaded_this_month: b.uploaded_this_month,
        cap_reached: b.cap_reached,
    }
}

pub(super) fn parse_cache_key(text: &str) -> Result<shoal_protocol::HaveKey, Status> {
    text.parse().map_err(|e| {
        Status::invalid_argument(format!(
            "key {text:?}: {e} (give blake3:HEX, sha256:HEX, HEX:LENGTH or HEX)"
        ))
    })
}
