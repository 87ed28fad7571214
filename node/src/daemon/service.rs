//! The gRPC `Control` service: BITS operations on the daemon's node, with per-user ownership
//! and limits.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    pin::Pin,
    sync::Arc,
    time::Duration,
};

use futures::Stream;
use shoal_validator::{Expected, Sha256Digest, ValidationState};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::convert::{
    bandwidth_to_pb, cache_entry_to_pb, cache_usage_to_pb, job_to_pb, parse_cache_key,
    parse_digest, parse_job, priority_of, progress_of, state_to_pb,
};
use super::{Caller, Credentials, Limits, hub::Hub};
use crate::{
    Error, Node,
    daemon::control::{self as pb, control_server::Control},
    job::{ByteRange, FileSpec, JobId, JobInfo, MIN_RETRY_DELAY, State},
};

/// The service: the node, the hub, who is calling, and the limits.
pub(crate) struct Service {
    pub(crate) node: Node,
    pub(crate) hub: Arc<Hub>,
    pub(crate) credentials: Arc<dyn Credentials>,
    pub(crate) limits: Limits,
    /// Per caller: how often Status and Diagnose may run.
    pub(crate) probes: Arc<governor::DefaultKeyedRateLimiter<u32>>,
}

impl Service {
    /// RESOURCE_EXHAUSTED when `caller` called Status or Diagnose too often (they ask every
    /// peer and the DHT, which every download shares).
    fn probe_allowed(&self, caller: Caller, what: &str) -> Result<(), Status> {
        self.probes.check_key(&caller.uid).map_err(|_| {
            Status::resource_exhausted(format!(
                "user {} calls {what} too often (a burst of 10, then one a second)",
                caller.uid
            ))
        })
    }
}

/// The gRPC status of a node error.
fn status_of(e: &Error) -> Status {
    let msg = e.to_string();
    match e {
        Error::UnknownJob(_) => Status::not_found(msg),
        Error::InvalidState(_) | Error::Empty(_) => Status::failed_precondition(msg),
        Error::BadUrl { .. }
        | Error::BadLocalName { .. }
        | Error::BadRange(_)
        | Error::BadHttpOption { .. }
        | Error::UnknownFile { .. } => Status::invalid_argument(msg),
        Error::UploadFiles(_) => Status::failed_precondition(msg),
        Error::DuplicateLocalName(_) => Status::already_exists(msg),
        Error::Io { source, .. } if source.kind() == std::io::ErrorKind::PermissionDenied => {
            Status::permission_denied(msg)
        }
        Error::Cache(crate::store::cache::CacheError::Unknown(_)) => Status::not_found(msg),
        _ => Status::internal(msg),
    }
}

/// The answer of a node call, as a gRPC status on error.
fn answer<T>(r: Result<T, Error>) -> Result<T, Status> {
    r.map_err(|e| status_of(&e))
}

impl Service {
    /// Refuses callers other than root: the cache is the machine's.
    fn root_only<T>(&self, req: &Request<T>) -> Result<(), Status> {
        if self.caller(req)?.uid == 0 {
            Ok(())
        } else {
            Err(Status::permission_denied(
                "only root manages the cache (it holds every user's content)",
            ))
        }
    }

    /// The entry of `id` after a change.
    fn cache_entry(&self, id: &shoal_validator::ContentId) -> Result<pb::CacheEntry, Status> {
        self.node
            .cache_items()
            .iter()
            .find(|i| i.content_id == *id)
            .map(cache_entry_to_pb)
            .ok_or_else(|| Status::not_found(format!("the cache holds no {id}")))
    }

    fn caller<T>(&self, req: &Request<T>) -> Result<Caller, Status> {
        self.credentials
            .caller(req.metadata(), req.extensions())
            .ok_or_else(|| Status::unauthenticated("the caller's credentials are unknown"))
    }

    /// The job, if the caller may see it; other users' jobs answer NOT_FOUND like unknown ones.
    fn visible(&self, caller: Caller, text: &str) -> Result<JobInfo, Status> {
        let id = parse_job(text)?;
        let info = self.node.info(id).map_err(|e| status_of(&e))?;
        if caller.may_see(info.owner) {
            Ok(info)
        } else {
            Err(Status::not_found(Error::UnknownJob(id).to_string()))
        }
    }

    async fn job_call<F: Future<Output = Result<(), Error>>>(
        &self,
        req: Request<pb::JobRef>,
        op: impl FnOnce(Node, JobId) -> F,
    ) -> Result<Response<pb::Job>, Status> {
        let caller = self.caller(&req)?;
        let id = self.visible(caller, &req.get_ref().job)?.id;
        answer(op(self.node.clone(), id).await)?;
        let info = self.node.info(id).map_err(|e| status_of(&e))?;
        Ok(Response::new(job_to_pb(&info)))
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::Event, Status>> + Send>>;

/// The longest display name accepted, in bytes.
const MAX_DISPLAY_NAME_BYTES: usize = 256;
/// The longest URL accepted, in bytes.
const MAX_URL_BYTES: usize = 8 * 1024;
/// The longest local name (and notify argument) accepted, in bytes.
const MAX_NAME_BYTES: usize = 4 * 1024;
/// The most byte ranges of one file.
const MAX_RANGES: usize = 10_000;
/// The most arguments of a notify command line.
const MAX_ARGV: usize = 64;
/// The most request headers, proxies, bypass entries or CA files of one job.
const MAX_HTTP_ITEMS: usize = 64;

/// The job's HTTP options with the request's changes, or `None` when the request changes
/// none of them.
fn http_options_of(
    r: &pb::SetPropertiesRequest,
    info: &crate::job::JobInfo,
) -> Result<Option<crate::job::HttpOptions>, Status> {
    use crate::job::{ClientCertificate, Credentials, ProxyUsage};
    let count = |field: &str, n: usize| {
        if n > MAX_HTTP_ITEMS {
            Err(Status::invalid_argument(format!(
                "{field}: {n} entries, more than the limit of {MAX_HTTP_ITEMS}"
            )))
        } else {
            Ok(())
        }
    };
    let mut o = info.properties.http.clone();
    let mut changed = false;
    if let Some(h) = &r.headers {
        count("headers", h.headers.len())?;
        for x in &h.headers {
            bounded("header name", &x.name, MAX_NAME_BYTES)?;
            bounded("header value", &x.value, MAX_NAME_BYTES)?;
        }
        o.headers = h
            .headers
            .iter()
            .map(|x| (x.name.clone(), x.value.clone()))
            .collect();
        changed = true;
    }
    if let Some(c) = &r.credentials {
        o.credentials = match &c.scheme {
            None => None,
            Some(pb::credentials::Scheme::Basic(b)) => {
                bounded("credentials user", &b.user, MAX_NAME_BYTES)?;
                bounded("credentials password", &b.password, MAX_NAME_BYTES)?;
                Some(Credentials::Basic {
                    user: b.user.clone(),
                    password: b.password.clone(),
                })
            }
            Some(pb::credentials::Scheme::BearerToken(t)) => {
                bounded("bearer token", t, MAX_URL_BYTES)?;
                Some(Credentials::Bearer { token: t.clone() })
            }
        };
        changed = true;
    }
    if let Some(c) = &r.client_certificate {
        bounded("client certificate", &c.certificate, MAX_NAME_BYTES)?;
        bounded("client key", &c.key, MAX_NAME_BYTES)?;
        o.client_certificate = if c.certificate.is_empty() && c.key.is_empty() {
            None
        } else {
            Some(ClientCertificate {
                certificate: absolute("client certificate", &c.certificate)?,
                key: absolute("client key", &c.key)?,
            })
        };
        changed = true;
    }
    if let Some(p) = &r.ca_certificates {
        count("ca_certificates", p.paths.len())?;
        o.ca_certificates = p
            .paths
            .iter()
            .map(|p| {
                bounded("CA certificate", p, MAX_NAME_BYTES)?;
                absolute("CA certificate", p)
            })
            .collect::<Result<_, _>>()?;
        changed = true;
    }
    if let Some(p) = &r.proxy {
        count("proxies", p.proxies.len())?;
        count("bypass", p.bypass.len())?;
        o.proxy = match pb::ProxyUsage::try_from(p.usage) {
            Ok(pb::ProxyUsage::Unspecified | pb::ProxyUsage::Preconfig) => ProxyUsage::Preconfig,
            Ok(pb::ProxyUsage::NoProxy) => ProxyUsage::NoProxy,
            Ok(pb::ProxyUsage::Override) => ProxyUsage::Override {
                proxies: p
                    .proxies
                    .iter()
                    .map(|u| {
                        bounded("proxy", u, MAX_URL_BYTES)?;
                        u.parse().map_err(|e| {
                            Status::invalid_argument(format!("proxy {u:?} is not a URL: {e}"))
                        })
                    })
                    .collect::<Result<_, _>>()?,
                bypass: p
                    .bypass
                    .iter()
                    .map(|b| bounded("bypass", b, MAX_NAME_BYTES).map(|()| b.clone()))
                    .collect::<Result<_, _>>()?,
            },
            Err(_) => {
                return Err(Status::invalid_argument(format!(
                    "proxy usage {} is not one of preconfig, no_proxy, override",
                    p.usage
                )));
            }
        };
        changed = true;
    }
    Ok(changed.then_some(o))
}

/// `path` as a path, which must be absolute (the daemon does not know the caller's working
/// directory).
fn absolute(field: &str, path: &str) -> Result<std::path::PathBuf, Status> {
    if Path::new(path).is_absolute() {
        Ok(path.into())
    } else {
        Err(Status::invalid_argument(format!(
            "{field} {path:?} must be an absolute path"
        )))
    }
}

/// `INVALID_ARGUMENT` naming `field` when `value` is longer than `max` bytes.
fn bounded(field: &str, value: &str, max: usize) -> Result<(), Status> {
    if value.len() > max {
        return Err(Status::invalid_argument(format!(
            "{field}: {} bytes, more than the limit of {max}",
            value.len()
        )));
    }
    Ok(())
}

#[tonic::async_trait]
impl Control for Service {
    type WatchStream = EventStream;

    async fn create_job(
        &self,
        req: Request<pb::CreateJobRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        let caller = self.caller(&req)?;
        let r = req.into_inner();
        bounded("display_name", &r.display_name, MAX_DISPLAY_NAME_BYTES)?;
        let priority = priority_of(r.priority)?;
        let upload = match pb::JobType::try_from(r.r#type) {
            Ok(pb::JobType::Download | pb::JobType::Unspecified) => None,
            Ok(pb::JobType::Upload) => Some(false),
            Ok(pb::JobType::UploadReply) => Some(true),
            Err(_) => {
                return Err(Status::invalid_argument(format!(
                    "job type {} is not one of download, upload, upload-reply",
                    r.r#type
                )));
            }
        };
        let live: Vec<JobInfo> = self
            .node
            .jobs()
            .into_iter()
            .filter(|j| !j.state.is_final())
            .collect();
        if live.len() >= self.limits.jobs_per_machine {
            return Err(Status::resource_exhausted(format!(
                "the machine has {} jobs, the limit (jobs_per_machine)",
                self.limits.jobs_per_machine
            )));
        }
        let mine = live.iter().filter(|j| j.owner == Some(caller.uid)).count();
        if mine >= self.limits.jobs_per_user {
            return Err(Status::resource_exhausted(format!(
                "user {} has {mine} jobs, the limit (jobs_per_user)",
                caller.uid
            )));
        }
        let id = answer(match upload {
            None => {
                self.node
                    .create_job_with(&r.display_name, priority, Some(caller.uid), None)
                    .await
            }
            Some(reply) => {
                self.node
                    .create_upload_job(&r.display_name, priority, Some(caller.uid), reply)
                    .await
            }
        })?;
        let info = self.node.info(id).map_err(|e| status_of(&e))?;
        Ok(Response::new(job_to_pb(&info)))
    }

    async fn add_file(
        &self,
        req: Request<pb::AddFileRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        let caller = self.caller(&req)?;
        let r = req.into_inner();
        bounded("url", &r.url, MAX_URL_BYTES)?;
        bounded("local_name", &r.local_name, MAX_NAME_BYTES)?;
        if r.ranges.len() > MAX_RANGES {
            return Err(Status::invalid_argument(format!(
                "ranges: {} ranges, more than the limit of {MAX_RANGES}",
                r.ranges.len()
            )));
        }
        let info = self.visible(caller, &r.job)?;
        if info.files.len() >= self.limits.files_per_job {
            return Err(Status::resource_exhausted(format!(
                "the job has {} files, the limit (files_per_job)",
                self.limits.files_per_job
            )));
        }
        let url: url::Url = r
            .url
            .parse()
            .map_err(|e| Status::invalid_argument(format!("bad URL {:?}: {e}", r.url)))?;
        let local = PathBuf::from(&r.local_name);
        if !local.is_absolute() {
            return Err(Status::invalid_argument(format!(
                "local name {:?} must be an absolute path",
                r.local_name
            )));
        }
        let expected = Expected {
            blake3: parse_digest("blake3", &r.blake3)?,
            sha256: parse_digest("sha256", &r.sha256)?.map(Sha256Digest),
        };
        let ranges: Vec<ByteRange> = r
            .ranges
            .iter()
            .map(|b| ByteRange {
                offset: b.offset,
                length: b.length,
            })
            .collect();
        let id = info.id;
        answer(
            self.node
                .add_file(
                    id,
                    FileSpec {
                        url,
                        local_name: local,
                        expected,
                        ranges,
                    },
                )
                .await,
        )?;
        let info = self.node.info(id).map_err(|e| status_of(&e))?;
        Ok(Response::new(job_to_pb(&info)))
    }

    async fn resume(&self, req: Request<pb::JobRef>) -> Result<Response<pb::Job>, Status> {
        self.job_call(req, |n, id| async move { n.resume(id).await })
            .await
    }

    async fn suspend(&self, req: Request<pb::JobRef>) -> Result<Response<pb::Job>, Status> {
        self.job_call(req, |n, id| async move { n.suspend(id).await })
            .await
    }

    async fn cancel(&self, req: Request<pb::JobRef>) -> Result<Response<pb::Job>, Status> {
        self.job_call(req, |n, id| async move { n.cancel(id).await })
            .await
    }

    async fn complete(&self, req: Request<pb::JobRef>) -> Result<Response<pb::Job>, Status> {
        self.job_call(req, |n, id| async move { n.complete(id).await })
            .await
    }

    async fn diagnose(&self, req: Request<pb::JobRef>) -> Result<Response<pb::Diagnosis>, Status> {
        let caller = self.caller(&req)?;
        self.probe_allowed(caller, "Diagnose")?;
        let info = self.visible(caller, &req.get_ref().job)?;
        let d = self
            .node
            .diagnose(info.id)
            .await
            .map_err(|e| Status::not_found(e.to_string()))?;
        Ok(Response::new(pb::Diagnosis {
            job: Some(job_to_pb(&d.job)),
            peer_mode: d.mode.to_string(),
            group: d.group.unwrap_or_default(),
            connected_peers: u32::try_from(d.connected_peers).unwrap_or(u32::MAX),
            dht_enabled: d.dht.enabled,
            dht_protocol: d.dht.protocol,
            dht_routing_peers: u32::try_from(d.dht.routing_peers).unwrap_or(u32::MAX),
            origin_delay_ms: u64::try_from(d.origin_delay.as_millis()).unwrap_or(u64::MAX),
            never_origin: d.never_origin,
            files: d
                .files
                .into_iter()
                .map(|f| pb::FileDiagnosis {
                    index: u32::try_from(f.index).unwrap_or(u32::MAX),
                    url: f.url,
                    peers_not_allowed: f.peers_allowed.err().unwrap_or_default(),
                    dht_providers: f.dht_providers.iter().map(ToString::to_string).collect(),
                    answers: f
                        .answers
                        .into_iter()
                        .map(|a| pb::PeerAnswer {
                            peer: a.peer.to_string(),
                            source: a.source.as_str().into(),
                            banned: a.banned,
                            content_id: a.content_id,
                            have: a.have,
                            fetching: a.fetching,
                            claimed: a.claimed,
                            pieces: a.pieces,
                        })
                        .collect(),
                    asked: u32::try_from(f.asked).unwrap_or(u32::MAX),
                    members_alive: f
                        .members
                        .map_or(0, |m| u32::try_from(m.alive).unwrap_or(u32::MAX)),
                    member_fetchers: f
                        .members
                        .map_or(0, |m| u32::try_from(m.fetchers).unwrap_or(u32::MAX)),
                    origin_share: f.members.is_some_and(|m| m.me_fetching),
                })
                .collect(),
            reasons: d.reasons,
        }))
    }

    async fn get_job(&self, req: Request<pb::JobRef>) -> Result<Response<pb::Job>, Status> {
        let caller = self.caller(&req)?;
        let info = self.visible(caller, &req.get_ref().job)?;
        Ok(Response::new(job_to_pb(&info)))
    }

    async fn list_jobs(
        &self,
        req: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        let caller = self.caller(&req)?;
        let only = req.get_ref().owner;
        if only.is_some() && caller.uid != 0 {
            return Err(Status::permission_denied(
                "only root may list another user's jobs",
            ));
        }
        // Acknowledged and Cancelled jobs are gone, as in BITS.
        let mut jobs: Vec<JobInfo> = self
            .node
            .jobs()
            .into_iter()
            .filter(|j| caller.may_see(j.owner) && !j.state.is_final())
            .filter(|j| only.is_none_or(|u| j.owner == Some(u)))
            .collect();
        jobs.sort_by_key(|j| j.created);
        Ok(Response::new(pb::ListJobsResponse {
            jobs: jobs.iter().map(job_to_pb).collect(),
        }))
    }

    async fn set_properties(
        &self,
        req: Request<pb::SetPropertiesRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        let caller = self.caller(&req)?;
        let r = req.into_inner();
        let id = self.visible(caller, &r.job)?.id;
        let priority = r.priority.map(priority_of).transpose()?;
        if let Some(s) = r.retry_delay_seconds
            && Duration::from_secs(s) < MIN_RETRY_DELAY
        {
            return Err(Status::invalid_argument(format!(
                "retry delay {s} s is below the minimum of {} s",
                MIN_RETRY_DELAY.as_secs()
            )));
        }
        if let Some(n) = &r.display_name {
            bounded("display_name", n, MAX_DISPLAY_NAME_BYTES)?;
        }
        if let Some(c) = &r.notify_cmdline {
            if c.argv.len() > MAX_ARGV {
                return Err(Status::invalid_argument(format!(
                    "notify_cmdline: {} arguments, more than the limit of {MAX_ARGV}",
                    c.argv.len()
                )));
            }
            for a in &c.argv {
                bounded("notify_cmdline argument", a, MAX_NAME_BYTES)?;
            }
        }
        let http = http_options_of(&r, &self.node.info(id).map_err(|e| status_of(&e))?)?;
        let cmdline = match r.notify_cmdline {
            None => None,
            Some(c) if c.argv.is_empty() => Some(None),
            Some(c) => {
                if !Path::new(&c.argv[0]).is_absolute() {
                    return Err(Status::invalid_argument(format!(
                        "notify program {:?} must be an absolute path",
                        c.argv[0]
                    )));
                }
                Some(Some(c.argv))
            }
        };
        if let Some(http) = http {
            answer(self.node.set_http_options(id, http).await)?;
        }
        let max_download_time = r.max_download_time_seconds.map(|s| {
            if s == 0 {
                crate::job::DEFAULT_MAX_DOWNLOAD_TIME
            } else {
                Duration::from_secs(s)
            }
        });
        answer(
            self.node
                .modify(id, move |info| {
                    if let Some(t) = max_download_time {
                        info.properties.max_download_time = t;
                    }
                    if let Some(n) = r.display_name {
                        info.display_name = n;
                    }
                    if let Some(p) = priority {
                        info.priority = p;
                    }
                    if let Some(s) = r.retry_delay_seconds {
                        info.properties.retry_delay = Duration::from_secs(s);
                    }
                    if let Some(s) = r.no_progress_timeout_seconds {
                        info.properties.no_progress_timeout = Duration::from_secs(s);
                    }
                    if let Some(f) = r.notify_flags {
                        info.properties.notify_flags = f;
                    }
                    if let Some(c) = cmdline {
                        info.properties.notify_cmdline = c;
                    }
                    Ok(())
                })
                .await,
        )?;
        let info = self.node.info(id).map_err(|e| status_of(&e))?;
        Ok(Response::new(job_to_pb(&info)))
    }

    async fn set_remote_name(
        &self,
        req: Request<pb::SetRemoteNameRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        let caller = self.caller(&req)?;
        let r = req.into_inner();
        let id = self.visible(caller, &r.job)?.id;
        bounded("url", &r.url, MAX_URL_BYTES)?;
        let url = r
            .url
            .parse()
            .map_err(|e| Status::invalid_argument(format!("bad URL: {e}")))?;
        answer(
            self.node
                .set_remote_name(id, r.file as usize, url)
                .await
                .map(drop),
        )?;
        let info = self.node.info(id).map_err(|e| status_of(&e))?;
        Ok(Response::new(job_to_pb(&info)))
    }

    async fn replace_remote_prefix(
        &self,
        req: Request<pb::ReplaceRemotePrefixRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        let caller = self.caller(&req)?;
        let r = req.into_inner();
        let id = self.visible(caller, &r.job)?.id;
        bounded("old_prefix", &r.old_prefix, MAX_URL_BYTES)?;
        bounded("new_prefix", &r.new_prefix, MAX_URL_BYTES)?;
        answer(
            self.node
                .replace_remote_prefix(id, &r.old_prefix, &r.new_prefix)
                .await
                .map(drop),
        )?;
        let info = self.node.info(id).map_err(|e| status_of(&e))?;
        Ok(Response::new(job_to_pb(&info)))
    }

    async fn get_reply_data(
        &self,
        req: Request<pb::JobRef>,
    ) -> Result<Response<pb::ReplyData>, Status> {
        let caller = self.caller(&req)?;
        let info = self.visible(caller, &req.into_inner().job)?;
        let data = answer(self.node.reply_data(info.id).await)?;
        Ok(Response::new(pb::ReplyData {
            data,
            reply_file_name: info
                .reply_file_name
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
        }))
    }

    async fn set_validation_state(
        &self,
        req: Request<pb::SetValidationStateRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        let caller = self.caller(&req)?;
        let r = req.into_inner();
        let info = self.visible(caller, &r.job)?;
        let state = match pb::ValidationState::try_from(r.state) {
            Ok(pb::ValidationState::Valid) => ValidationState::Valid,
            Ok(pb::ValidationState::Invalid) => ValidationState::Invalid,
            _ => {
                return Err(Status::invalid_argument(
                    "the verdict must be VALID or INVALID",
                ));
            }
        };
        let file = r.file as usize;
        if file >= info.files.len() {
            return Err(Status::invalid_argument(format!(
                "the job has no file {file}"
            )));
        }
        if !self.hub.set_verdict(info.id, file, state) {
            return Err(Status::failed_precondition(format!(
                "file {file} of job {} is not waiting for a verdict",
                info.id
            )));
        }
        let info = self.node.info(info.id).map_err(|e| status_of(&e))?;
        Ok(Response::new(job_to_pb(&info)))
    }

    async fn watch(
        &self,
        req: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let caller = self.caller(&req)?;
        let r = req.into_inner();
        let job = if r.job.is_empty() {
            None
        } else {
            Some(self.visible(caller, &r.job)?.id)
        };
        let (_, rx) = self.hub.watch(caller.uid, job, r.progress).ok_or_else(|| {
            Status::resource_exhausted(format!(
                "user {} has {} Watch streams open, the limit",
                caller.uid,
                super::hub::WATCHERS_PER_USER
            ))
        })?;
        // Notifications waiting for a retry go out now that someone listens.
        for info in self.node.jobs() {
            if caller.may_see(info.owner)
                && job.is_none_or(|j| j == info.id)
                && matches!(info.state, State::Transferred | State::Error)
            {
                let _ = self.node.retry_now(info.id).await;
            }
        }
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn acknowledge(
        &self,
        req: Request<pb::AcknowledgeRequest>,
    ) -> Result<Response<pb::AcknowledgeResponse>, Status> {
        let caller = self.caller(&req)?;
        let accepted = self
            .hub
            .acknowledge(req.get_ref().delivery, |owner| caller.may_see(owner));
        Ok(Response::new(pb::AcknowledgeResponse { accepted }))
    }

    async fn status(
        &self,
        req: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::NodeStatus>, Status> {
        let caller = self.caller(&req)?;
        self.probe_allowed(caller, "Status")?;
        let jobs: Vec<JobInfo> = self
            .node
            .jobs()
            .into_iter()
            .filter(|j| caller.may_see(j.owner))
            .collect();
        let mut by_state: HashMap<String, u32> = HashMap::new();
        for j in &jobs {
            *by_state
                .entry(state_to_pb(j.state).as_str_name().to_owned())
                .or_default() += 1;
        }
        let uploads = self.node.upload_stats();
        let st = self.node.stats();
        let dht = self.node.dht_status().await;
        let jobs_from: crate::job::BytesBySource = jobs.iter().map(JobInfo::bytes_from).sum();
        Ok(Response::new(pb::NodeStatus {
            node: Some(pb::NodeStats {
                bytes_from_origin: st.bytes_from.origin,
                bytes_from_lan_peers: st.bytes_from.lan_peers,
                bytes_from_group_peers: st.bytes_from.group_peers,
                bytes_from_cache: st.bytes_from.cache,
                bytes_uploaded: st.bytes_uploaded,
                pieces_rejected: st.pieces_rejected,
                peers_banned: st.peers_banned,
                percent_peer_caching: st.percent_peer_caching(),
            }),
            peer_mode: self.node.mode().to_string(),
            group: self.node.group().unwrap_or_default().to_owned(),
            dht_routing_peers: u32::try_from(dht.routing_peers).unwrap_or(u32::MAX),
            dht_provided_keys: u32::try_from(dht.provided_keys).unwrap_or(u32::MAX),
            peer_id: self.node.peer_id().to_string(),
            listen_addrs: self
                .node
                .listen_addrs()
                .await
                .iter()
                .map(ToString::to_string)
                .collect(),
            connected_peers: u32::try_from(self.node.connected_peers().await.len())
                .unwrap_or(u32::MAX),
            jobs_by_state: by_state,
            bytes_from_peers: jobs_from.peers(),
            bytes_from_origin: jobs_from.origin,
            upload_pieces: uploads.pieces,
            upload_bytes: uploads.bytes,
            upload_busy: uploads.busy,
            cache: st.cache.as_ref().map(cache_usage_to_pb),
        }))
    }

    async fn list_cache(
        &self,
        req: Request<pb::ListCacheRequest>,
    ) -> Result<Response<pb::ListCacheResponse>, Status> {
        self.root_only(&req)?;
        let usage = self
            .node
            .stats()
            .cache
            .ok_or_else(|| Status::failed_precondition("the daemon keeps no cache"))?;
        Ok(Response::new(pb::ListCacheResponse {
            entries: self
                .node
                .cache_items()
                .iter()
                .map(cache_entry_to_pb)
                .collect(),
            usage: Some(cache_usage_to_pb(&usage)),
        }))
    }

    async fn pin_cache(
        &self,
        req: Request<pb::PinCacheRequest>,
    ) -> Result<Response<pb::CacheEntry>, Status> {
        self.root_only(&req)?;
        let key = parse_cache_key(&req.get_ref().key)?;
        let id = self
            .node
            .cache_pin(key, req.get_ref().pinned)
            .await
            .map_err(|e| status_of(&e))?;
        Ok(Response::new(self.cache_entry(&id)?))
    }

    async fn get_bandwidth(
        &self,
        req: Request<pb::GetBandwidthRequest>,
    ) -> Result<Response<pb::Bandwidth>, Status> {
        self.caller(&req)?;
        Ok(Response::new(bandwidth_to_pb(&self.node)))
    }

    async fn set_bandwidth(
        &self,
        req: Request<pb::SetBandwidthRequest>,
    ) -> Result<Response<pb::Bandwidth>, Status> {
        if self.caller(&req)?.uid != 0 {
            return Err(Status::permission_denied(
                "only root changes the bandwidth limits (they are the machine's)",
            ));
        }
        let r = req.get_ref();
        if r.max_upload_peers == Some(0) {
            return Err(Status::invalid_argument(
                "max_upload_peers must be at least 1",
            ));
        }
        let limit = |v: Option<u64>, old: Option<u64>| match v {
            None => old,
            Some(0) => None,
            Some(n) => Some(n),
        };
        let mut l = self.node.bandwidth().limits;
        l.download_foreground = limit(r.download_foreground_bytes_per_sec, l.download_foreground);
        l.download_background = limit(r.download_background_bytes_per_sec, l.download_background);
        l.upload = limit(r.upload_bytes_per_sec, l.upload);
        l.monthly_upload_cap = limit(r.monthly_upload_cap_bytes, l.monthly_upload_cap);
        self.node.set_bandwidth(l);
        if let Some(n) = r.max_upload_peers {
            self.node.set_max_upload_peers(n as usize);
        }
        Ok(Response::new(bandwidth_to_pb(&self.node)))
    }

    async fn evict_cache(
        &self,
        req: Request<pb::EvictCacheRequest>,
    ) -> Result<Response<pb::CacheEntry>, Status> {
        self.root_only(&req)?;
        let key = parse_cache_key(&req.get_ref().key)?;
        let before = self.node.cache_items();
        let id = self
            .node
            .cache_evict(key)
            .await
            .map_err(|e| status_of(&e))?;
        before
            .iter()
            .find(|i| i.content_id == id)
            .map(|i| Response::new(cache_entry_to_pb(i)))
            .ok_or_else(|| Status::not_found(format!("the cache holds no {id}")))
    }
}

/// Sends Progress events of active jobs every `period` while some client wants them.
/// (JobModification events go out from each job's callback, in order with its notifications.)
pub(crate) async fn forward_progress(node: Node, hub: Arc<Hub>, period: Duration) {
    let mut tick = tokio::time::interval(period);
    loop {
        tick.tick().await;
        if hub.wants_progress() {
            for info in node.jobs() {
                if info.state.is_active() {
                    hub.send(info.id, info.owner, &progress_of(&info));
                }
            }
        }
    }
}
