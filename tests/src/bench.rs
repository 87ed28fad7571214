//! Helpers shared by the benchmark binaries (`tests/src/bin/`): a payload, child processes
//! killed by pid when dropped, nginx as the origin, medians.

use std::{
    io::Write,
    path::{Path, PathBuf},
    process::{Child, Command},
};

/// Kills the child by its pid, and waits for it, when dropped.
pub struct Guard(pub Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Writes `size` bytes of xorshift noise (incompressible, the same for every run) to `path`.
///
/// # Errors
/// The file cannot be created or written.
pub fn write_payload(path: &Path, size: u64) -> std::io::Result<()> {
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut state: u64 = 0x2545_f491_4f6c_dd1d;
    let mut buf = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        for chunk in buf.chunks_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            chunk.copy_from_slice(&state.to_le_bytes()[..chunk.len()]);
        }
        let n = usize::try_from(left.min(buf.len() as u64)).unwrap_or(buf.len());
        out.write_all(&buf[..n])?;
        left -= n as u64;
    }
    out.flush()
}

/// The median of `v` (the mean of the two middle values for an even count); `NaN` when empty.
pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The value after `key` in the output of `shoal hash FILE` (`blake3`, `sha256`, ...).
///
/// # Errors
/// `shoal` cannot run, or printed no such line.
pub fn digest_line(shoal: &Path, file: &Path, key: &str) -> Result<String, String> {
    let out = Command::new(shoal)
        .arg("hash")
        .arg(file)
        .output()
        .map_err(|e| format!("shoal hash: {e}"))?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix(key).map(|v| v.trim().to_owned()))
        .ok_or_else(|| format!("no {key} in shoal hash output"))
}

/// A fresh directory under `dir`, named after this process.
///
/// # Errors
/// It cannot be created.
pub fn tempdir_in(dir: &Path) -> Result<PathBuf, String> {
    let p = dir.join(format!("shoal-bench-{}", std::process::id()));
    std::fs::create_dir_all(&p).map_err(|e| format!("{}: {e}", p.display()))?;
    Ok(p)
}

/// Parses a comma-separated list for `flag`; an error names the item that does not parse.
///
/// # Errors
/// An item is not a `T`.
pub fn list<T: std::str::FromStr>(flag: &str, v: &str) -> Result<Vec<T>, String> {
    v.split(',')
        .map(|x| {
            x.trim()
                .parse()
                .map_err(|_| format!("{flag}: {x:?} is not valid"))
        })
        .collect()
}

/// Starts nginx with the configuration `conf` and prefix `work`, through `cmd` (`nginx`, or
/// `ip netns exec NS nginx`); killed when the guard drops. Waits 300 ms for it to listen.
///
/// # Errors
/// nginx cannot be started.
pub fn start_nginx(mut cmd: Command, conf: &Path, work: &Path) -> Result<Guard, String> {
    let child = cmd
        .arg("-c")
        .arg(conf)
        .arg("-p")
        .arg(work)
        .spawn()
        .map_err(|e| format!("cannot start nginx: {e}"))?;
    std::thread::sleep(std::time::Duration::from_millis(300));
    Ok(Guard(child))
}

/// Writes an nginx configuration to `work/nginx.conf` that serves `root` on `listen`
/// (`IP:PORT`) with sendfile, in the foreground, one worker, no access log, every temporary
/// path under `work`; returns its path. Start it with `nginx -c CONF -p WORK`.
///
/// # Errors
/// The file cannot be written.
pub fn nginx_conf(work: &Path, root: &Path, listen: &str) -> Result<PathBuf, String> {
    let conf = work.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "daemon off; master_process off; worker_processes 1; pid {w}/nginx.pid; error_log {w}/error.log;\n\
             events {{ worker_connections 256; }}\n\
             http {{ access_log off; sendfile on; client_body_temp_path {w}; proxy_temp_path {w};\n\
             fastcgi_temp_path {w}; uwsgi_temp_path {w}; scgi_temp_path {w};\n\
             server {{ listen {listen}; root {r}; }} }}\n",
            w = work.display(),
            r = root.display()
        ),
    )
    .map_err(|e| e.to_string())?;
    Ok(conf)
}

/// The libtorrent helper script (`tests/bench/libtorrent_node.py`), beside this crate's sources.
pub fn lt_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/libtorrent_node.py")
}

/// Writes a v1 torrent of `payload` to `torrent` with pieces of `piece` bytes and `url` as its
/// web seed (`"-"` for none), through [`lt_script`] (Debian's python3-libtorrent).
///
/// # Errors
/// The script cannot run or fails; the error carries its stderr.
pub fn make_torrent(torrent: &Path, payload: &Path, url: &str, piece: u64) -> Result<(), String> {
    let out = Command::new("/usr/bin/python3")
        .arg(lt_script())
        .arg("make")
        .arg(torrent)
        .arg(payload)
        .arg(url)
        .arg(piece.to_string())
        .output()
        .map_err(|e| format!("libtorrent_node.py make: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "libtorrent_node.py make: {}",
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}
