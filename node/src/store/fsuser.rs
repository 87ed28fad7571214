//! File work on behalf of a job's owner, and the identity of the files the node verified.
//!
//! A daemon running as root creates, opens, renames and deletes the files of a user's job with
//! that user's file-system identity (Linux `setfsuid`/`setfsgid`, per thread), as BITS
//! impersonates the job's owner: the kernel then checks every path as the user would see it,
//! so a symlink or a directory swapped in by the user cannot make the daemon read or write where
//! the user may not, and new files belong to the user. For the work the thread also has the
//! user's own supplementary groups instead of the daemon's (set per thread with the raw system
//! call, not glibc's process-wide `setgroups`), so the daemon's groups lend the user nothing
//! and the user's groups count as they would for the user. The switch fails closed: a
//! daemon that cannot take the user's identity (no `CAP_SETUID`/`CAP_SETGID`, as in a
//! container that dropped them) does no work at all rather than doing it as root, and the
//! previous identity is restored even when the work panics. Without root, or for jobs of root
//! or of the library, the work runs as is.
//!
//! A file the node verified is known afterwards by its [`FileIdentity`] (device, inode,
//! length): the node reads such a file again only through [`open_regular`], as its owner,
//! never through a symlink, never blocking on a FIFO, and only when it is still that file.

use std::{fs::File, io, os::unix::fs::MetadataExt, path::Path};

use serde::{Deserialize, Serialize};

/// The identity of a file: what `fstat` says of it, enough to tell that a path still names
/// the file the node verified ([`FileIdentity::same_file`]: device, inode and length), and
/// whether anything changed it since ([`FileIdentity::unchanged`]: also the status change
/// time, which every write, truncation, `chmod` or new link moves and no user can set back).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct FileIdentity {
    /// `st_dev`.
    pub(crate) dev: u64,
    /// `st_ino`.
    pub(crate) ino: u64,
    /// The length in bytes.
    pub(crate) len: u64,
    /// `st_ctime` in nanoseconds since the Unix epoch.
    #[serde(default)]
    pub(crate) ctime_ns: i128,
}

impl FileIdentity {
    /// The identity of an open file.
    ///
    /// # Errors
    /// What `fstat` returns.
    pub(crate) fn of(file: &File) -> io::Result<Self> {
        let m = file.metadata()?;
        Ok(Self::from_metadata(&m))
    }

    fn from_metadata(m: &std::fs::Metadata) -> Self {
        Self {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            ctime_ns: i128::from(m.ctime()) * 1_000_000_000 + i128::from(m.ctime_nsec()),
        }
    }

    /// Whether `other` is the same file (device and inode) with the same length.
    pub(crate) fn same_file(&self, other: &Self) -> bool {
        (self.dev, self.ino, self.len) == (other.dev, other.ino, other.len)
    }

    /// Whether `other` is the same file, not changed since `self` was taken. A file recreated
    /// with a reused inode number has a later status change time.
    pub(crate) fn unchanged(&self, other: &Self) -> bool {
        self == other
    }
}

/// Opens `path` for reading, as it is now: never through a symlink in its last component
/// (`O_NOFOLLOW`), never waiting for a writer (`O_NONBLOCK`, so a FIFO cannot block the
/// caller), and only a regular file. With `expect`, only the file of that identity.
/// Call it inside [`as_owner`] for a user's path.
///
/// # Errors
/// What `open` returns (`ELOOP` for a symlink); `InvalidData` for anything but a regular file
/// or a file of another identity.
pub(crate) fn open_regular(path: &Path, expect: Option<FileIdentity>) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)?;
    let m = file.metadata()?;
    if !m.file_type().is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{} is not a regular file", path.display()),
        ));
    }
    if let Some(want) = expect
        && !FileIdentity::from_metadata(&m).same_file(&want)
    {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{} is no longer the file that was verified", path.display()),
        ));
    }
    Ok(file)
}

/// Whether nobody but this process's effective user (and root) can change the bytes of `file`:
/// that user owns it and neither its group nor others have write permission (a POSIX ACL that
/// lets others write shows in the group bits, which are then the ACL's mask). `false` when
/// `fstat` fails. Read again at each use: a `chmod` must bring back the checks it spares. See
/// `docs/decisions/0020-serve-time-check-for-shared-files.md`.
pub(crate) fn only_ours(file: &File) -> bool {
    let Ok(m) = file.metadata() else {
        return false;
    };
    // SAFETY: `geteuid` has no preconditions.
    m.uid() == unsafe { libc::geteuid() } && m.mode() & 0o022 == 0
}

/// What the node knows of a file's place on disk, kept with the job in the state database.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct LocalIds {
    /// The local name's directory when the file was added, as `(st_dev, st_ino)`: Complete
    /// renames only within that directory.
    #[serde(default)]
    pub(crate) dir: Option<(u64, u64)>,
    /// The temporary file that verified (after Complete: the final file).
    #[serde(default)]
    pub(crate) verified: Option<FileIdentity>,
}

/// The directory a local name is in (`.` for a bare name).
fn parent_of(local: &Path) -> &Path {
    match local.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Opens the directory of `local` as it is now (`O_PATH` when it may not be read), never
/// blocking; call it inside [`as_owner`].
fn open_dir(local: &Path) -> io::Result<(rustix::fd::OwnedFd, bool)> {
    use rustix::fs::{Mode, OFlags};
    let dir = parent_of(local);
    match rustix::fs::open(
        dir,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC | OFlags::NONBLOCK,
        Mode::empty(),
    ) {
        Ok(fd) => Ok((fd, true)),
        Err(rustix::io::Errno::ACCESS) => Ok((
            rustix::fs::open(
                dir,
                OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
            )?,
            false,
        )),
        Err(e) => Err(e.into()),
    }
}

/// The identity `(st_dev, st_ino)` of the directory `local` is in, as its owner sees it
/// (call it inside [`as_owner`]): recorded when a file is added.
///
/// # Errors
/// What `open` returns: the directory does not exist or the owner may not use it.
pub(crate) fn dir_identity(local: &Path) -> io::Result<(u64, u64)> {
    let (fd, _) = open_dir(local)?;
    let st = rustix::fs::fstat(&fd)?;
    Ok((st.st_dev, st.st_ino))
}

/// Checks, as the caller of [`as_owner`] is now, that files may be created in the directory of
/// `local` (write and search permission, with ACLs, by the file-system ids).
///
/// # Errors
/// `PermissionDenied` naming the directory.
pub(crate) fn may_create_in(local: &Path) -> io::Result<()> {
    use rustix::fs::{Access, AtFlags};
    let dir = parent_of(local);
    rustix::fs::accessat(
        rustix::fs::CWD,
        dir,
        Access::WRITE_OK | Access::EXEC_OK,
        AtFlags::EACCESS,
    )
    .map_err(|e| {
        io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("may not create files in {}: {e}", dir.display()),
        )
    })
}

/// Why Complete could not rename a file.
#[derive(Debug)]
pub(crate) enum RenameError {
    /// The file system refused (the caller may try again).
    Io(io::Error),
    /// What is at the temporary name, or its directory, is not what verified: the file must
    /// be downloaded again.
    NotVerified(String),
}

impl From<io::Error> for RenameError {
    fn from(e: io::Error) -> Self {
        Self::Io(e)
    }
}

impl From<rustix::io::Errno> for RenameError {
    fn from(e: rustix::io::Errno) -> Self {
        Self::Io(e.into())
    }
}

/// Renames the verified temporary file `temp` to `local` (they share a directory), as BITS
/// `Complete` does, and returns the final file's identity. Call it inside [`as_owner`].
///
/// The rename goes through a descriptor of the directory, which must be the one recorded
/// when the file was added (`ids.dir`), and only a regular file that is the file that
/// verified (`ids.verified`: device, inode and length) is renamed. When it is that file but
/// something changed it since (its status change time moved), or when nothing was recorded,
/// `recheck` hashes it and must say it is still the content. The name is checked again after
/// the rename; a file swapped in meanwhile is renamed back and refused. The file is flushed
/// before and the directory after the rename.
///
/// # Errors
/// [`RenameError::NotVerified`] naming what was wrong; [`RenameError::Io`] when the file
/// system refused.
pub(crate) fn rename_verified(
    temp: &Path,
    local: &Path,
    ids: &LocalIds,
    recheck: impl FnOnce(&File) -> io::Result<bool>,
) -> Result<FileIdentity, RenameError> {
    use rustix::fs::{AtFlags, Mode, OFlags};
    let (Some(temp_base), Some(local_base)) = (temp.file_name(), local.file_name()) else {
        return Err(RenameError::NotVerified(format!(
            "{} has no file name",
            local.display()
        )));
    };
    let (dir, readable) = open_dir(local)?;
    let st = rustix::fs::fstat(&dir)?;
    if ids.dir.is_some_and(|d| d != (st.st_dev, st.st_ino)) {
        return Err(RenameError::NotVerified(format!(
            "the directory {} was replaced since the file was added",
            parent_of(local).display()
        )));
    }
    let fd = match rustix::fs::openat(
        &dir,
        temp_base,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
        Mode::empty(),
    ) {
        Ok(fd) => fd,
        Err(rustix::io::Errno::LOOP) => {
            return Err(RenameError::NotVerified(format!(
                "{} was replaced by a symlink",
                temp.display()
            )));
        }
        Err(e) => return Err(e.into()),
    };
    let file = File::from(fd);
    let now = FileIdentity::of(&file)?;
    let regular = file.metadata()?.file_type().is_file();
    let good = regular
        && match &ids.verified {
            Some(v) if v.unchanged(&now) => true,
            Some(v) if v.same_file(&now) => recheck(&file)?,
            Some(_) => false,
            None => recheck(&file)?,
        };
    if !good {
        return Err(RenameError::NotVerified(format!(
            "{} is no longer the file that verified (replaced or changed since)",
            temp.display()
        )));
    }
    file.sync_all()?;
    rustix::fs::renameat(&dir, temp_base, &dir, local_base)?;
    let after = rustix::fs::statat(&dir, local_base, AtFlags::SYMLINK_NOFOLLOW)?;
    if (after.st_dev, after.st_ino) != (now.dev, now.ino) {
        // Another file was put at the temporary name between the check and the rename.
        let _ = rustix::fs::renameat(&dir, local_base, &dir, temp_base);
        return Err(RenameError::NotVerified(format!(
            "{} was swapped for another file during Complete",
            temp.display()
        )));
    }
    if readable {
        let _ = rustix::fs::fsync(&dir);
    }
    Ok(FileIdentity::of(&file)?)
}

/// The mode of the files jobs create: 0644 less the owner's umask. For the library (no
/// owner) that is this process's umask; for a daemon's user, whose umask the daemon cannot
/// see, the usual 022, so a daemon run with `UMask=0007` never makes files group-writable.
pub(crate) fn file_mode(owner: Option<u32>) -> u32 {
    static UMASK: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    let umask = if owner.is_some() {
        0o022
    } else {
        *UMASK.get_or_init(|| {
            std::fs::read_to_string("/proc/self/status")
                .ok()
                .and_then(|s| {
                    s.lines()
                        .find_map(|l| l.strip_prefix("Umask:"))
                        .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
                })
                .unwrap_or(0o022)
        })
    };
    0o644 & !umask
}

/// Checks a directory the node keeps its own state in (the state database, the cache): one
/// others may write is refused (they could replace its files); one others may read or search
/// is used with a warning (the identity key and every user's cached content are in it).
///
/// # Errors
/// What `stat` returns; `PermissionDenied` for a directory writable by group or others.
pub(crate) fn check_private_dir(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(dir)?.permissions().mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{} is writable by group or others (mode {mode:o}); make it 0700",
                dir.display()
            ),
        ));
    }
    if mode & 0o055 != 0 {
        tracing::warn!(
            dir = %dir.display(),
            "the directory is readable by group or others (mode {mode:o}); 0700 is advised"
        );
    }
    Ok(())
}

/// Whether this process runs as root (and so must act as the owners of jobs).
fn is_root() -> bool {
    // SAFETY: `geteuid` has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// The file-system ids and supplementary groups a thread had before it took a user's;
/// restored on drop, so also when the work panics.
struct Impersonation {
    uid: u32,
    gid: u32,
    groups: Vec<libc::gid_t>,
}

/// The value `setfsuid`/`setfsgid` take to change nothing and report the current id.
const QUERY_ID: u32 = u32::MAX;

/// `setgroups` for this thread only: the raw system call (glibc's wrapper changes every
/// thread of the process).
fn set_thread_groups(groups: &[libc::gid_t]) -> io::Result<()> {
    // SAFETY: the pointer and length describe `groups`, which outlives the call; the kernel
    // only reads from it.
    let rc = unsafe { libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// This thread's supplementary groups.
fn thread_groups() -> io::Result<Vec<libc::gid_t>> {
    // SAFETY: with size 0, getgroups writes nothing and returns the count.
    let n = unsafe { libc::getgroups(0, std::ptr::null_mut()) };
    let n = usize::try_from(n).map_err(|_| io::Error::last_os_error())?;
    let mut groups = vec![0; n];
    // SAFETY: `groups` has room for `n` ids.
    let got = unsafe { libc::getgroups(n as libc::c_int, groups.as_mut_ptr()) };
    let got = usize::try_from(got).map_err(|_| io::Error::last_os_error())?;
    groups.truncate(got);
    Ok(groups)
}

impl Impersonation {
    /// Takes the file-system identity of `uid`:`gid` with the supplementary groups `groups`
    /// (the user's own) for this thread, and checks that it took effect.
    fn begin(uid: u32, gid: u32, groups_of_user: &[libc::gid_t]) -> io::Result<Self> {
        let groups = thread_groups()?;
        // SAFETY: setfsgid/setfsuid change only this thread's file-system ids (and with
        // QUERY_ID nothing); they have no memory preconditions.
        let (old_gid, old_uid) = unsafe { (libc::setfsgid(gid), libc::setfsuid(uid)) };
        let guard = Self {
            uid: u32::try_from(old_uid).unwrap_or(0),
            gid: u32::try_from(old_gid).unwrap_or(0),
            groups,
        };
        // SAFETY: as above.
        let (now_gid, now_uid) = unsafe { (libc::setfsgid(QUERY_ID), libc::setfsuid(QUERY_ID)) };
        if u32::try_from(now_uid).ok() != Some(uid) || u32::try_from(now_gid).ok() != Some(gid) {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "cannot act as user {uid} (group {gid}): the daemon lacks CAP_SETUID or \
                     CAP_SETGID, so it does nothing rather than act as root"
                ),
            ));
        }
        set_thread_groups(groups_of_user).map_err(|e| {
            io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("cannot take the supplementary groups of user {uid}: {e}"),
            )
        })?;
        Ok(guard)
    }
}

impl Drop for Impersonation {
    fn drop(&mut self) {
        // Groups first: setgroups needs CAP_SETGID, which the fsuid does not affect.
        let _ = set_thread_groups(&self.groups);
        // SAFETY: as in `begin`.
        unsafe {
            libc::setfsuid(self.uid);
            libc::setfsgid(self.gid);
        }
    }
}

/// Runs `work` with the file-system identity of `owner` (the owner's primary group and the
/// owner's supplementary groups, none of the daemon's) when this process runs as root and
/// `owner` is another user; as is otherwise. The previous identity is restored after `work`,
/// also when it panics.
///
/// # Errors
/// What `work` returns; `PermissionDenied` when `owner` has no password entry or the identity
/// could not be taken (then `work` did not run).
pub(crate) fn as_owner<T>(
    owner: Option<u32>,
    work: impl FnOnce() -> io::Result<T>,
) -> io::Result<T> {
    let Some(uid) = owner.filter(|&u| u != 0 && is_root()) else {
        return work();
    };
    let (gid, groups) = user_groups(uid).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("user {uid} has no password entry"),
        )
    })?;
    let _guard = Impersonation::begin(uid, gid, &groups)?;
    work()
}

/// How long a user's groups are taken from the group database before it is read again.
const GROUPS_TTL: std::time::Duration = std::time::Duration::from_secs(60);

/// The primary group and every group of `uid` (as `initgroups` would set), from the password
/// and group databases, kept for [`GROUPS_TTL`]; `None` without a password entry.
fn user_groups(uid: u32) -> Option<(u32, Vec<libc::gid_t>)> {
    type Cached = std::collections::HashMap<u32, (std::time::Instant, u32, Vec<libc::gid_t>)>;
    static CACHE: std::sync::Mutex<Option<Cached>> = std::sync::Mutex::new(None);
    let now = std::time::Instant::now();
    {
        let cache = CACHE.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((at, gid, groups)) = cache.as_ref().and_then(|c| c.get(&uid))
            && now.duration_since(*at) < GROUPS_TTL
        {
            return Some((*gid, groups.clone()));
        }
    }
    let user = passwd(uid)?;
    let groups = group_list(&user.name, user.gid);
    let mut cache = CACHE.lock().unwrap_or_else(|e| e.into_inner());
    let c = cache.get_or_insert_with(Default::default);
    if c.len() > 4096 {
        c.clear();
    }
    c.insert(uid, (now, user.gid, groups.clone()));
    Some((user.gid, groups))
}

/// Checks, as root, that this process can act as other users (`nobody`, uid 65534, when it
/// has a password entry): the daemon refuses to start when it cannot.
///
/// # Errors
/// `PermissionDenied` naming the missing capability.
pub(crate) fn check_impersonation() -> io::Result<()> {
    const NOBODY: u32 = 65_534;
    if !is_root() || primary_gid(NOBODY).is_none() {
        return Ok(());
    }
    // A thread of its own, so a failure cannot leave anything behind on a runtime worker.
    std::thread::spawn(|| as_owner(Some(NOBODY), || Ok(())))
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("the impersonation check panicked")))
}

/// A user's entry in the password database.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Passwd {
    /// The login name.
    pub(crate) name: String,
    /// The primary group.
    pub(crate) gid: u32,
    /// The home directory.
    pub(crate) home: std::path::PathBuf,
    /// The login shell.
    pub(crate) shell: String,
}

/// The password database entry of `uid`.
pub(crate) fn passwd(uid: u32) -> Option<Passwd> {
    lookup_passwd(|pwd, buf, out| {
        // SAFETY: the pointers are valid for the call and `buf` is as long as given.
        unsafe { libc::getpwuid_r(uid, pwd, buf.as_mut_ptr().cast(), buf.len(), out) }
    })
    .map(|(_, p)| p)
}

/// The uid and password database entry of the user named `name`.
pub(crate) fn passwd_by_name(name: &str) -> Option<(u32, Passwd)> {
    let name = std::ffi::CString::new(name).ok()?;
    lookup_passwd(|pwd, buf, out| {
        // SAFETY: the pointers are valid for the call and `buf` is as long as given.
        unsafe { libc::getpwnam_r(name.as_ptr(), pwd, buf.as_mut_ptr().cast(), buf.len(), out) }
    })
}

/// Runs one `getpw*_r` call (`call(pwd, buf, out)`) and copies the entry out of its buffer.
fn lookup_passwd(
    call: impl FnOnce(*mut libc::passwd, &mut [u8], *mut *mut libc::passwd) -> libc::c_int,
) -> Option<(u32, Passwd)> {
    use std::ffi::CStr;
    let mut buf = vec![0u8; 16 * 1024];
    // SAFETY: a zeroed `passwd` is a valid out-parameter.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut out: *mut libc::passwd = std::ptr::null_mut();
    if call(&raw mut pwd, &mut buf, &raw mut out) != 0 || out.is_null() {
        return None;
    }
    let text = |p: *const libc::c_char| {
        if p.is_null() {
            String::new()
        } else {
            // SAFETY: a non-null string of the entry points into `buf`, still alive here.
            unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
        }
    };
    Some((
        pwd.pw_uid,
        Passwd {
            name: text(pwd.pw_name),
            gid: pwd.pw_gid,
            home: text(pwd.pw_dir).into(),
            shell: text(pwd.pw_shell),
        },
    ))
}

/// The id of the group named `name`, from the group database.
pub(crate) fn group_id(name: &str) -> Option<u32> {
    let name = std::ffi::CString::new(name).ok()?;
    let mut buf = vec![0u8; 16 * 1024];
    // SAFETY: a zeroed `group` is a valid out-parameter; the pointers are valid for the call,
    // `buf` is as long as given, and only the id (no pointer into `buf`) is read after.
    unsafe {
        let mut grp: libc::group = std::mem::zeroed();
        let mut out: *mut libc::group = std::ptr::null_mut();
        let rc = libc::getgrnam_r(
            name.as_ptr(),
            &raw mut grp,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &raw mut out,
        );
        (rc == 0 && !out.is_null()).then_some(grp.gr_gid)
    }
}

/// The primary group of `uid`, from the password database.
pub(crate) fn primary_gid(uid: u32) -> Option<u32> {
    passwd(uid).map(|p| p.gid)
}

/// Every group `user` (with primary group `gid`) is a member of, as `initgroups` would set.
pub(crate) fn group_list(user: &str, gid: u32) -> Vec<u32> {
    let Ok(name) = std::ffi::CString::new(user) else {
        return vec![gid];
    };
    let mut n: libc::c_int = 64;
    loop {
        let mut groups = vec![0 as libc::gid_t; n as usize];
        let mut count = n;
        // SAFETY: `groups` has room for `count` ids; `name` is a valid C string.
        let rc =
            unsafe { libc::getgrouplist(name.as_ptr(), gid, groups.as_mut_ptr(), &raw mut count) };
        if rc >= 0 {
            groups.truncate(count.max(0) as usize);
            return groups;
        }
        if count <= n || count > 65_536 {
            return vec![gid];
        }
        n = count;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Drops capabilities `caps` (bit numbers) from this thread's effective and permitted
    /// sets.
    fn drop_caps(caps: &[u32]) {
        #[repr(C)]
        struct Header {
            version: u32,
            pid: i32,
        }
        #[repr(C)]
        #[derive(Clone, Copy, Default)]
        struct Data {
            effective: u32,
            permitted: u32,
            inheritable: u32,
        }
        const VERSION_3: u32 = 0x2008_0522;
        let mut h = Header {
            version: VERSION_3,
            pid: 0,
        };
        let mut d = [Data::default(); 2];
        // SAFETY: header and data are the kernel's layout for version 3 and outlive the calls.
        unsafe {
            assert_eq!(
                libc::syscall(libc::SYS_capget, &raw mut h, d.as_mut_ptr()),
                0
            );
            for &c in caps {
                let (word, bit) = ((c / 32) as usize, 1u32 << (c % 32));
                d[word].effective &= !bit;
                d[word].permitted &= !bit;
            }
            assert_eq!(libc::syscall(libc::SYS_capset, &raw mut h, d.as_ptr()), 0);
        }
    }

    fn require_root() {
        assert!(
            is_root(),
            "this test checks the daemon's impersonation and must run as root (CI does)"
        );
    }

    #[test]
    fn without_cap_setuid_the_work_does_not_run_as_root() {
        require_root();
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("x");
        let t = target.clone();
        let result = std::thread::spawn(move || {
            // CAP_SETGID is 6, CAP_SETUID 7.
            drop_caps(&[6, 7]);
            as_owner(Some(65_534), || std::fs::File::create(&t))
        })
        .join()
        .unwrap();
        let err = result.expect_err("the work must not run as root");
        assert_eq!(err.kind(), io::ErrorKind::PermissionDenied, "{err}");
        assert!(!target.exists());
    }

    #[test]
    fn the_work_runs_as_the_owner_with_the_owners_groups_and_a_panic_restores_root() {
        require_root();
        std::thread::spawn(|| {
            set_thread_groups(&[4, 27]).unwrap();
            let inside = as_owner(Some(65_534), || {
                // SAFETY: queries only.
                let ids = unsafe { (libc::setfsuid(QUERY_ID), libc::setfsgid(QUERY_ID)) };
                Ok((ids, thread_groups()?))
            })
            .unwrap();
            assert_eq!(inside.0, (65_534, 65_534));
            // nobody's groups, none of the thread's own.
            let nobody = user_groups(65_534).unwrap().1;
            assert_eq!(inside.1, nobody);
            assert!(
                !inside.1.contains(&4) && !inside.1.contains(&27),
                "{:?}",
                inside.1
            );
            // Back to root with the groups it had.
            assert_eq!(thread_groups().unwrap(), vec![4, 27]);
            let panicked = std::panic::catch_unwind(|| {
                as_owner(Some(65_534), || -> io::Result<()> { panic!("work failed") })
            });
            assert!(panicked.is_err());
            // SAFETY: queries only.
            let ids = unsafe { (libc::setfsuid(QUERY_ID), libc::setfsgid(QUERY_ID)) };
            assert_eq!(ids, (0, 0));
            assert_eq!(thread_groups().unwrap(), vec![4, 27]);
        })
        .join()
        .unwrap();
    }

    #[test]
    fn open_regular_refuses_symlinks_fifos_and_other_files() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, b"verified").unwrap();
        let id = FileIdentity::of(&File::open(&file).unwrap()).unwrap();
        assert!(open_regular(&file, Some(id)).is_ok());
        let link = dir.path().join("l");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        assert!(open_regular(&link, None).is_err());
        let fifo = dir.path().join("p");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid C string.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        // Returns at once (no writer needed) and refuses it.
        assert!(open_regular(&fifo, None).is_err());
        // Another file at the same path (the first kept open, so its inode is not reused).
        let _old = File::open(&file).unwrap();
        let other = dir.path().join("g");
        std::fs::write(&other, b"verified").unwrap();
        std::fs::rename(&other, &file).unwrap();
        let e = open_regular(&file, Some(id)).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    }
}
