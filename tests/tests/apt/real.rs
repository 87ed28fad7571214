//! The real apt, through the method, in network namespaces this test creates: a signed
//! repository of real `.deb`s (`dpkg-deb`, `apt-ftparchive`, a throwaway GnuPG key), served
//! by nginx on an origin host behind a `tbf`-shaped link, and two machines on one bridged LAN,
//! each with its own Shoal daemon (default `lan` mode: mDNS on, inside the namespaces only)
//! and its own apt tree (`Dir::Etc`, `Dir::State`, `Dir::Cache`, `Dir::Bin::Methods` under
//! the test's directory, so the host's apt is untouched).

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use shoal_tests::{
    bench::{Guard, nginx_conf, start_nginx},
    netns::{self, Lan},
    node_bin,
};

/// The port nginx serves the repository on, on the origin host.
const REPO_PORT: u16 = 8080;
/// The fixed port every daemon listens on, as a fleet runs (Delivery Optimization's 7680).
const FLEET_PORT: u16 = 7680;
/// The packages, and the size of each one's payload in bytes.
const PACKAGES: [&str; 3] = ["shoal-test-a", "shoal-test-b", "shoal-test-c"];
/// One more package in the repository, whose bytes a test changes on the origin.
const CORRUPTED: &str = "shoal-test-d";
const PAYLOAD_BYTES: usize = 3 << 20;

/// True, with a loud message, where this test cannot run: not root, no network namespaces,
/// or a missing tool (CI installs them all).
fn skipped(test: &str) -> bool {
    let missing: Vec<&str> = ["apt-get", "apt-ftparchive", "dpkg-deb", "gpg", "nginx"]
        .into_iter()
        .filter(|t| {
            Command::new("sh")
                .args(["-c", &format!("command -v {t}")])
                .output()
                .map_or(true, |o| !o.status.success())
        })
        .collect();
    let skip = !netns::available() || !missing.is_empty();
    if skip {
        eprintln!("SKIPPED {test}: needs root, iproute2 and {missing:?} (CI installs them)");
    }
    skip
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A signed repository under `dir/repo` with one `.deb` per package; returns the root and
/// the key file apt trusts.
fn make_repo(dir: &Path) -> (PathBuf, PathBuf) {
    let repo = dir.join("repo");
    let pool = repo.join("pool/main");
    std::fs::create_dir_all(&pool).unwrap();
    for (i, name) in PACKAGES.iter().chain(&[CORRUPTED]).enumerate() {
        let pkg = dir.join("build").join(name);
        std::fs::create_dir_all(pkg.join("DEBIAN")).unwrap();
        std::fs::create_dir_all(pkg.join("usr/share").join(name)).unwrap();
        std::fs::write(
            pkg.join("DEBIAN/control"),
            format!(
                "Package: {name}\nVersion: 1.0-{i}\nArchitecture: amd64\n\
                 Maintainer: Shoal tests <tests@shoal.invalid>\nDescription: payload {i}\n"
            ),
        )
        .unwrap();
        let seed = u8::try_from(i).unwrap_or(0) + 40;
        std::fs::write(
            pkg.join("usr/share").join(name).join("payload"),
            shoal_tests::content(PAYLOAD_BYTES, seed),
        )
        .unwrap();
        run(Command::new("dpkg-deb")
            .args(["-Znone", "--root-owner-group", "--build"])
            .arg(&pkg)
            .arg(pool.join(format!("{name}_1.0-{i}_amd64.deb"))));
    }
    let dist = repo.join("dists/stable");
    std::fs::create_dir_all(dist.join("main/binary-amd64")).unwrap();
    let packages = run(Command::new("apt-ftparchive")
        .current_dir(&repo)
        .args(["packages", "pool"]))
    .stdout;
    std::fs::write(dist.join("main/binary-amd64/Packages"), packages).unwrap();
    let release = run(Command::new("apt-ftparchive").current_dir(&repo).args([
        "-o",
        "APT::FTPArchive::Release::Suite=stable",
        "-o",
        "APT::FTPArchive::Release::Codename=stable",
        "-o",
        "APT::FTPArchive::Release::Architectures=amd64",
        "-o",
        "APT::FTPArchive::Release::Components=main",
        "release",
        "dists/stable",
    ]))
    .stdout;
    std::fs::write(dist.join("Release"), release).unwrap();
    let gnupg = dir.join("gnupg");
    std::fs::create_dir_all(&gnupg).unwrap();
    std::fs::set_permissions(&gnupg, std::fs::Permissions::from_mode(0o700)).unwrap();
    let gpg = || {
        let mut c = Command::new("gpg");
        c.env("GNUPGHOME", &gnupg).args(["--batch", "--yes"]);
        c
    };
    run(gpg().args([
        "--passphrase",
        "",
        "--quick-gen-key",
        "Shoal tests <tests@shoal.invalid>",
        "ed25519",
        "sign",
        "never",
    ]));
    run(gpg()
        .arg("--clearsign")
        .arg("-o")
        .arg(dist.join("InRelease"))
        .arg(dist.join("Release")));
    let key = dir.join("shoal-test.gpg");
    std::fs::write(&key, run(gpg().arg("--export")).stdout).unwrap();
    (repo, key)
}

/// One machine: its daemon (a process in its namespace) and its apt tree.
struct Machine {
    ns: String,
    root: PathBuf,
    socket: PathBuf,
    daemon: Option<Guard>,
}

impl Machine {
    fn new(lan: &Lan, i: usize, dir: &Path, key: &Path, origin: &str) -> Self {
        let root = dir.join(format!("machine{i}"));
        for d in [
            "etc/apt.conf.d",
            "etc/trusted.gpg.d",
            "etc/preferences.d",
            "etc/sources.list.d",
            "state/lists/partial",
            "cache/archives/partial",
            "methods",
            "log",
            "shoal",
        ] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        std::fs::copy(key, root.join("etc/trusted.gpg.d/shoal-test.gpg")).unwrap();
        std::fs::write(
            root.join("etc/sources.list"),
            format!("deb shoal+http://{origin}:{REPO_PORT}/ stable main\n"),
        )
        .unwrap();
        std::fs::write(root.join("state/status"), "").unwrap();
        // apt's own methods, and Shoal's under its two names.
        for m in std::fs::read_dir("/usr/lib/apt/methods").unwrap() {
            let m = m.unwrap();
            std::os::unix::fs::symlink(m.path(), root.join("methods").join(m.file_name())).unwrap();
        }
        for name in ["shoal+http", "shoal+https"] {
            std::os::unix::fs::symlink(node_bin("shoal-apt"), root.join("methods").join(name))
                .unwrap();
        }
        let socket = root.join("shoal/shoal.sock");
        let config = root.join("shoal/shoal.toml");
        // The default `lan` mode (mDNS on); the socket open to apt's sandbox user.
        std::fs::write(
            &config,
            format!(
                "[node]\nlisten = [\"/ip4/0.0.0.0/tcp/{FLEET_PORT}\"]\n\n[daemon]\n\
                 socket = \"{}\"\nsocket_mode = \"0666\"\nstate_dir = \"{}\"\n",
                socket.display(),
                root.join("shoal/state").display()
            ),
        )
        .unwrap();
        let mut m = Self {
            ns: lan.host_ns(i).to_owned(),
            root,
            socket,
            daemon: None,
        };
        m.start_daemon();
        m
    }

    fn start_daemon(&mut self) {
        let log = std::fs::File::create(self.root.join("shoal/daemon.log")).unwrap();
        let child = netns::exec(&self.ns, node_bin("shoal"))
            .args(["daemon", "--config"])
            .arg(self.root.join("shoal/shoal.toml"))
            .env("SHOAL_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.daemon = Some(Guard(child));
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.socket.exists() {
            assert!(
                Instant::now() < deadline,
                "the daemon in {} did not start",
                self.ns
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn stop_daemon(&mut self) {
        self.daemon = None;
        let _ = std::fs::remove_file(&self.socket);
    }

    /// `apt-get ARGS` in this machine's namespace, with its private tree.
    fn apt_get(&self, args: &[&str]) -> Output {
        let conf = self.root.join("apt.conf");
        let r = self.root.display();
        std::fs::write(
            &conf,
            format!(
                "Dir::Etc \"{r}/etc\";\nDir::State \"{r}/state\";\nDir::Cache \"{r}/cache\";\n\
                 Dir::Log \"{r}/log\";\nDir::Bin::Methods \"{r}/methods\";\n\
                 Dir::State::status \"{r}/state/status\";\nDebug::NoLocking \"true\";\n\
                 APT::Architecture \"amd64\";\nAPT::Architectures {{ \"amd64\"; }};\n\
                 Acquire::Languages \"none\";\nAcquire::shoal::Socket \"{}\";\n\
                 Acquire::shoal::Config \"{r}/shoal/embedded.toml\";\n",
                self.socket.display()
            ),
        )
        .unwrap();
        std::fs::write(
            self.root.join("shoal/embedded.toml"),
            "[node]\nlisten = [\"/ip4/0.0.0.0/tcp/0\"]\nmdns = false\n",
        )
        .unwrap();
        netns::exec(&self.ns, "apt-get")
            .env("APT_CONFIG", &conf)
            .args(args)
            .output()
            .unwrap()
    }

    /// The `.deb`s apt left in its archive, by name.
    fn debs(&self) -> Vec<(String, Vec<u8>)> {
        let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(self.root.join("cache/archives"))
            .unwrap()
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().ends_with(".deb"))
            .map(|e| {
                (
                    e.file_name().to_string_lossy().into_owned(),
                    std::fs::read(e.path()).unwrap(),
                )
            })
            .collect();
        v.sort();
        v
    }

    /// Waits until the daemon is connected to a peer (found by mDNS).
    fn wait_for_a_peer(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = Command::new(node_bin("shoal"))
                .args(["status", "--json", "--socket"])
                .arg(&self.socket)
                .output()
                .unwrap();
            let v: serde_json::Value =
                serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
            if v["connected_peers"].as_u64().unwrap_or(0) >= 1 {
                return;
            }
            assert!(Instant::now() < deadline, "{} found no peer: {v}", self.ns);
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

fn ok(out: &Output, what: &str) -> String {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{what} failed:\n{text}");
    text
}

/// The bytes of the `.deb`s named in `listed`.
fn deb_bytes(repo: &Path, listed: &[(String, String)]) -> u64 {
    listed
        .iter()
        .map(|(n, _)| {
            std::fs::metadata(repo.join("pool/main").join(n))
                .unwrap()
                .len()
        })
        .sum()
}

/// The SHA-256 of each `.deb` as the signed `Packages` lists it, by file name.
fn listed_sha256(repo: &Path) -> Vec<(String, String)> {
    let text =
        std::fs::read_to_string(repo.join("dists/stable/main/binary-amd64/Packages")).unwrap();
    let mut v: Vec<(String, String)> = text
        .split("\n\n")
        .filter_map(|stanza| {
            let field = |k: &str| {
                stanza
                    .lines()
                    .find_map(|l| l.strip_prefix(k))
                    .map(|v| v.trim().to_owned())
            };
            let file = field("Filename:")?;
            let name = file.rsplit('/').next()?.to_owned();
            (!name.starts_with(CORRUPTED)).then_some(())?;
            Some((name, field("SHA256:")?))
        })
        .collect();
    v.sort();
    v
}

#[test]
fn real_apt_fetches_through_shoal_and_a_second_machine_takes_the_debs_from_the_first() {
    let test = "real_apt_fetches_through_shoal_and_a_second_machine_takes_the_debs_from_the_first";
    if skipped(test) {
        return;
    }
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let (repo, key) = make_repo(dir.path());
    let lan = Lan::new("apt", 2).unwrap().with_wan(50).unwrap();
    let origin_ip = lan.origin_ip().to_string();
    let www = dir.path().join("nginx");
    std::fs::create_dir_all(&www).unwrap();
    let conf = nginx_conf(&www, &repo, &format!("{origin_ip}:{REPO_PORT}")).unwrap();
    let _nginx = start_nginx(netns::exec(lan.origin_ns().unwrap(), "nginx"), &conf, &www).unwrap();
    let mut a = Machine::new(&lan, 0, dir.path(), &key, &origin_ip);
    let b = Machine::new(&lan, 1, dir.path(), &key, &origin_ip);
    let want = listed_sha256(&repo);
    let deb_bytes: u64 = want
        .iter()
        .map(|(n, _)| {
            std::fs::metadata(repo.join("pool/main").join(n))
                .unwrap()
                .len()
        })
        .sum();

    // 1. Machine A: apt accepts every .deb, and each matches the signed index.
    let out = a.apt_get(&["update"]);
    ok(&out, "apt-get update on A");
    let mut install = vec!["install", "-d", "-y", "--no-install-recommends"];
    install.extend(PACKAGES);
    ok(&a.apt_get(&install), "apt-get install -d on A");
    let got = a.debs();
    assert_eq!(got.len(), PACKAGES.len(), "{got:?}");
    for ((name, bytes), (want_name, sha)) in got.iter().zip(&want) {
        assert_eq!(name.replace("%3a", ":"), *want_name);
        assert_eq!(super::super::sha256_of(bytes).to_string(), *sha, "{name}");
    }

    // 6. A second update with nothing changed: InRelease is an IMS hit.
    let out = a.apt_get(&["-o", "Debug::pkgAcquire::Worker=1", "update"]);
    let text = ok(&out, "second apt-get update on A");
    // The method's answer (apt's debug output URL-encodes it), and what apt makes of it.
    assert!(text.contains("IMS-Hit:%20true"), "no IMS-Hit:\n{text}");
    assert!(text.contains("Hit:1 shoal+http://"), "{text}");

    // 2. Machine B, default configuration, finds A by itself and takes the .debs from it.
    b.wait_for_a_peer();
    ok(&b.apt_get(&["update"]), "apt-get update on B");
    let before = lan.origin_tx_bytes().unwrap();
    ok(&b.apt_get(&install), "apt-get install -d on B");
    let from_origin = lan.origin_tx_bytes().unwrap() - before;
    assert_eq!(b.debs(), got, "B has the same .debs as A");
    assert!(
        from_origin * 20 <= deb_bytes,
        "B took {from_origin} of {deb_bytes} .deb bytes from the origin (at most 5 % allowed)"
    );
    eprintln!(
        "{test}: B took {from_origin} of {deb_bytes} .deb bytes from the origin ({:.1} %), in {:.1} s in all",
        from_origin as f64 * 100.0 / deb_bytes as f64,
        started.elapsed().as_secs_f64()
    );

    // 5. A's daemon stopped: the method fetches itself, and apt shows its warning.
    a.stop_daemon();
    std::fs::remove_dir_all(a.root.join("cache/archives")).unwrap();
    std::fs::create_dir_all(a.root.join("cache/archives/partial")).unwrap();
    let text = ok(
        &a.apt_get(&install),
        "apt-get install -d on A without its daemon",
    );
    assert!(
        text.contains("no Shoal daemon answers"),
        "no warning about the missing daemon:\n{text}"
    );
    assert_eq!(a.debs(), got);
}

/// The origin, the LAN and a signed repository, for one test.
struct Setup {
    dir: tempfile::TempDir,
    repo: PathBuf,
    key: PathBuf,
    lan: Lan,
    origin_ip: String,
    _nginx: Guard,
}

impl Setup {
    fn new(tag: &str, mbit: u32) -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let (repo, key) = make_repo(dir.path());
        let lan = Lan::new(tag, 2).unwrap().with_wan(mbit).unwrap();
        let origin_ip = lan.origin_ip().to_string();
        let www = dir.path().join("nginx");
        std::fs::create_dir_all(&www).unwrap();
        let conf = nginx_conf(&www, &repo, &format!("{origin_ip}:{REPO_PORT}")).unwrap();
        let nginx =
            start_nginx(netns::exec(lan.origin_ns().unwrap(), "nginx"), &conf, &www).unwrap();
        Self {
            dir,
            repo,
            key,
            lan,
            origin_ip,
            _nginx: nginx,
        }
    }

    fn machine(&self, i: usize) -> Machine {
        Machine::new(&self.lan, i, self.dir.path(), &self.key, &self.origin_ip)
    }
}

#[test]
fn two_machines_starting_together_pull_the_debs_about_once_and_a_corrupt_deb_fails_cleanly() {
    let test =
        "two_machines_starting_together_pull_the_debs_about_once_and_a_corrupt_deb_fails_cleanly";
    if skipped(test) {
        return;
    }
    let s = Setup::new("apt2", 50);
    let machines = [s.machine(0), s.machine(1)];
    let want = listed_sha256(&s.repo);
    let deb_bytes = deb_bytes(&s.repo, &want);
    let mut install = vec!["install", "-d", "-y", "--no-install-recommends"];
    install.extend(PACKAGES);
    // Plain apt first, the baseline: the same repository over apt's own http method.
    for m in &machines {
        std::fs::write(
            m.root.join("etc/sources.list"),
            format!("deb http://{}:{REPO_PORT}/ stable main\n", s.origin_ip),
        )
        .unwrap();
        ok(&m.apt_get(&["update"]), "plain apt-get update");
    }
    let together = |install: &[&str]| {
        let before = s.lan.origin_tx_bytes().unwrap();
        let start = Instant::now();
        let times: Vec<f64> = std::thread::scope(|scope| {
            let runs: Vec<_> = machines
                .iter()
                .map(|m| {
                    scope.spawn(move || {
                        ok(&m.apt_get(install), "apt-get install -d");
                        start.elapsed().as_secs_f64()
                    })
                })
                .collect();
            runs.into_iter().map(|r| r.join().unwrap()).collect()
        });
        let copies = (s.lan.origin_tx_bytes().unwrap() - before) as f64 / deb_bytes as f64;
        (copies, times)
    };
    let (plain_copies, plain_times) = together(&install);
    for m in &machines {
        std::fs::remove_dir_all(m.root.join("cache/archives")).unwrap();
        std::fs::create_dir_all(m.root.join("cache/archives/partial")).unwrap();
        std::fs::write(
            m.root.join("etc/sources.list"),
            format!(
                "deb shoal+http://{}:{REPO_PORT}/ stable main\n",
                s.origin_ip
            ),
        )
        .unwrap();
        m.wait_for_a_peer();
        ok(&m.apt_get(&["update"]), "apt-get update through Shoal");
    }
    // 3. Both at once, caches cold: the .debs cross the link about once.
    let (copies, times) = together(&install);
    eprintln!(
        "{test}: plain apt x 2: {plain_copies:.2} copies, done after {plain_times:.1?} s; \
         through Shoal: {copies:.2} copies, done after {times:.1?} s ({deb_bytes} bytes of .debs, 50 Mbit/s)"
    );
    for m in &machines {
        let got = m.debs();
        assert_eq!(got.len(), PACKAGES.len());
        for ((name, bytes), (_, sha)) in got.iter().zip(&want) {
            assert_eq!(super::super::sha256_of(bytes).to_string(), *sha, "{name}");
        }
    }
    assert!(
        (1.5..2.5).contains(&plain_copies),
        "plain apt pulls a copy per machine: {plain_copies:.2}"
    );
    assert!(
        copies <= 1.1,
        "{copies:.2} copies of the .debs crossed the link"
    );

    // 4. A package whose bytes changed on the origin (its index unchanged): a hash sum
    // mismatch, and no file of it anywhere in apt's archive.
    let deb = std::fs::read_dir(s.repo.join("pool/main"))
        .unwrap()
        .filter_map(Result::ok)
        .find(|e| e.file_name().to_string_lossy().starts_with(CORRUPTED))
        .unwrap()
        .path();
    let mut bytes = std::fs::read(&deb).unwrap();
    let at = bytes.len() - 1000;
    bytes[at] ^= 0xff;
    std::fs::write(&deb, bytes).unwrap();
    let out = machines[0].apt_get(&[
        "-o",
        "Debug::pkgAcquire::Worker=1",
        "install",
        "-d",
        "-y",
        CORRUPTED,
    ]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !out.status.success(),
        "apt accepted a corrupt package:\n{text}"
    );
    assert!(text.contains("FailReason:%20HashSumMismatch"), "{text}");
    let left: Vec<String> = walk(&machines[0].root.join("cache/archives"))
        .into_iter()
        .filter(|p| p.contains(CORRUPTED))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// Every file under `dir`, recursively, as paths.
fn walk(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p.display().to_string());
        }
    }
    out
}
