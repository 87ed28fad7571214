//! The node's durable state: jobs, their files, per-file verified-piece bitmaps and piece
//! layers, in one redb database (`state.redb`) under the state directory.
//!
//! Every write is one redb transaction, committed durably (redb's default: the commit has
//! reached the disk when [`StateStore`]'s method returns). What a caller was told succeeded is
//! therefore on disk, and survives `kill -9` and power loss alike.
//!
//! Tables (keys are a job's UUID as `u128`, and a file's index within its job):
//!
//! | table | key | value |
//! | --- | --- | --- |
//! | `meta` | name | `format` → `shoal-state/1`; `identity` → the node's libp2p key (protobuf) |
//! | `jobs` | job | the job record (`JobDisk`) as JSON |
//! | `files` | (job, file) | the file record (`FileDisk`) as JSON |
//! | `pieces` | (job, file) | the bitmap of pieces verified and flushed to the temporary file |
//! | `resume` | (job, file) | `ResumeDisk` as JSON: what the bitmap is a bitmap of |
//! | `layers` | (job, file) | the trusted piece layer: 32-byte chaining values, concatenated |
//!
//! The invariant between the temporary files and `pieces`: a bit is committed only after its
//! piece was written and the file flushed with `fdatasync` (see `download` and
//! `docs/operations.md`). At start every bit is checked again against the layer (or hashed
//! into the content id being derived) before it is trusted, so a torn or altered temporary
//! file costs a refetch, never a wrong byte.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use shoal_protocol::Bitfield;
use shoal_validator::{
    ChainingValue, ContentId, Expected, LayerBuilder, PieceLayer, Sha256Digest, ValidationState,
};
use thiserror::Error;

use crate::timestamp::{from_ms, to_ms};
use crate::{
    job::{
        ByteRange, BytesBySource, ClientCertificate, Credentials, DEFAULT_MAX_DOWNLOAD_TIME,
        ErrorContext, FileInfo, HttpOptions, JobError, JobId, JobInfo, JobProperties, JobType,
        PeerStats, Priority, ProxyUsage, State,
    },
    store::fsuser::LocalIds,
};

/// The value of `meta/format` this code writes and reads.
const FORMAT: &[u8] = b"shoal-state/1";
/// The database file's name in the state directory.
pub(crate) const DB_FILE: &str = "state.redb";

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const JOBS: TableDefinition<u128, &[u8]> = TableDefinition::new("jobs");
const FILES: TableDefinition<(u128, u32), &[u8]> = TableDefinition::new("files");
const PIECES: TableDefinition<(u128, u32), &[u8]> = TableDefinition::new("pieces");
const RESUME: TableDefinition<(u128, u32), &[u8]> = TableDefinition::new("resume");
const LAYERS: TableDefinition<(u128, u32), &[u8]> = TableDefinition::new("layers");

/// Errors of the state store.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum PersistError {
    /// The state directory could not be created or the database opened (a corrupt file, one
    /// locked by another daemon, or a permission problem).
    #[error("cannot open the state database {path}: {source}")]
    Open {
        /// The database file.
        path: PathBuf,
        /// The cause.
        source: Box<redb::Error>,
    },
    /// The file is a redb database, but not Shoal's (no or another `format` marker).
    #[error("{path} is not a Shoal state database (format {found:?}, expected {expected:?})")]
    Foreign {
        /// The database file.
        path: PathBuf,
        /// The marker found, if any.
        found: Option<String>,
        /// The marker this version writes.
        expected: String,
    },
    /// A record could not be decoded.
    #[error("corrupt state record {what}: {detail}")]
    Corrupt {
        /// Which record.
        what: String,
        /// What was wrong.
        detail: String,
    },
    /// A read or write failed.
    #[error("state database: {0}")]
    Db(#[from] Box<redb::Error>),
}

fn db_err(e: impl Into<redb::Error>) -> PersistError {
    PersistError::Db(Box::new(e.into()))
}

/// A job as stored: everything of [`JobInfo`] but the files, plus what only the node keeps.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub(crate) struct JobDisk {
    pub(crate) display_name: String,
    pub(crate) priority: String,
    pub(crate) state: String,
    pub(crate) owner: Option<u32>,
    pub(crate) error: Option<ErrorDisk>,
    pub(crate) pieces_rejected: u64,
    pub(crate) peers_banned: u64,
    pub(crate) created_ms: u64,
    pub(crate) modified_ms: u64,
    pub(crate) transfer_completed_ms: Option<u64>,
    pub(crate) retry_delay_s: u64,
    pub(crate) no_progress_timeout_s: u64,
    pub(crate) notify_flags: u32,
    pub(crate) notify_cmdline: Option<Vec<String>>,
    pub(crate) file_count: u32,
    /// Absent in records of older versions: BITS's default.
    #[serde(default)]
    pub(crate) max_download_time_s: Option<u64>,
    /// The HTTP options, secrets included: the database is readable by root only (its
    /// directory is 0700), and nothing else stores them.
    #[serde(default)]
    pub(crate) http: Option<HttpDisk>,
    /// Milliseconds spent in Connecting and Transferring since the last Resume.
    #[serde(default)]
    pub(crate) active_ms: u64,
    /// "Download" (absent in older records), "Upload" or "UploadReply".
    #[serde(default)]
    pub(crate) job_type: Option<String>,
    #[serde(default)]
    pub(crate) reply_file_name: Option<PathBuf>,
    #[serde(default)]
    pub(crate) upload_session: Option<String>,
    /// Bytes the upload server acknowledged.
    #[serde(default)]
    pub(crate) upload_acked: u64,
}

/// A job's HTTP options as stored.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub(crate) struct HttpDisk {
    #[serde(default)]
    pub(crate) headers: Vec<(String, String)>,
    /// `("Basic", user, password)` or `("Bearer", "", token)`.
    #[serde(default)]
    pub(crate) credentials: Option<(String, String, String)>,
    #[serde(default)]
    pub(crate) client_certificate: Option<(PathBuf, PathBuf)>,
    #[serde(default)]
    pub(crate) ca_certificates: Vec<PathBuf>,
    /// "preconfig", "no_proxy" or "override".
    #[serde(default)]
    pub(crate) proxy_usage: String,
    #[serde(default)]
    pub(crate) proxies: Vec<String>,
    #[serde(default)]
    pub(crate) bypass: Vec<String>,
}

impl HttpDisk {
    fn of(o: &HttpOptions) -> Option<Self> {
        if *o == HttpOptions::default() {
            return None;
        }
        let (proxy_usage, proxies, bypass) = match &o.proxy {
            ProxyUsage::Preconfig => ("preconfig", Vec::new(), Vec::new()),
            ProxyUsage::NoProxy => ("no_proxy", Vec::new(), Vec::new()),
            ProxyUsage::Override { proxies, bypass } => (
                "override",
                proxies.iter().map(ToString::to_string).collect(),
                bypass.clone(),
            ),
        };
        Some(Self {
            headers: o.headers.clone(),
            credentials: o.credentials.as_ref().map(|c| match c {
                Credentials::Basic { user, password } => {
                    ("Basic".to_owned(), user.clone(), password.clone())
                }
                Credentials::Bearer { token } => {
                    ("Bearer".to_owned(), String::new(), token.clone())
                }
            }),
            client_certificate: o
                .client_certificate
                .as_ref()
                .map(|c| (c.certificate.clone(), c.key.clone())),
            ca_certificates: o.ca_certificates.clone(),
            proxy_usage: proxy_usage.to_owned(),
            proxies,
            bypass,
        })
    }

    fn to_options(&self) -> Option<HttpOptions> {
        let proxy = match self.proxy_usage.as_str() {
            "" | "preconfig" => ProxyUsage::Preconfig,
            "no_proxy" => ProxyUsage::NoProxy,
            "override" => ProxyUsage::Override {
                proxies: self
                    .proxies
                    .iter()
                    .map(|p| p.parse().ok())
                    .collect::<Option<_>>()?,
                bypass: self.bypass.clone(),
            },
            _ => return None,
        };
        let credentials = match &self.credentials {
            None => None,
            Some((scheme, user, secret)) => Some(match scheme.as_str() {
                "Basic" => Credentials::Basic {
                    user: user.clone(),
                    password: secret.clone(),
                },
                "Bearer" => Credentials::Bearer {
                    token: secret.clone(),
                },
                _ => return None,
            }),
        };
        Some(HttpOptions {
            headers: self.headers.clone(),
            credentials,
            client_certificate: self
                .client_certificate
                .as_ref()
                .map(|(c, k)| ClientCertificate {
                    certificate: c.clone(),
                    key: k.clone(),
                }),
            ca_certificates: self.ca_certificates.clone(),
            proxy,
        })
    }
}

/// A job error as stored.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub(crate) struct ErrorDisk {
    pub(crate) context: String,
    pub(crate) file: Option<u32>,
    pub(crate) description: String,
}

/// A file as stored.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub(crate) struct FileDisk {
    pub(crate) url: String,
    pub(crate) local_name: PathBuf,
    pub(crate) temp_name: PathBuf,
    pub(crate) blake3: Option<String>,
    pub(crate) sha256: Option<String>,
    /// Byte ranges as (offset, length or none for "to the end").
    #[serde(default)]
    pub(crate) ranges: Vec<(u64, Option<u64>)>,
    /// The content id (`hash:length`) once known.
    pub(crate) content_id: Option<String>,
    pub(crate) computed_sha256: Option<String>,
    pub(crate) bytes_total: Option<u64>,
    pub(crate) bytes_from_peers: u64,
    pub(crate) bytes_from_origin: u64,
    #[serde(default)]
    pub(crate) bytes_from_lan_peers: u64,
    #[serde(default)]
    pub(crate) bytes_from_group_peers: u64,
    #[serde(default)]
    pub(crate) bytes_from_cache: u64,
    pub(crate) transferred: bool,
    pub(crate) validation: String,
    pub(crate) origin_only: bool,
    pub(crate) completed: bool,
    /// The file's directory and the file that verified (absent in records of older versions).
    #[serde(default)]
    pub(crate) local: LocalIds,
}

/// What a file's bitmap refers to: the content being assembled in its temporary file.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct ResumeDisk {
    /// The file's length in bytes.
    pub(crate) length: u64,
    /// The content id (`hash:length`) when a trusted or claimed layer is in use.
    pub(crate) content_id: Option<String>,
    /// True when that content id is a peer's untrusted claim for the expected SHA-256.
    pub(crate) claimed: bool,
    /// The origin's validator (ETag or Last-Modified) when origin bytes were used.
    pub(crate) validator: Option<String>,
    /// True when some of the pieces came from peers.
    pub(crate) from_peers: bool,
}

/// A stored job with its files, as [`StateStore::load`] returns it.
#[derive(Debug)]
pub(crate) struct StoredJob {
    pub(crate) id: JobId,
    pub(crate) job: JobDisk,
    pub(crate) files: Vec<StoredFile>,
}

/// A stored file with its bitmap and layer, if any.
#[derive(Debug)]
pub(crate) struct StoredFile {
    pub(crate) file: FileDisk,
    /// The raw bitmap; its length is checked against the content id by the loader.
    pub(crate) pieces: Option<Vec<u8>>,
    pub(crate) resume: Option<ResumeDisk>,
    pub(crate) layer: Option<Vec<ChainingValue>>,
}

/// The redb database of a node's durable state. `Send + Sync`; every method blocks on disk
/// I/O (call it from a blocking context in async code).
#[derive(Debug)]
pub(crate) struct StateStore {
    db: Database,
    path: PathBuf,
}

impl StateStore {
    /// Opens (or creates) `DIR/state.redb`, creating `DIR` with mode 0700 if needed, and
    /// checks the format marker.
    ///
    /// # Errors
    /// [`PersistError::Open`] when the directory or file cannot be created or opened, or the
    /// file is corrupt or held by another process; [`PersistError::Foreign`] when the file is
    /// another program's database or another format version.
    pub(crate) fn open(dir: &Path) -> Result<Self, PersistError> {
        let path = dir.join(DB_FILE);
        let open_err = |e: redb::Error| PersistError::Open {
            path: path.clone(),
            source: Box::new(e),
        };
        {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| open_err(redb::Error::Io(e)))?;
        }
        crate::store::fsuser::check_private_dir(dir).map_err(|e| open_err(redb::Error::Io(e)))?;
        let fresh = !path.exists();
        // The integrity check reads the whole file: state databases are small, and a file
        // damaged while the daemon was down is reported instead of trusted.
        let db = Database::builder()
            .set_check_integrity_on_open(true)
            .create(&path)
            .map_err(|e| open_err(e.into()))?;
        let store = Self { db, path };
        if fresh {
            store.put_meta("format", FORMAT)?;
        }
        let found = store.meta("format")?;
        if found.as_deref() != Some(FORMAT) {
            return Err(PersistError::Foreign {
                path: store.path.clone(),
                found: found.map(|f| String::from_utf8_lossy(&f).into_owned()),
                expected: String::from_utf8_lossy(FORMAT).into_owned(),
            });
        }
        Ok(store)
    }

    /// A value of the `meta` table.
    ///
    /// # Errors
    /// [`PersistError::Db`] when the read fails.
    pub(crate) fn meta(&self, name: &str) -> Result<Option<Vec<u8>>, PersistError> {
        let tx = self.db.begin_read().map_err(db_err)?;
        let table = match tx.open_table(META) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(db_err(e)),
        };
        Ok(table.get(name).map_err(db_err)?.map(|v| v.value().to_vec()))
    }

    /// Sets a value of the `meta` table, durably.
    ///
    /// # Errors
    /// [`PersistError::Db`] when the write fails.
    pub(crate) fn put_meta(&self, name: &str, value: &[u8]) -> Result<(), PersistError> {
        let tx = self.db.begin_write().map_err(db_err)?;
        tx.open_table(META)
            .map_err(db_err)?
            .insert(name, value)
            .map_err(db_err)?;
        tx.commit().map_err(db_err)
    }

    /// Writes a job's record and, for each `(index, file)` given, that file's record.
    pub(crate) fn put_job(
        &self,
        id: JobId,
        job: &JobDisk,
        files: &[(u32, FileDisk)],
    ) -> Result<(), PersistError> {
        let key = id.0.as_u128();
        let tx = self.db.begin_write().map_err(db_err)?;
        {
            let json = serde_json::to_vec(job).map_err(|e| corrupt(&format!("job {id}"), &e))?;
            tx.open_table(JOBS)
                .map_err(db_err)?
                .insert(key, json.as_slice())
                .map_err(db_err)?;
            let mut table = tx.open_table(FILES).map_err(db_err)?;
            for (index, file) in files {
                let json = serde_json::to_vec(file)
                    .map_err(|e| corrupt(&format!("job {id} file {index}"), &e))?;
                table
                    .insert((key, *index), json.as_slice())
                    .map_err(db_err)?;
            }
        }
        tx.commit().map_err(db_err)
    }

    /// Runs `write` in one transaction, if the job is still stored (a late write about a job
    /// that was cancelled or completed meanwhile must not bring it back), and commits.
    fn write_if_job(
        &self,
        id: JobId,
        write: impl FnOnce(&redb::WriteTransaction, u128) -> Result<(), PersistError>,
    ) -> Result<(), PersistError> {
        let key = id.0.as_u128();
        let tx = self.db.begin_write().map_err(db_err)?;
        let stored = tx
            .open_table(JOBS)
            .map_err(db_err)?
            .get(key)
            .map_err(db_err)?
            .is_some();
        if !stored {
            return Ok(());
        }
        write(&tx, key)?;
        tx.commit().map_err(db_err)
    }

    /// Records the pieces of a file now on disk (call only after the temporary file was
    /// flushed), what they are pieces of, and, when given, the trusted layer.
    pub(crate) fn checkpoint(
        &self,
        id: JobId,
        index: u32,
        pieces: &Bitfield,
        resume: &ResumeDisk,
        layer: Option<&[ChainingValue]>,
    ) -> Result<(), PersistError> {
        let json = serde_json::to_vec(resume)
            .map_err(|e| corrupt(&format!("job {id} file {index} resume"), &e))?;
        self.write_if_job(id, |tx, key| {
            put(tx, PIECES, (key, index), pieces.as_bytes())?;
            put(tx, RESUME, (key, index), &json)?;
            if let Some(cvs) = layer {
                put(tx, LAYERS, (key, index), &cvs.concat())?;
            }
            Ok(())
        })
    }

    /// The pieces an earlier run of this file left on disk, if the stored rows describe
    /// usable ones (see [`ResumePoint::from_stored`]). Read errors count as nothing stored.
    pub(crate) fn resume_point(
        &self,
        id: JobId,
        index: u32,
        file: &FileInfo,
    ) -> Option<ResumePoint> {
        let key = (id.0.as_u128(), index);
        let tx = self.db.begin_read().ok()?;
        let get = |def: TableDefinition<(u128, u32), &[u8]>| -> Option<Vec<u8>> {
            let table = tx.open_table(def).ok()?;
            table.get(key).ok().flatten().map(|v| v.value().to_vec())
        };
        let pieces = get(PIECES)?;
        let meta: ResumeDisk = serde_json::from_slice(&get(RESUME)?).ok()?;
        let layer = get(LAYERS)
            .map(|flat| shoal_validator::chaining_values_from_bytes(&flat))
            .transpose()
            .ok()?;
        ResumePoint::from_stored(Some(&pieces), Some(&meta), layer.as_deref(), &file.expected)
    }

    /// Stores the layer of a file that verified, so that after a restart the node can serve it
    /// again. Does nothing when the job is no longer stored.
    pub(crate) fn record_layer(
        &self,
        id: JobId,
        index: u32,
        layer: &PieceLayer,
    ) -> Result<(), PersistError> {
        self.write_if_job(id, |tx, key| {
            put(tx, LAYERS, (key, index), &layer.chaining_values().concat())
        })
    }

    /// Forgets a file's bitmap, resume record and layer (its bytes were discarded).
    pub(crate) fn clear_pieces(&self, id: JobId, index: u32) -> Result<(), PersistError> {
        let key = id.0.as_u128();
        let tx = self.db.begin_write().map_err(db_err)?;
        for def in [PIECES, RESUME, LAYERS] {
            tx.open_table(def)
                .map_err(db_err)?
                .remove((key, index))
                .map_err(db_err)?;
        }
        tx.commit().map_err(db_err)
    }

    /// Removes a job and everything of its files.
    pub(crate) fn remove_job(&self, id: JobId) -> Result<(), PersistError> {
        let key = id.0.as_u128();
        let range = (key, 0)..=(key, u32::MAX);
        let tx = self.db.begin_write().map_err(db_err)?;
        {
            tx.open_table(JOBS)
                .map_err(db_err)?
                .remove(key)
                .map_err(db_err)?;
            for def in [FILES, PIECES, RESUME, LAYERS] {
                let mut table = tx.open_table(def).map_err(db_err)?;
                table
                    .retain_in(range.clone(), |_, _| false)
                    .map_err(db_err)?;
            }
        }
        tx.commit().map_err(db_err)
    }

    /// Reads every stored job with its files, bitmaps and layers.
    ///
    /// # Errors
    /// [`PersistError::Corrupt`] naming the record that does not decode; [`PersistError::Db`].
    pub(crate) fn load(&self) -> Result<Vec<StoredJob>, PersistError> {
        let tx = self.db.begin_read().map_err(db_err)?;
        let jobs = match tx.open_table(JOBS) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(db_err(e)),
        };
        let open = |def| match tx.open_table(def) {
            Ok(t) => Ok(Some(t)),
            Err(redb::TableError::TableDoesNotExist(_)) => Ok(None),
            Err(e) => Err(db_err(e)),
        };
        let (files, pieces, resumes, layers) =
            (open(FILES)?, open(PIECES)?, open(RESUME)?, open(LAYERS)?);
        let mut out = Vec::new();
        for row in jobs.iter().map_err(db_err)? {
            let (k, v) = row.map_err(db_err)?;
            let key = k.value();
            let id = JobId(uuid::Uuid::from_u128(key));
            let job: JobDisk =
                serde_json::from_slice(v.value()).map_err(|e| corrupt(&format!("job {id}"), &e))?;
            let mut stored = Vec::new();
            for index in 0..job.file_count {
                let what = format!("job {id} file {index}");
                let raw = files
                    .as_ref()
                    .map(|t| t.get((key, index)))
                    .transpose()
                    .map_err(db_err)?
                    .flatten()
                    .ok_or_else(|| PersistError::Corrupt {
                        what: what.clone(),
                        detail: "missing".into(),
                    })?;
                let file: FileDisk =
                    serde_json::from_slice(raw.value()).map_err(|e| corrupt(&what, &e))?;
                let bits = pieces
                    .as_ref()
                    .map(|t| t.get((key, index)))
                    .transpose()
                    .map_err(db_err)?
                    .flatten()
                    .map(|v| v.value().to_vec());
                let resume = resumes
                    .as_ref()
                    .map(|t| t.get((key, index)))
                    .transpose()
                    .map_err(db_err)?
                    .flatten()
                    .map(|v| {
                        serde_json::from_slice::<ResumeDisk>(v.value())
                            .map_err(|e| corrupt(&format!("{what} resume"), &e))
                    })
                    .transpose()?;
                let layer = layers
                    .as_ref()
                    .map(|t| t.get((key, index)))
                    .transpose()
                    .map_err(db_err)?
                    .flatten()
                    .map(|v| {
                        shoal_validator::chaining_values_from_bytes(v.value()).map_err(|e| {
                            PersistError::Corrupt {
                                what: format!("{what} layer"),
                                detail: e.to_string(),
                            }
                        })
                    })
                    .transpose()?;
                stored.push(StoredFile {
                    file,
                    pieces: bits,
                    resume,
                    layer,
                });
            }
            out.push(StoredJob {
                id,
                job,
                files: stored,
            });
        }
        Ok(out)
    }
}

/// Inserts one value in `def` within `tx`.
fn put(
    tx: &redb::WriteTransaction,
    def: TableDefinition<(u128, u32), &[u8]>,
    key: (u128, u32),
    value: &[u8],
) -> Result<(), PersistError> {
    tx.open_table(def)
        .map_err(db_err)?
        .insert(key, value)
        .map_err(db_err)?;
    Ok(())
}

fn corrupt(what: &str, e: &dyn std::fmt::Display) -> PersistError {
    PersistError::Corrupt {
        what: what.to_owned(),
        detail: e.to_string(),
    }
}

impl JobDisk {
    /// The stored form of a job's fields.
    pub(crate) fn of(info: &JobInfo) -> Self {
        Self {
            display_name: info.display_name.clone(),
            priority: format!("{:?}", info.priority),
            state: format!("{:?}", info.state),
            owner: info.owner,
            error: info.error.as_ref().map(|e| ErrorDisk {
                context: format!("{:?}", e.context),
                file: e.file.map(|f| u32::try_from(f).unwrap_or(u32::MAX)),
                description: e.description.clone(),
            }),
            pieces_rejected: info.peer_stats.pieces_rejected,
            peers_banned: info.peer_stats.peers_banned,
            created_ms: to_ms(info.created),
            modified_ms: to_ms(info.modified),
            transfer_completed_ms: info.transfer_completed.map(to_ms),
            retry_delay_s: info.properties.retry_delay.as_secs(),
            no_progress_timeout_s: info.properties.no_progress_timeout.as_secs(),
            notify_flags: info.properties.notify_flags,
            notify_cmdline: info.properties.notify_cmdline.clone(),
            file_count: u32::try_from(info.files.len()).unwrap_or(u32::MAX),
            max_download_time_s: Some(info.properties.max_download_time.as_secs()),
            http: HttpDisk::of(&info.properties.http),
            active_ms: u64::try_from(info.active_time.as_millis()).unwrap_or(u64::MAX),
            job_type: Some(format!("{:?}", info.job_type)),
            reply_file_name: info.reply_file_name.clone(),
            upload_session: info.upload_session.clone(),
            upload_acked: if info.job_type.is_upload() {
                info.files.first().map_or(0, |f| f.bytes_transferred)
            } else {
                0
            },
        }
    }

    /// The job's fields back, with `files`; errors name the field that does not parse.
    pub(crate) fn to_info(&self, id: JobId, files: Vec<FileInfo>) -> Result<JobInfo, PersistError> {
        let bad = |field: &str, value: &str| PersistError::Corrupt {
            what: format!("job {id}"),
            detail: format!("{field} {value:?}"),
        };
        Ok(JobInfo {
            id,
            display_name: self.display_name.clone(),
            priority: parse_priority(&self.priority)
                .ok_or_else(|| bad("priority", &self.priority))?,
            state: parse_state(&self.state).ok_or_else(|| bad("state", &self.state))?,
            owner: self.owner,
            files,
            error: match &self.error {
                None => None,
                Some(e) => Some(JobError {
                    context: parse_context(&e.context)
                        .ok_or_else(|| bad("error context", &e.context))?,
                    file: e.file.map(|f| f as usize),
                    description: e.description.clone(),
                }),
            },
            peer_stats: PeerStats {
                pieces_rejected: self.pieces_rejected,
                peers_banned: self.peers_banned,
            },
            created: from_ms(self.created_ms),
            modified: from_ms(self.modified_ms),
            transfer_completed: self.transfer_completed_ms.map(from_ms),
            active_time: Duration::from_millis(self.active_ms),
            job_type: match self.job_type.as_deref() {
                None | Some("Download") => JobType::Download,
                Some("Upload") => JobType::Upload,
                Some("UploadReply") => JobType::UploadReply,
                Some(other) => return Err(bad("job type", other)),
            },
            reply_file_name: self.reply_file_name.clone(),
            upload_session: self.upload_session.clone(),
            properties: JobProperties {
                retry_delay: Duration::from_secs(self.retry_delay_s),
                no_progress_timeout: Duration::from_secs(self.no_progress_timeout_s),
                notify_flags: self.notify_flags,
                notify_cmdline: self.notify_cmdline.clone(),
                max_download_time: self
                    .max_download_time_s
                    .map_or(DEFAULT_MAX_DOWNLOAD_TIME, Duration::from_secs),
                http: match &self.http {
                    None => HttpOptions::default(),
                    Some(h) => h
                        .to_options()
                        .ok_or_else(|| bad("HTTP options", &h.proxy_usage))?,
                },
            },
        })
    }
}

impl FileDisk {
    /// The stored form of a file, with the node-only flags.
    pub(crate) fn of(f: &FileInfo, origin_only: bool, completed: bool, local: LocalIds) -> Self {
        Self {
            url: f.url.to_string(),
            local_name: f.local_name.clone(),
            temp_name: f.temp_name.clone(),
            blake3: f.expected.blake3.map(hex::encode),
            sha256: f.expected.sha256.map(|d| d.to_string()),
            ranges: f.ranges.iter().map(|r| (r.offset, r.length)).collect(),
            content_id: f.content_id.map(|c| c.to_string()),
            computed_sha256: f.sha256.map(|d| d.to_string()),
            bytes_total: f.bytes_total,
            bytes_from_peers: f.bytes_from.peers(),
            bytes_from_origin: f.bytes_from.origin,
            bytes_from_lan_peers: f.bytes_from.lan_peers,
            bytes_from_group_peers: f.bytes_from.group_peers,
            bytes_from_cache: f.bytes_from.cache,
            transferred: f.transferred,
            validation: format!("{:?}", f.validation_state),
            origin_only,
            completed,
            local,
        }
    }

    /// The bytes by source. Records of versions that counted peers' bytes only as a whole
    /// (`bytes_from_peers`, without the kinds) count what no kind holds as LAN peers', the
    /// kind a peer is unless found otherwise.
    fn bytes_from(&self) -> BytesBySource {
        let mut b = BytesBySource {
            origin: self.bytes_from_origin,
            lan_peers: self.bytes_from_lan_peers,
            group_peers: self.bytes_from_group_peers,
            cache: self.bytes_from_cache,
        };
        b.lan_peers += self.bytes_from_peers.saturating_sub(b.peers());
        b
    }

    /// The file back (with no bytes transferred yet: the loader counts them from the bitmap).
    pub(crate) fn to_info(&self, what: &str) -> Result<FileInfo, PersistError> {
        let bad = |field: &str, value: &str| PersistError::Corrupt {
            what: what.to_owned(),
            detail: format!("{field} {value:?}"),
        };
        let hex32 = |field: &str, v: &Option<String>| -> Result<Option<[u8; 32]>, PersistError> {
            v.as_deref()
                .map(|s| shoal_protocol::parse_blake3_hex(s).map_err(|_| bad(field, s)))
                .transpose()
        };
        Ok(FileInfo {
            url: self.url.parse().map_err(|_| bad("url", &self.url))?,
            local_name: self.local_name.clone(),
            temp_name: self.temp_name.clone(),
            expected: Expected {
                blake3: hex32("blake3", &self.blake3)?,
                sha256: hex32("sha256", &self.sha256)?.map(Sha256Digest),
            },
            ranges: self
                .ranges
                .iter()
                .map(|&(offset, length)| ByteRange { offset, length })
                .collect(),
            content_id: self
                .content_id
                .as_deref()
                .map(|s| s.parse::<ContentId>().map_err(|_| bad("content id", s)))
                .transpose()?,
            sha256: hex32("computed sha256", &self.computed_sha256)?.map(Sha256Digest),
            bytes_total: self.bytes_total,
            bytes_transferred: 0,
            bytes_from: self.bytes_from(),
            transferred: self.transferred,
            validation_state: match self.validation.as_str() {
                "Unknown" => ValidationState::Unknown,
                "Valid" => ValidationState::Valid,
                "Invalid" => ValidationState::Invalid,
                other => return Err(bad("validation state", other)),
            },
        })
    }
}

fn parse_priority(s: &str) -> Option<Priority> {
    Some(match s {
        "Foreground" => Priority::Foreground,
        "High" => Priority::High,
        "Normal" => Priority::Normal,
        "Low" => Priority::Low,
        _ => return None,
    })
}

fn parse_state(s: &str) -> Option<State> {
    Some(match s {
        "Queued" => State::Queued,
        "Connecting" => State::Connecting,
        "Transferring" => State::Transferring,
        "Suspended" => State::Suspended,
        "Error" => State::Error,
        "TransientError" => State::TransientError,
        "Transferred" => State::Transferred,
        "Acknowledged" => State::Acknowledged,
        "Cancelled" => State::Cancelled,
        _ => return None,
    })
}

fn parse_context(s: &str) -> Option<ErrorContext> {
    Some(match s {
        "None" => ErrorContext::None,
        "RemoteFile" => ErrorContext::RemoteFile,
        "LocalFile" => ErrorContext::LocalFile,
        "Transport" => ErrorContext::Transport,
        "Validation" => ErrorContext::Validation,
        "Notification" => ErrorContext::Notification,
        "ServerCertificate" => ErrorContext::ServerCertificate,
        _ => return None,
    })
}

/// What an earlier run left in a file's temporary file, as the state store recorded it.
#[derive(Clone, Debug)]
pub(crate) struct ResumePoint {
    /// Pieces written and flushed; each is checked again before it is trusted.
    pub(crate) pieces: Bitfield,
    /// What the pieces are pieces of.
    pub(crate) meta: ResumeDisk,
    /// The layer they were verified against, itself checked against `meta.content_id`.
    pub(crate) layer: Option<PieceLayer>,
    /// Set when this process verified the pieces itself and kept the file open to nobody else
    /// (a download that stopped): the pieces need no second check, and `builder` holds their
    /// chaining values when the file has no layer.
    pub(crate) trusted: Option<Option<LayerBuilder>>,
}

impl ResumePoint {
    /// The resume point of stored rows, if they describe usable pieces: the bitmap's length
    /// matches the stored length, a stored layer verifies against the stored content id, and
    /// that content id carries the expected BLAKE3 (when one is expected).
    pub(crate) fn from_stored(
        pieces: Option<&[u8]>,
        meta: Option<&ResumeDisk>,
        layer: Option<&[shoal_validator::ChainingValue]>,
        expected: &Expected,
    ) -> Option<Self> {
        let meta = meta?;
        let geometry = ContentId::new([0; 32], meta.length).ok()?;
        let pieces = Bitfield::from_bytes(pieces?, geometry.piece_count())?;
        let layer = match &meta.content_id {
            None => None,
            Some(text) => {
                let id: ContentId = text.parse().ok()?;
                if id.length() != meta.length || expected.check_content_id(&id).is_err() {
                    return None;
                }
                Some(PieceLayer::verify(id, layer?.to_vec()).ok()?)
            }
        };
        Some(Self {
            pieces,
            meta: meta.clone(),
            layer,
            trusted: None,
        })
    }

    /// Bytes of the pieces it holds.
    pub(crate) fn bytes(&self) -> u64 {
        let Ok(geometry) = ContentId::new([0; 32], self.meta.length) else {
            return 0;
        };
        self.pieces
            .ones()
            .filter_map(|i| geometry.piece_range(i))
            .map(|r| r.end - r.start)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::FileInfo;

    fn info(files: usize) -> JobInfo {
        let now = from_ms(to_ms(std::time::SystemTime::now()));
        JobInfo {
            id: JobId::new(),
            display_name: "update".into(),
            priority: Priority::High,
            state: State::Transferring,
            owner: Some(1000),
            properties: JobProperties {
                notify_cmdline: Some(vec!["/bin/true".into(), "x y".into()]),
                max_download_time: Duration::from_secs(77),
                http: HttpOptions {
                    headers: vec![("X-A".into(), "1".into())],
                    credentials: Some(Credentials::Bearer { token: "t".into() }),
                    client_certificate: Some(ClientCertificate {
                        certificate: "/c.pem".into(),
                        key: "/k.pem".into(),
                    }),
                    ca_certificates: vec!["/ca.pem".into()],
                    proxy: ProxyUsage::Override {
                        proxies: vec!["http://u:p@proxy:3128".parse().unwrap()],
                        bypass: vec!["lan".into()],
                    },
                },
                ..JobProperties::default()
            },
            files: (0..files)
                .map(|i| FileInfo {
                    url: format!("http://127.0.0.1:1/f{i}").parse().unwrap(),
                    local_name: format!("/tmp/f{i}").into(),
                    temp_name: format!("/tmp/.f{i}.part").into(),
                    expected: Expected {
                        blake3: Some([i as u8; 32]),
                        sha256: None,
                    },
                    ranges: vec![ByteRange {
                        offset: 5,
                        length: None,
                    }],
                    content_id: None,
                    sha256: Some(Sha256Digest([7; 32])),
                    bytes_total: Some(100),
                    bytes_transferred: 0,
                    bytes_from: BytesBySource {
                        origin: 40,
                        lan_peers: 50,
                        group_peers: 10,
                        cache: 0,
                    },
                    transferred: i == 0,
                    validation_state: ValidationState::Valid,
                })
                .collect(),
            error: Some(JobError {
                context: ErrorContext::Transport,
                file: Some(1),
                description: "refused".into(),
            }),
            peer_stats: PeerStats {
                pieces_rejected: 3,
                peers_banned: 1,
            },
            created: now,
            modified: now,
            transfer_completed: None,
            active_time: Duration::from_millis(1500),
            job_type: JobType::Download,
            reply_file_name: None,
            upload_session: None,
        }
    }

    #[test]
    fn a_record_that_counted_peers_bytes_only_as_a_whole_counts_them_as_lan_peers() {
        let f = FileDisk::of(&info(1).files[0], false, false, LocalIds::default());
        let mut json = serde_json::to_value(&f).unwrap();
        let fields = json.as_object_mut().unwrap();
        assert_eq!(fields["bytes_from_peers"], 60);
        for kind in [
            "bytes_from_lan_peers",
            "bytes_from_group_peers",
            "bytes_from_cache",
        ] {
            fields.remove(kind).unwrap();
        }
        let old: FileDisk = serde_json::from_value(json).unwrap();
        assert_eq!(
            old.to_info("file").unwrap().bytes_from,
            BytesBySource {
                origin: 40,
                lan_peers: 60,
                group_peers: 0,
                cache: 0,
            }
        );
        // A record with the kinds reads back as it was written.
        assert_eq!(
            f.to_info("file").unwrap().bytes_from,
            info(1).files[0].bytes_from
        );
    }

    fn local_ids(i: usize) -> LocalIds {
        LocalIds {
            dir: Some((8, 100 + i as u64)),
            verified: Some(crate::store::fsuser::FileIdentity {
                dev: 8,
                ino: 200 + i as u64,
                len: 1234,
                ctime_ns: 1_700_000_000_123_456_789,
            }),
        }
    }

    fn put(store: &StateStore, info: &JobInfo) {
        let files: Vec<(u32, FileDisk)> = info
            .files
            .iter()
            .enumerate()
            .map(|(i, f)| (i as u32, FileDisk::of(f, i == 1, false, local_ids(i))))
            .collect();
        store.put_job(info.id, &JobDisk::of(info), &files).unwrap();
    }

    #[test]
    fn a_job_comes_back_as_it_was_stored() {
        let dir = tempfile::tempdir().unwrap();
        let job = info(2);
        {
            let store = StateStore::open(dir.path()).unwrap();
            put(&store, &job);
        }
        let store = StateStore::open(dir.path()).unwrap();
        let loaded = store.load().unwrap();
        assert_eq!(loaded.len(), 1);
        let s = &loaded[0];
        let files: Vec<FileInfo> = s
            .files
            .iter()
            .map(|f| f.file.to_info("f").unwrap())
            .collect();
        assert!(s.files[1].file.origin_only && !s.files[0].file.origin_only);
        assert_eq!(s.files[1].file.local, local_ids(1));
        assert_eq!(s.job.to_info(s.id, files).unwrap(), job);
    }

    #[test]
    fn checkpoints_give_a_resume_point_and_removal_forgets_everything() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path()).unwrap();
        let data = vec![5u8; 100_000];
        let layer = shoal_validator::hash_reader(&data[..], data.len() as u64)
            .unwrap()
            .layer;
        let mut job = info(1);
        job.files[0].expected.blake3 = Some(*layer.content_id().hash());
        put(&store, &job);
        let mut bits = Bitfield::new(layer.content_id().piece_count());
        bits.set(1);
        let meta = ResumeDisk {
            length: data.len() as u64,
            content_id: Some(layer.content_id().to_string()),
            claimed: false,
            validator: None,
            from_peers: true,
        };
        store
            .checkpoint(job.id, 0, &bits, &meta, Some(layer.chaining_values()))
            .unwrap();
        let r = store.resume_point(job.id, 0, &job.files[0]).unwrap();
        assert_eq!(r.pieces, bits);
        assert_eq!(r.layer.as_ref(), Some(&layer));
        assert_eq!(r.bytes(), layer.content_id().piece_size());

        // Another expected BLAKE3: the stored pieces are not pieces of this file.
        let mut other = job.files[0].clone();
        other.expected.blake3 = Some([9; 32]);
        assert!(store.resume_point(job.id, 0, &other).is_none());

        store.remove_job(job.id).unwrap();
        assert!(store.load().unwrap().is_empty());
        assert!(store.resume_point(job.id, 0, &job.files[0]).is_none());
        // A late checkpoint of a removed job does not bring it back.
        store.checkpoint(job.id, 0, &bits, &meta, None).unwrap();
        assert!(store.resume_point(job.id, 0, &job.files[0]).is_none());
    }

    #[test]
    fn a_state_directory_others_may_write_is_refused() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = StateStore::open(dir.path()).unwrap_err();
        assert!(e.to_string().contains("writable by group or others"), "{e}");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        assert!(StateStore::open(dir.path()).is_ok());
    }

    #[test]
    fn foreign_and_corrupt_state_is_reported() {
        // Not a redb file at all.
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(DB_FILE), b"hello, this is not a database").unwrap();
        let e = StateStore::open(dir.path()).unwrap_err();
        assert!(matches!(e, PersistError::Open { .. }), "{e}");

        // A redb database of another program.
        let dir = tempfile::tempdir().unwrap();
        {
            let db = Database::create(dir.path().join(DB_FILE)).unwrap();
            let tx = db.begin_write().unwrap();
            tx.open_table(META)
                .unwrap()
                .insert("format", b"other".as_slice())
                .unwrap();
            tx.commit().unwrap();
        }
        let e = StateStore::open(dir.path()).unwrap_err();
        assert!(matches!(e, PersistError::Foreign { .. }), "{e}");
        assert!(e.to_string().contains("other"), "{e}");

        // A job record that does not decode is named.
        let dir = tempfile::tempdir().unwrap();
        let id = JobId::new();
        {
            let store = StateStore::open(dir.path()).unwrap();
            let tx = store.db.begin_write().unwrap();
            tx.open_table(JOBS)
                .unwrap()
                .insert(id.0.as_u128(), b"{not json".as_slice())
                .unwrap();
            tx.commit().unwrap();
        }
        let e = StateStore::open(dir.path()).unwrap().load().unwrap_err();
        assert!(e.to_string().contains(&id.to_string()), "{e}");
    }
}
