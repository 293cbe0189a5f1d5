//! A disk that can be made to fail: nbdkit's memory plugin behind its `error` filter,
//! exposed as a file through FUSE by nbdfuse. While the trigger file exists every request
//! returns EIO, which the kernel passes on to the agent's pread/pwrite/fdatasync.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

pub struct FailingDisk {
    dir: PathBuf,
    nbdkit: Child,
    nbdfuse: Child,
}

fn wait_until(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "{what}: not reached in 10 s");
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl FailingDisk {
    pub fn new(dir: &Path, bytes: u64) -> FailingDisk {
        std::fs::create_dir_all(dir).unwrap();
        let sock = dir.join("disk.sock");
        // Both report every injected error: to a log, not the test's output.
        let log = std::fs::File::create(dir.join("disk.log")).unwrap();
        let nbdkit = Command::new("nbdkit")
            .args(["--foreground", "-U"])
            .arg(&sock)
            .args(["--filter=error", "memory", &bytes.to_string(), "error=EIO", "error-rate=100%"])
            .arg(format!("error-file={}", dir.join("disk.fail").display()))
            .stderr(log.try_clone().unwrap())
            .spawn()
            .unwrap();
        wait_until("nbdkit socket", || sock.exists());
        let file = dir.join("disk");
        std::fs::File::create(&file).unwrap();
        let nbdfuse = Command::new("nbdfuse").arg(&file).arg("--unix").arg(&sock).stderr(log).spawn().unwrap();
        wait_until("nbdfuse mount", || std::fs::metadata(&file).map(|m| m.len() == bytes).unwrap_or(false));
        FailingDisk { dir: dir.to_owned(), nbdkit, nbdfuse }
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join("disk")
    }

    /// Every request fails from now on, reads included (the page cache is dropped).
    pub fn fail(&self) {
        std::fs::write(self.dir.join("disk.fail"), b"").unwrap();
        std::fs::write("/proc/sys/vm/drop_caches", b"3").unwrap();
    }

    pub fn heal(&self) {
        std::fs::remove_file(self.dir.join("disk.fail")).unwrap();
    }
}

impl Drop for FailingDisk {
    fn drop(&mut self) {
        let _ = Command::new("fusermount3").arg("-u").arg(self.path()).status();
        let _ = self.nbdfuse.kill();
        let _ = self.nbdfuse.wait();
        let _ = self.nbdkit.kill();
        let _ = self.nbdkit.wait();
    }
}
