//! File mode: the token in files that change atomically.
//!
//! The layout is the kubelet's for Secret volumes, so applications and libraries that
//! watch mounted Secrets work unchanged:
//! ```text
//! dir/..2030_01_01_00_00_00.5f3a91c2/token   the files, in a directory of their own
//! dir/..data -> ..2030_01_01_00_00_00.5f3a91c2
//! dir/token  -> ..data/token                 what the application opens
//! ```
//! A new token goes into a new timestamped directory; a `..data_tmp` symlink to it is
//! renamed over `..data` (rename is atomic), and the old directory is removed. A reader
//! opening `dir/token` gets the old file or the new one, never a mix, and an inotify
//! watcher on `dir` sees one event for the swap.

use std::{
    fs,
    hash::{BuildHasher, Hasher},
    io::{self, Write},
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use jiff::Timestamp;
use tokio::sync::watch as channel;
use tracing::{error, info};

use super::{Args, Candidates, Served, Token, health::Metrics};

/// The symlink to the current timestamped directory.
const DATA: &str = "..data";
/// The symlink renamed over [`DATA`].
const DATA_TMP: &str = "..data_tmp";

/// A file the agent can write.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// `token`: the raw token, no newline.
    Token,
    /// `authorization`: `Authorization: Bearer <token>` and a newline, for `curl -H @file`.
    Authorization,
    /// `token.env`: `SCG_ACCESS_TOKEN=<token>` and a newline, for `source` or env files.
    Env,
}

/// Parses `--file-mode`: only `0400` and `0440` are offered.
pub fn parse_mode(s: &str) -> Result<u32, String> {
    match s.trim_start_matches('0') {
        "400" => Ok(0o400),
        "440" => Ok(0o440),
        _ => Err("file mode must be 0400 or 0440".into()),
    }
}

/// One file of a payload: its name in the directory and its bytes.
pub type File = (&'static str, Vec<u8>);

/// The files for `token`.
pub fn render(token: &Token, formats: &[Format], env_name: &str, expiry: bool) -> Vec<File> {
    let t = token.value.expose();
    let mut files: Vec<File> = formats
        .iter()
        .map(|f| match f {
            Format::Token => ("token", t.as_bytes().to_vec()),
            Format::Authorization => (
                "authorization",
                format!("Authorization: Bearer {t}\n").into_bytes(),
            ),
            Format::Env => ("token.env", format!("{env_name}={t}\n").into_bytes()),
        })
        .collect();
    if let (true, Some(at)) = (expiry, token.expires_at) {
        files.push(("expires-at", at.to_string().into_bytes()));
    }
    files.sort();
    files.dedup_by(|a, b| a.0 == b.0);
    files
}

/// What a write did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Written {
    /// The files changed; readers see the new ones from now on. The directory that was
    /// current before is kept for readers that resolved `..data` just before the swap;
    /// [`AtomicWriter::retire`] removes it.
    Swapped { previous: Option<PathBuf> },
    /// The directory already held exactly these files (e.g. after the agent restarted),
    /// since this time.
    Unchanged(SystemTime),
}

/// Writes payloads into one directory atomically. Not safe for concurrent use: one
/// writer per directory.
#[derive(Debug, Clone)]
pub struct AtomicWriter {
    dir: PathBuf,
    mode: u32,
    gid: Option<u32>,
}

impl AtomicWriter {
    /// A writer for `dir` (created if missing) with files of `mode` (0400 or 0440),
    /// owned by group `gid` if given.
    pub fn new(dir: PathBuf, mode: u32, gid: Option<u32>) -> AtomicWriter {
        AtomicWriter { dir, mode, gid }
    }

    /// Makes `files` what the directory shows, atomically.
    pub fn write(&self, files: &[File]) -> io::Result<Written> {
        fs::create_dir_all(&self.dir)?;
        let old = fs::read_link(self.dir.join(DATA)).ok();
        if let Some(old) = &old
            && self.holds(old, files)
        {
            let since = fs::symlink_metadata(self.dir.join(old))?.modified()?;
            self.link_visible(files)?;
            return Ok(Written::Unchanged(since));
        }
        let ts = self.new_timestamped_dir()?;
        if let Err(e) = self.fill_and_swap(&ts, files) {
            let _ = fs::remove_dir_all(self.dir.join(&ts));
            return Err(e);
        }
        self.link_visible(files)?;
        self.remove_stale(&[Some(&ts), old.as_deref()], files)?;
        Ok(Written::Swapped { previous: old })
    }

    /// Removes the timestamped directory `ts` unless it is current again.
    pub fn retire(&self, ts: &Path) -> io::Result<()> {
        if fs::read_link(self.dir.join(DATA)).is_ok_and(|current| current == ts) {
            return Ok(());
        }
        match fs::remove_dir_all(self.dir.join(ts)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Whether the timestamped directory `ts` holds exactly `files`, with our modes.
    fn holds(&self, ts: &Path, files: &[File]) -> bool {
        let dir = self.dir.join(ts);
        let Ok(entries) = fs::read_dir(&dir) else {
            return false;
        };
        if entries.count() != files.len() {
            return false;
        }
        files.iter().all(|(name, content)| {
            let path = dir.join(name);
            fs::symlink_metadata(&path).is_ok_and(|m| m.permissions().mode() & 0o777 == self.mode)
                && fs::read(&path).is_ok_and(|c| c == *content)
        })
    }

    fn new_timestamped_dir(&self) -> io::Result<PathBuf> {
        let stamp = Timestamp::now().strftime("%Y_%m_%d_%H_%M_%S").to_string();
        for _ in 0..10 {
            let mut h = std::hash::RandomState::new().build_hasher();
            h.write_u128(
                std::time::UNIX_EPOCH
                    .elapsed()
                    .unwrap_or_default()
                    .as_nanos(),
            );
            let name = PathBuf::from(format!("..{stamp}.{:08x}", h.finish() as u32));
            match fs::create_dir(self.dir.join(&name)) {
                Ok(()) => {
                    let path = self.dir.join(&name);
                    // The directory must be searchable by the files' group, whatever the umask.
                    let dir_mode = if self.mode & 0o040 != 0 { 0o750 } else { 0o700 };
                    self.own(&path)?;
                    fs::set_permissions(&path, fs::Permissions::from_mode(dir_mode))?;
                    return Ok(name);
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
        Err(io::Error::other("could not create a timestamped directory"))
    }

    fn own(&self, path: &Path) -> io::Result<()> {
        match self.gid {
            Some(gid) => std::os::unix::fs::chown(path, None, Some(gid)),
            None => Ok(()),
        }
    }

    /// Writes the files into `ts`, then points `..data` at it.
    fn fill_and_swap(&self, ts: &Path, files: &[File]) -> io::Result<()> {
        let dir = self.dir.join(ts);
        for (name, content) in files {
            let path = dir.join(name);
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)?;
            f.write_all(content)?;
            f.sync_all()?;
            self.own(&path)?;
            fs::set_permissions(&path, fs::Permissions::from_mode(self.mode))?;
        }
        fs::File::open(&dir)?.sync_all()?;
        let tmp = self.dir.join(DATA_TMP);
        match fs::remove_file(&tmp) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        std::os::unix::fs::symlink(ts, &tmp)?;
        fs::rename(&tmp, self.dir.join(DATA))?;
        fs::File::open(&self.dir)?.sync_all()
    }

    /// Makes `dir/<name> -> ..data/<name>` exist for every file. A path in the way that
    /// is not that symlink is replaced atomically (symlink beside it, then rename).
    fn link_visible(&self, files: &[File]) -> io::Result<()> {
        for (name, _) in files {
            let visible = self.dir.join(name);
            let target = Path::new(DATA).join(name);
            if fs::read_link(&visible).is_ok_and(|t| t == target) {
                continue;
            }
            let tmp = self.dir.join(format!("..{name}.tmp"));
            let _ = fs::remove_file(&tmp);
            std::os::unix::fs::symlink(&target, &tmp)?;
            fs::rename(&tmp, &visible)?;
        }
        Ok(())
    }

    /// Removes timestamped directories other than `keep` (older ones, and any left by a
    /// crash) and visible links to files no longer written.
    fn remove_stale(&self, keep: &[Option<&Path>], files: &[File]) -> io::Result<()> {
        for entry in fs::read_dir(&self.dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let name_str = name.to_string_lossy();
            let path = entry.path();
            let file_type = entry.file_type()?;
            if name_str.starts_with("..")
                && file_type.is_dir()
                && !keep.contains(&Some(Path::new(&name)))
            {
                fs::remove_dir_all(&path)?;
            } else if file_type.is_symlink()
                && !name_str.starts_with("..")
                && fs::read_link(&path).is_ok_and(|t| t.starts_with(DATA))
                && !files.iter().any(|(f, _)| *f == name_str)
            {
                fs::remove_file(&path)?;
            }
        }
        Ok(())
    }
}

/// File mode's stage between the Secret and the served token.
pub struct Publisher {
    writer: AtomicWriter,
    formats: Vec<Format>,
    env_name: String,
    expiry: bool,
}

impl Publisher {
    /// Checks the flags and prepares the directory.
    pub fn new(dir: PathBuf, args: &Args) -> Result<Publisher, super::AgentError> {
        let bad = |m: String| super::AgentError::Config(m);
        if args.env_name.is_empty()
            || !args
                .env_name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_')
        {
            return Err(bad(format!(
                "--env-name {:?} is not a variable name",
                args.env_name
            )));
        }
        if args.formats.is_empty() {
            return Err(bad("--formats names no file".into()));
        }
        fs::create_dir_all(&dir)
            .map_err(|e| bad(format!("cannot create --dir {}: {e}", dir.display())))?;
        Ok(Publisher {
            writer: AtomicWriter::new(dir, args.file_mode, args.file_group),
            formats: args.formats.clone(),
            env_name: args.env_name.clone(),
            expiry: args.expiry_file,
        })
    }

    /// Writes every candidate, then serves it. A failed write is retried with back-off
    /// (up to 30 s apart) until it succeeds or a newer token arrives. The directory a swap
    /// replaced is removed [`RETIRE_AFTER`] later.
    pub async fn run(
        self,
        mut candidates: Candidates,
        served: channel::Sender<Option<Served>>,
        metrics: Arc<Metrics>,
    ) {
        let mut backoff = Duration::from_millis(500);
        let mut write_now = true;
        let mut retry_at = None;
        let mut retiring: Option<(tokio::time::Instant, PathBuf)> = None;
        loop {
            if std::mem::take(&mut write_now) {
                let token = candidates.borrow_and_update().clone();
                if let Some(token) = token {
                    match self.write(token.clone()).await {
                        Some(Ok(written)) => {
                            backoff = Duration::from_millis(500);
                            retry_at = None;
                            let since = match written {
                                Written::Unchanged(at) => {
                                    info!("the files already hold the Secret's token");
                                    Timestamp::try_from(at).unwrap_or_else(|_| Timestamp::now())
                                }
                                Written::Swapped { previous } => {
                                    let at = tokio::time::Instant::now() + RETIRE_AFTER;
                                    retiring = previous.map(|p| (at, p)).or(retiring);
                                    Timestamp::now()
                                }
                            };
                            super::serve(&served, &metrics, token, since);
                        }
                        Some(Err(e)) => {
                            error!(dir = %self.writer.dir.display(), error = %e, "writing the token files failed; retrying");
                            metrics.file_write_failed();
                            retry_at = Some(tokio::time::Instant::now() + backoff);
                            backoff = (backoff * 2).min(Duration::from_secs(30));
                        }
                        None => return,
                    }
                }
            }
            tokio::select! {
                r = candidates.changed() => {
                    if r.is_err() {
                        return;
                    }
                    write_now = true;
                }
                () = sleep_until(retry_at) => {
                    retry_at = None;
                    write_now = true;
                }
                () = sleep_until(retiring.as_ref().map(|r| r.0)) => {
                    if let Some((_, ts)) = retiring.take() {
                        self.retire(ts).await;
                    }
                }
            }
        }
    }

    /// Writes the files of `token` off the async threads; `None` if the task died.
    async fn write(&self, token: Arc<Token>) -> Option<io::Result<Written>> {
        let files = render(&token, &self.formats, &self.env_name, self.expiry);
        let writer = self.writer.clone();
        tokio::task::spawn_blocking(move || writer.write(&files))
            .await
            .ok()
    }

    async fn retire(&self, ts: PathBuf) {
        let writer = self.writer.clone();
        let result = tokio::task::spawn_blocking(move || writer.retire(&ts)).await;
        if let Ok(Err(e)) = result {
            error!(dir = %self.writer.dir.display(), error = %e, "removing an old token directory failed");
        }
    }
}

/// How long the directory a swap replaced stays for readers that resolved `..data` just
/// before the swap.
pub const RETIRE_AFTER: Duration = Duration::from_secs(2);

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scratch directory removed on drop.
    struct Scratch(PathBuf);

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn scratch(name: &str) -> Scratch {
        let dir =
            std::env::temp_dir().join(format!("scg-agent-files-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        Scratch(dir)
    }

    fn token(value: &str, expires: Option<&str>) -> Token {
        Token {
            value: crate::scg::SecretString::new(value),
            fingerprint: "f".into(),
            scgtoken: "s".into(),
            issued_at: None,
            expires_at: expires.map(|e| e.parse().unwrap()),
        }
    }

    fn timestamped_dirs(dir: &Path) -> Vec<String> {
        fs::read_dir(dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("..") && n != DATA)
            .collect()
    }

    #[test]
    fn formats_render_the_token_the_expected_ways() {
        let t = token("abc", Some("2030-01-01T00:00:00Z"));
        let all = [
            Format::Token,
            Format::Authorization,
            Format::Env,
            Format::Token,
        ];
        let files = render(&t, &all, "TOKEN", true);
        let get = |n: &str| {
            String::from_utf8(files.iter().find(|f| f.0 == n).unwrap().1.clone()).unwrap()
        };
        assert_eq!(files.len(), 4);
        assert_eq!(get("token"), "abc");
        assert_eq!(get("authorization"), "Authorization: Bearer abc\n");
        assert_eq!(get("token.env"), "TOKEN=abc\n");
        assert_eq!(get("expires-at"), "2030-01-01T00:00:00Z");
        // No expiry known: no expiry file.
        assert_eq!(
            render(&token("abc", None), &[Format::Token], "T", true).len(),
            1
        );
    }

    #[test]
    fn the_layout_is_kubelets_and_old_directories_go() {
        let s = scratch("layout");
        let w = AtomicWriter::new(s.0.clone(), 0o400, None);
        let first = w
            .write(&[
                ("token", b"one".to_vec()),
                ("token.env", b"T=one\n".to_vec()),
            ])
            .unwrap();
        assert_eq!(first, Written::Swapped { previous: None });
        assert_eq!(
            fs::read_link(s.0.join("token")).unwrap(),
            Path::new("..data/token")
        );
        assert_eq!(fs::read_to_string(s.0.join("token")).unwrap(), "one");
        let mode = fs::metadata(s.0.join("token"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o400);
        let ts = fs::read_link(s.0.join(DATA)).unwrap();
        assert!(ts.to_string_lossy().starts_with(".."), "{ts:?}");

        // A new token without the env file: the env link goes; the old directory stays
        // for readers in the middle of a lookup until it is retired.
        let second = w.write(&[("token", b"two".to_vec())]).unwrap();
        assert_eq!(
            second,
            Written::Swapped {
                previous: Some(ts.clone())
            }
        );
        assert_eq!(fs::read_to_string(s.0.join("token")).unwrap(), "two");
        assert!(fs::symlink_metadata(s.0.join("token.env")).is_err());
        assert_eq!(timestamped_dirs(&s.0).len(), 2);
        w.retire(&ts).unwrap();
        assert_eq!(timestamped_dirs(&s.0).len(), 1);
        // The current directory is never retired.
        let current = fs::read_link(s.0.join(DATA)).unwrap();
        w.retire(&current).unwrap();
        assert_eq!(fs::read_to_string(s.0.join("token")).unwrap(), "two");

        // The same payload again (an agent restart) changes nothing.
        let before = fs::read_link(s.0.join(DATA)).unwrap();
        assert!(matches!(
            w.write(&[("token", b"two".to_vec())]).unwrap(),
            Written::Unchanged(_)
        ));
        assert_eq!(fs::read_link(s.0.join(DATA)).unwrap(), before);
    }

    #[test]
    fn group_readable_files_and_leftovers_of_a_crash() {
        let s = scratch("group");
        fs::create_dir_all(s.0.join("..2020_01_01_00_00_00.deadbeef")).unwrap();
        // Our own primary group: always allowed.
        let gid = own_gid();
        let w = AtomicWriter::new(s.0.clone(), 0o440, Some(gid));
        w.write(&[("token", b"one".to_vec())]).unwrap();
        let meta = fs::metadata(s.0.join("token")).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o440);
        assert_eq!(std::os::unix::fs::MetadataExt::gid(&meta), gid);
        let dir = fs::metadata(s.0.join(DATA)).unwrap();
        assert_eq!(dir.permissions().mode() & 0o777, 0o750);
        assert_eq!(
            timestamped_dirs(&s.0).len(),
            1,
            "the crash leftover is removed"
        );
    }

    /// The gid of a file this process just created: a group it belongs to.
    fn own_gid() -> u32 {
        let probe = std::env::temp_dir().join(format!("scg-agent-gid-{}", std::process::id()));
        fs::write(&probe, b"").unwrap();
        let gid = std::os::unix::fs::MetadataExt::gid(&fs::metadata(&probe).unwrap());
        let _ = fs::remove_file(&probe);
        gid
    }

    #[test]
    fn a_reader_never_sees_a_partial_or_mixed_file() {
        let s = scratch("readers");
        let w = AtomicWriter::new(s.0.clone(), 0o400, None);
        // Large values make a torn read likely if writes were not atomic.
        let values: Vec<String> = (0..50).map(|i| format!("{i:02}").repeat(20_000)).collect();
        w.write(&[("token", values[0].clone().into_bytes())])
            .unwrap();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let reader = {
            let (path, stop, values) = (s.0.join("token"), stop.clone(), values.clone());
            std::thread::spawn(move || {
                let mut reads = 0u32;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) || reads == 0 {
                    // A lookup that raced the removal of a retired directory finds nothing;
                    // what matters here is that a file found is whole.
                    let got = match fs::read_to_string(&path) {
                        Ok(got) => got,
                        Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                        Err(e) => panic!("reading the token failed: {e}"),
                    };
                    assert!(values.contains(&got), "a read saw a partial or mixed file");
                    reads += 1;
                }
                reads
            })
        };
        for v in &values[1..] {
            if let Written::Swapped { previous: Some(p) } =
                w.write(&[("token", v.clone().into_bytes())]).unwrap()
            {
                w.retire(&p).unwrap();
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let reads = reader.join().expect("reader");
        assert!(reads > 0);
        assert_eq!(fs::read_to_string(s.0.join("token")).unwrap(), values[49]);
        assert_eq!(timestamped_dirs(&s.0).len(), 1);
    }

    #[test]
    fn only_the_two_offered_modes_parse() {
        assert_eq!(parse_mode("0400"), Ok(0o400));
        assert_eq!(parse_mode("440"), Ok(0o440));
        assert!(parse_mode("0644").is_err());
        assert!(parse_mode("0444").is_err());
    }
}
