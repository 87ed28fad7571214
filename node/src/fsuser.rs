//! File work on behalf of a job's owner.
//!
//! A daemon running as root creates, opens, renames and deletes the files of a user's job with
//! that user's file-system identity (Linux `setfsuid`/`setfsgid`, per thread), as BITS
//! impersonates the job's owner: the kernel then checks every path as the user would see it,
//! so a symlink or a directory swapped in by the user cannot make the daemon write where the
//! user may not, and new files belong to the user. The daemon's supplementary groups stay as
//! they are. Without root, or for jobs of root or of the library, the work runs as is.

use std::io;

/// Runs `work` with the file-system identity of `owner` (and the owner's primary group) when
/// this process runs as root and `owner` is another user; as is otherwise.
///
/// # Errors
/// What `work` returns; `PermissionDenied` when `owner` has no password entry.
pub(crate) fn as_owner<T>(
    owner: Option<u32>,
    work: impl FnOnce() -> io::Result<T>,
) -> io::Result<T> {
    // SAFETY: `geteuid` has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let Some(uid) = owner.filter(|&u| root && u != 0) else {
        return work();
    };
    let gid = crate::daemon::primary_gid(uid).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("user {uid} has no password entry"),
        )
    })?;
    // SAFETY: setfsgid/setfsuid change only this thread's file-system ids; the previous ids
    // they return are restored before returning, whatever `work` did.
    let (old_gid, old_uid) = unsafe { (libc::setfsgid(gid), libc::setfsuid(uid)) };
    let result = work();
    // SAFETY: as above.
    unsafe {
        libc::setfsuid(u32::try_from(old_uid).unwrap_or(0));
        libc::setfsgid(u32::try_from(old_gid).unwrap_or(0));
    }
    result
}
