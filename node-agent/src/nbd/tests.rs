//! Unit tests: a raw NBD client against `serve_connection` (over `tokio::io::duplex`) and
//! `serve_unix` (over a socket in a temporary directory).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream};
use tokio::sync::{Barrier, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::timeout;

use super::proto::*;
use super::*;
use crate::block::{BlockDevice, BlockError, BlockErrorKind, BlockResult, check_range};

const T: Duration = Duration::from_secs(20);

// ---- Test device ---------------------------------------------------------------------------

/// Behaviour injected into [`MemDevice`].
#[derive(Default)]
struct Hooks {
    /// Every call fails with this kind.
    fail: Option<BlockErrorKind>,
    /// Every call takes (and consumes) one permit before doing anything.
    gate: Option<Arc<Semaphore>>,
    /// Every write waits on this barrier.
    write_barrier: Option<Arc<Barrier>>,
    /// Reads return one byte too few.
    short_read: bool,
    /// Reads panic.
    panic_on_read: bool,
}

/// An in-memory device: a `Vec<u8>` behind a mutex.
#[derive(Default)]
struct MemDevice {
    data: Mutex<Vec<u8>>,
    hooks: Hooks,
    started: AtomicUsize,
    flushes: AtomicUsize,
    fua: AtomicUsize,
    trims: AtomicUsize,
    zeroes: AtomicUsize,
}

impl MemDevice {
    fn new(size: usize) -> Self {
        Self::with_hooks(size, Hooks::default())
    }

    fn with_hooks(size: usize, hooks: Hooks) -> Self {
        Self { data: Mutex::new(vec![0; size]), hooks, ..Default::default() }
    }

    fn contents(&self, offset: usize, len: usize) -> Vec<u8> {
        self.data.lock().unwrap()[offset..offset + len].to_vec()
    }

    async fn enter(&self) -> BlockResult<()> {
        self.started.fetch_add(1, Ordering::SeqCst);
        if let Some(gate) = &self.hooks.gate {
            gate.acquire().await.unwrap().forget();
        }
        if let Some(kind) = self.hooks.fail {
            return Err(BlockError::new(kind, "injected failure"));
        }
        Ok(())
    }

    fn fill(&self, offset: u64, len: u64, fua: bool, value: Option<&[u8]>) -> BlockResult<()> {
        let mut d = self.data.lock().unwrap();
        check_range(offset, len, d.len() as u64)?;
        let range = offset as usize..(offset + len) as usize;
        match value {
            Some(v) => d[range].copy_from_slice(v),
            None => d[range].fill(0),
        }
        if fua {
            self.fua.fetch_add(1, Ordering::SeqCst);
        }
        Ok(())
    }
}

impl BlockDevice for MemDevice {
    fn size(&self) -> u64 {
        self.data.lock().unwrap().len() as u64
    }

    async fn read(&self, offset: u64, len: u32) -> BlockResult<Bytes> {
        self.enter().await?;
        assert!(!self.hooks.panic_on_read, "injected panic");
        let d = self.data.lock().unwrap();
        check_range(offset, len.into(), d.len() as u64)?;
        let mut len = len as usize;
        if self.hooks.short_read {
            len -= 1;
        }
        Ok(Bytes::copy_from_slice(&d[offset as usize..offset as usize + len]))
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> BlockResult<()> {
        self.enter().await?;
        if let Some(b) = &self.hooks.write_barrier {
            b.wait().await;
        }
        self.fill(offset, data.len() as u64, fua, Some(&data))
    }

    async fn flush(&self) -> BlockResult<()> {
        self.enter().await?;
        self.flushes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    async fn trim(&self, offset: u64, len: u64, fua: bool) -> BlockResult<()> {
        self.enter().await?;
        self.trims.fetch_add(1, Ordering::SeqCst);
        self.fill(offset, len, fua, None)
    }

    async fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> BlockResult<()> {
        self.enter().await?;
        self.zeroes.fetch_add(1, Ordering::SeqCst);
        self.fill(offset, len, fua, None)
    }
}

/// Exports with an optional default (the empty name).
struct TestExports {
    exports: Vec<(ExportInfo, Arc<MemDevice>)>,
    default: Option<String>,
}

impl TestExports {
    fn one(device: MemDevice) -> (Arc<Self>, Arc<MemDevice>) {
        let device = Arc::new(device);
        let exports = Self {
            exports: vec![(ExportInfo { name: "disk".into(), description: "the test disk".into() }, device.clone())],
            default: Some("disk".into()),
        };
        (Arc::new(exports), device)
    }
}

impl Exports for TestExports {
    type Device = MemDevice;

    fn lookup(&self, name: &str) -> Option<Arc<MemDevice>> {
        let name = if name.is_empty() { self.default.as_deref()? } else { name };
        self.exports.iter().find(|(i, _)| i.name == name).map(|(_, d)| d.clone())
    }

    fn list(&self) -> Vec<ExportInfo> {
        self.exports.iter().map(|(i, _)| i.clone()).collect()
    }
}

// ---- Raw client ------------------------------------------------------------------------------

struct Client<S> {
    s: S,
}

/// Starts `serve_connection` on one end of a duplex pipe and returns the other end.
fn connect(exports: Arc<TestExports>) -> (Client<DuplexStream>, JoinHandle<Result<(), NbdError>>) {
    let (client, server) = tokio::io::duplex(1 << 20);
    let task = tokio::spawn(serve_connection(server, exports));
    (Client { s: client }, task)
}

struct OptReply {
    option: u32,
    kind: u32,
    data: Vec<u8>,
}

struct SimpleReply {
    error: u32,
    handle: u64,
    data: Vec<u8>,
}

impl<S: AsyncRead + Unpin> Client<S> {
    async fn opt_reply(&mut self) -> OptReply {
        let mut h = [0u8; 20];
        self.s.read_exact(&mut h).await.unwrap();
        assert_eq!(be_u64(&h[0..8]), OPT_REPLY_MAGIC);
        let len = be_u32(&h[16..20]) as usize;
        let mut data = vec![0; len];
        self.s.read_exact(&mut data).await.unwrap();
        OptReply { option: be_u32(&h[8..12]), kind: be_u32(&h[12..16]), data }
    }

    /// Reads a simple reply; `read_len` bytes of data follow a successful one.
    async fn reply(&mut self, read_len: usize) -> SimpleReply {
        let mut h = [0u8; SIMPLE_REPLY_LEN];
        self.s.read_exact(&mut h).await.unwrap();
        assert_eq!(be_u32(&h[0..4]), SIMPLE_REPLY_MAGIC);
        let error = be_u32(&h[4..8]);
        let mut data = Vec::new();
        if error == 0 && read_len > 0 {
            data.resize(read_len, 0);
            self.s.read_exact(&mut data).await.unwrap();
        }
        SimpleReply { error, handle: be_u64(&h[8..16]), data }
    }

    /// Asserts that the server has closed the connection.
    async fn expect_closed(&mut self) {
        let mut b = [0u8; 1];
        let n = timeout(T, self.s.read(&mut b)).await.expect("server did not close").unwrap_or(0);
        assert_eq!(n, 0, "expected the connection to be closed");
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Client<S> {
    /// Reads the greeting and sends the client flags.
    async fn greet(&mut self, client_flags: u32) -> u16 {
        let mut g = [0u8; GREETING_LEN];
        self.s.read_exact(&mut g).await.unwrap();
        assert_eq!(&g[..16], b"NBDMAGICIHAVEOPT");
        self.s.write_all(&client_flags.to_be_bytes()).await.unwrap();
        be_u16(&g[16..])
    }

    async fn send_opt(&mut self, option: u32, data: &[u8]) {
        let mut b = Vec::new();
        b.extend_from_slice(&IHAVEOPT.to_be_bytes());
        b.extend_from_slice(&option.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.s.write_all(&b).await.unwrap();
    }

    /// Sends NBD_OPT_INFO or NBD_OPT_GO; returns the NBD_REP_INFO payloads and the final
    /// reply type.
    async fn info(&mut self, option: u32, name: &str, requests: &[u16]) -> (Vec<Vec<u8>>, u32) {
        let mut d = Vec::new();
        d.extend_from_slice(&(name.len() as u32).to_be_bytes());
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(requests.len() as u16).to_be_bytes());
        for r in requests {
            d.extend_from_slice(&r.to_be_bytes());
        }
        self.send_opt(option, &d).await;
        let mut infos = Vec::new();
        loop {
            let r = self.opt_reply().await;
            assert_eq!(r.option, option);
            if r.kind == REP_INFO {
                infos.push(r.data);
            } else {
                return (infos, r.kind);
            }
        }
    }

    /// Full handshake with NBD_OPT_GO; returns (size, transmission flags).
    async fn handshake(&mut self, name: &str) -> (u64, u16) {
        self.greet(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).await;
        let (infos, end) = self.info(OPT_GO, name, &[INFO_BLOCK_SIZE]).await;
        assert_eq!(end, REP_ACK);
        let export = infos.iter().find(|i| be_u16(i) == INFO_EXPORT).expect("NBD_INFO_EXPORT");
        (be_u64(&export[2..10]), be_u16(&export[10..12]))
    }

    async fn request(&mut self, kind: u16, flags: u16, handle: u64, offset: u64, len: u32, payload: &[u8]) {
        let r = Request { magic: REQUEST_MAGIC, flags, kind, handle, offset, len };
        let mut b = r.encode().to_vec();
        b.extend_from_slice(payload);
        self.s.write_all(&b).await.unwrap();
    }

    async fn write(&mut self, handle: u64, offset: u64, data: &[u8]) -> u32 {
        self.request(CMD_WRITE, 0, handle, offset, data.len() as u32, data).await;
        let r = self.reply(0).await;
        assert_eq!(r.handle, handle);
        r.error
    }

    async fn read(&mut self, handle: u64, offset: u64, len: u32) -> Result<Vec<u8>, u32> {
        self.request(CMD_READ, 0, handle, offset, len, &[]).await;
        let r = self.reply(len as usize).await;
        assert_eq!(r.handle, handle);
        if r.error == 0 { Ok(r.data) } else { Err(r.error) }
    }

    async fn simple(&mut self, kind: u16, flags: u16, handle: u64, offset: u64, len: u32) -> u32 {
        self.request(kind, flags, handle, offset, len, &[]).await;
        let r = self.reply(0).await;
        assert_eq!(r.handle, handle);
        r.error
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

// ---- Handshake -------------------------------------------------------------------------------

#[tokio::test]
async fn greeting_bytes_and_flags() {
    let (exports, _) = TestExports::one(MemDevice::new(4096));
    let (mut c, _task) = connect(exports);
    let mut g = [0u8; GREETING_LEN];
    c.s.read_exact(&mut g).await.unwrap();
    assert_eq!(
        g,
        [b'N', b'B', b'D', b'M', b'A', b'G', b'I', b'C', b'I', b'H', b'A', b'V', b'E', b'O', b'P', b'T', 0, 3]
    );
}

#[tokio::test]
async fn unknown_client_flags_close_the_connection() {
    let (exports, _) = TestExports::one(MemDevice::new(4096));
    let (mut c, task) = connect(exports);
    c.greet(FLAG_C_FIXED_NEWSTYLE | 0x10).await;
    c.expect_closed().await;
    assert!(matches!(task.await.unwrap(), Err(NbdError::Protocol(_))));
}

#[tokio::test]
async fn opt_list_lists_exports_with_descriptions() {
    let a = Arc::new(MemDevice::new(1024));
    let b = Arc::new(MemDevice::new(2048));
    let exports = Arc::new(TestExports {
        exports: vec![
            (ExportInfo { name: "alpha".into(), description: "first".into() }, a),
            (ExportInfo { name: "beta".into(), description: String::new() }, b),
        ],
        default: None,
    });
    let (mut c, _task) = connect(exports);
    c.greet(FLAG_C_FIXED_NEWSTYLE).await;
    c.send_opt(OPT_LIST, &[]).await;
    let mut seen = Vec::new();
    loop {
        let r = c.opt_reply().await;
        assert_eq!(r.option, OPT_LIST);
        if r.kind == REP_ACK {
            break;
        }
        assert_eq!(r.kind, REP_SERVER);
        let n = be_u32(&r.data) as usize;
        let name = String::from_utf8(r.data[4..4 + n].to_vec()).unwrap();
        let desc = String::from_utf8(r.data[4 + n..].to_vec()).unwrap();
        seen.push((name, desc));
    }
    assert_eq!(seen, vec![("alpha".to_owned(), "first".to_owned()), ("beta".to_owned(), String::new())]);

    // NBD_OPT_LIST with data is invalid, and negotiation goes on.
    c.send_opt(OPT_LIST, b"x").await;
    assert_eq!(c.opt_reply().await.kind, REP_ERR_INVALID);
    let (_, end) = c.info(OPT_GO, "beta", &[]).await;
    assert_eq!(end, REP_ACK);
}

#[tokio::test]
async fn opt_info_reports_export_block_size_name_and_description() {
    let (exports, _) = TestExports::one(MemDevice::new(1 << 20));
    let (mut c, _task) = connect(exports);
    c.greet(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).await;

    // The default export, asking for its canonical name and description.
    let (infos, end) = c.info(OPT_INFO, "", &[INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE]).await;
    assert_eq!(end, REP_ACK);
    let get = |t: u16| infos.iter().find(|i| be_u16(i) == t).cloned();
    let export = get(INFO_EXPORT).unwrap();
    assert_eq!(export.len(), 12);
    assert_eq!(be_u64(&export[2..10]), 1 << 20);
    let flags = be_u16(&export[10..12]);
    for f in [
        TFLAG_HAS_FLAGS,
        TFLAG_SEND_FLUSH,
        TFLAG_SEND_FUA,
        TFLAG_SEND_TRIM,
        TFLAG_SEND_WRITE_ZEROES,
        TFLAG_CAN_MULTI_CONN,
    ] {
        assert_ne!(flags & f, 0, "flag {f:#x} missing");
    }
    assert_eq!(flags & (TFLAG_READ_ONLY | TFLAG_SEND_DF | TFLAG_SEND_FAST_ZERO), 0);
    let bs = get(INFO_BLOCK_SIZE).unwrap();
    assert_eq!(bs.len(), 14);
    assert_eq!((be_u32(&bs[2..6]), be_u32(&bs[6..10]), be_u32(&bs[10..14])), (1, 4096, 32 << 20));
    assert_eq!(&get(INFO_NAME).unwrap()[2..], b"disk");
    assert_eq!(&get(INFO_DESCRIPTION).unwrap()[2..], b"the test disk");

    // Without requests: no name or description, but the block sizes all the same.
    let (infos, end) = c.info(OPT_INFO, "disk", &[]).await;
    assert_eq!(end, REP_ACK);
    assert!(infos.iter().all(|i| be_u16(i) != INFO_NAME && be_u16(i) != INFO_DESCRIPTION));
    assert!(infos.iter().any(|i| be_u16(i) == INFO_BLOCK_SIZE));

    // Malformed: name length beyond the data.
    let mut bad = Vec::new();
    bad.extend_from_slice(&100u32.to_be_bytes());
    bad.extend_from_slice(b"disk\0\0");
    c.send_opt(OPT_INFO, &bad).await;
    assert_eq!(c.opt_reply().await.kind, REP_ERR_INVALID);
    // Malformed: request count that does not match.
    let mut bad = Vec::new();
    bad.extend_from_slice(&4u32.to_be_bytes());
    bad.extend_from_slice(b"disk");
    bad.extend_from_slice(&3u16.to_be_bytes());
    bad.extend_from_slice(&INFO_NAME.to_be_bytes());
    c.send_opt(OPT_GO, &bad).await;
    assert_eq!(c.opt_reply().await.kind, REP_ERR_INVALID);

    // Still negotiating: GO works.
    let (_, end) = c.info(OPT_GO, "disk", &[]).await;
    assert_eq!(end, REP_ACK);
    assert_eq!(c.read(1, 0, 16).await.unwrap(), vec![0; 16]);
}

#[tokio::test]
async fn opt_go_unknown_export_is_err_unknown_and_negotiation_continues() {
    let (exports, _) = TestExports::one(MemDevice::new(4096));
    let (mut c, _task) = connect(exports);
    c.greet(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).await;
    let (infos, end) = c.info(OPT_GO, "nope", &[]).await;
    assert_eq!(end, REP_ERR_UNKNOWN);
    assert!(infos.is_empty());
    let (_, end) = c.info(OPT_INFO, "nope", &[]).await;
    assert_eq!(end, REP_ERR_UNKNOWN);
    let (_, end) = c.info(OPT_GO, "disk", &[]).await;
    assert_eq!(end, REP_ACK);
    assert_eq!(c.write(7, 0, b"hello").await, 0);
    assert_eq!(c.read(8, 0, 5).await.unwrap(), b"hello");
}

#[tokio::test]
async fn unknown_and_unsupported_options_get_err_unsup() {
    let (exports, _) = TestExports::one(MemDevice::new(4096));
    let (mut c, _task) = connect(exports);
    c.greet(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).await;
    for (opt, data) in [
        (0x1234u32, &b"some data"[..]),
        (OPT_STRUCTURED_REPLY, &[][..]),
        (OPT_STARTTLS, &[][..]),
        (OPT_SET_META_CONTEXT, &[0, 0, 0, 0, 0, 0, 0, 0][..]),
        (OPT_EXTENDED_HEADERS, &[][..]),
    ] {
        c.send_opt(opt, data).await;
        let r = c.opt_reply().await;
        assert_eq!((r.option, r.kind), (opt, REP_ERR_UNSUP));
    }
    let (_, end) = c.info(OPT_GO, "", &[]).await;
    assert_eq!(end, REP_ACK);
}

#[tokio::test]
async fn overlong_option_is_too_big_then_closed_past_the_discard_limit() {
    let (exports, _) = TestExports::one(MemDevice::new(4096));
    let (mut c, task) = connect(exports);
    c.greet(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).await;
    let big = vec![0x55u8; MAX_OPTION_LEN as usize + 1];
    c.send_opt(OPT_INFO, &big).await;
    assert_eq!(c.opt_reply().await.kind, REP_ERR_TOO_BIG);
    // In sync: the next option works.
    c.send_opt(OPT_LIST, &[]).await;
    assert_eq!(c.opt_reply().await.kind, REP_SERVER);
    assert_eq!(c.opt_reply().await.kind, REP_ACK);

    // Past the discard limit the server hangs up without reading the payload.
    let mut h = Vec::new();
    h.extend_from_slice(&IHAVEOPT.to_be_bytes());
    h.extend_from_slice(&OPT_GO.to_be_bytes());
    h.extend_from_slice(&u32::MAX.to_be_bytes());
    c.s.write_all(&h).await.unwrap();
    c.expect_closed().await;
    assert!(matches!(task.await.unwrap(), Err(NbdError::Protocol(_))));
}

#[tokio::test]
async fn bad_option_magic_closes() {
    let (exports, _) = TestExports::one(MemDevice::new(4096));
    let (mut c, task) = connect(exports);
    c.greet(FLAG_C_FIXED_NEWSTYLE).await;
    c.s.write_all(&[0u8; 16]).await.unwrap();
    c.expect_closed().await;
    assert!(matches!(task.await.unwrap(), Err(NbdError::Protocol(_))));
}

#[tokio::test]
async fn opt_export_name_with_and_without_zeroes() {
    let (exports, _) = TestExports::one(MemDevice::new(8192));
    // Without NBD_FLAG_C_NO_ZEROES: size, flags and 124 zero bytes.
    let (mut c, _task) = connect(exports.clone());
    c.greet(FLAG_C_FIXED_NEWSTYLE).await;
    c.send_opt(OPT_EXPORT_NAME, b"disk").await;
    let mut b = [0xffu8; 10 + 124];
    c.s.read_exact(&mut b).await.unwrap();
    assert_eq!(be_u64(&b[0..8]), 8192);
    assert_eq!(be_u16(&b[8..10]), TRANSMISSION_FLAGS);
    assert!(b[10..].iter().all(|&x| x == 0));
    assert_eq!(c.write(1, 100, b"abc").await, 0);
    assert_eq!(c.read(2, 100, 3).await.unwrap(), b"abc");

    // With it: no zeroes; the first reply follows directly. Default export by "".
    let (mut c, _task) = connect(exports.clone());
    c.greet(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).await;
    c.send_opt(OPT_EXPORT_NAME, b"").await;
    let mut b = [0u8; 10];
    c.s.read_exact(&mut b).await.unwrap();
    assert_eq!(be_u64(&b[0..8]), 8192);
    assert_eq!(c.read(3, 100, 3).await.unwrap(), b"abc");

    // A plain (not fixed) newstyle client gets the same treatment.
    let (mut c, _task) = connect(exports.clone());
    c.greet(0).await;
    c.send_opt(OPT_EXPORT_NAME, b"disk").await;
    let mut b = [0xffu8; 10 + 124];
    c.s.read_exact(&mut b).await.unwrap();
    assert_eq!(be_u64(&b[0..8]), 8192);
    assert_eq!(c.read(4, 100, 3).await.unwrap(), b"abc");

    // Unknown export: the connection is closed (no error reply exists).
    let (mut c, task) = connect(exports);
    c.greet(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).await;
    c.send_opt(OPT_EXPORT_NAME, b"nope").await;
    c.expect_closed().await;
    assert!(matches!(task.await.unwrap(), Err(NbdError::UnknownExport(n)) if n == "nope"));
}

#[tokio::test]
async fn handshake_times_out() {
    let (exports, _) = TestExports::one(MemDevice::new(4096));
    let (client, server) = tokio::io::duplex(4096);
    let (r, w) = tokio::io::split(server);
    let task = tokio::spawn(server::run_connection(
        r,
        w,
        exports,
        transmission::Shutdown::never(),
        Duration::from_millis(200),
    ));
    let mut c = Client { s: client };
    c.greet(FLAG_C_FIXED_NEWSTYLE).await;
    // Negotiating, but never choosing an export.
    c.send_opt(OPT_LIST, &[]).await;
    assert_eq!(c.opt_reply().await.kind, REP_SERVER);
    assert_eq!(c.opt_reply().await.kind, REP_ACK);
    c.expect_closed().await;
    assert!(matches!(task.await.unwrap(), Err(NbdError::Protocol(_))));
}

#[tokio::test]
async fn opt_abort_is_acknowledged_then_closed() {
    let (exports, _) = TestExports::one(MemDevice::new(4096));
    let (mut c, task) = connect(exports);
    c.greet(FLAG_C_FIXED_NEWSTYLE).await;
    c.send_opt(OPT_ABORT, &[]).await;
    let r = c.opt_reply().await;
    assert_eq!((r.option, r.kind), (OPT_ABORT, REP_ACK));
    c.expect_closed().await;
    assert!(task.await.unwrap().is_ok());
}

// ---- Transmission --------------------------------------------------------------------------

#[tokio::test]
async fn read_write_roundtrip_and_out_of_range_read() {
    let (exports, dev) = TestExports::one(MemDevice::new(64 * 1024));
    let (mut c, _task) = connect(exports);
    let (size, _) = c.handshake("disk").await;
    assert_eq!(size, 64 * 1024);
    let data = pattern(8192, 3);
    assert_eq!(c.write(1, 4096, &data).await, 0);
    assert_eq!(dev.contents(4096, 8192), data);
    assert_eq!(c.read(2, 4096, 8192).await.unwrap(), data);

    // Past the end, straddling the end, and offset + length overflowing: EINVAL.
    assert_eq!(c.read(3, 64 * 1024, 1).await, Err(EINVAL));
    assert_eq!(c.read(4, 60 * 1024, 8192).await, Err(EINVAL));
    assert_eq!(c.read(5, u64::MAX - 10, 4096).await, Err(EINVAL));
    // Longer than the maximum block size: EINVAL, without the device seeing it.
    assert_eq!(c.read(6, 0, MAX_BLOCK_SIZE + 1).await, Err(EINVAL));
    // The connection still works, and the device saw none of the bad requests.
    assert_eq!(c.read(7, 4096, 16).await.unwrap(), data[..16]);
    assert_eq!(dev.started.load(Ordering::SeqCst), 3);
    // A read of the last byte works; a zero-length read is answered without the device.
    assert_eq!(c.read(8, 64 * 1024 - 1, 1).await.unwrap(), vec![0]);
    assert_eq!(c.read(9, 0, 0).await.unwrap(), Vec::<u8>::new());
    assert_eq!(dev.started.load(Ordering::SeqCst), 4);
}

#[tokio::test]
async fn write_past_end_is_enospc_and_payload_is_consumed() {
    let (exports, dev) = TestExports::one(MemDevice::new(16 * 1024));
    let (mut c, _task) = connect(exports);
    c.handshake("disk").await;
    assert_eq!(c.write(1, 12 * 1024, &[0xaa; 8192]).await, ENOSPC);
    assert_eq!(c.write(2, u64::MAX, &[0xaa; 16]).await, ENOSPC);
    // In sync: the payloads were consumed.
    assert_eq!(c.write(3, 0, &[0xbb; 512]).await, 0);
    assert_eq!(c.read(4, 0, 512).await.unwrap(), vec![0xbb; 512]);
    assert_eq!(dev.contents(12 * 1024, 4096), vec![0; 4096]);
    // Write-zeroes past the end is ENOSPC too; trim past the end is EINVAL (the protocol
    // document lists trim with read).
    assert_eq!(c.simple(CMD_WRITE_ZEROES, 0, 5, 16 * 1024, 1).await, ENOSPC);
    assert_eq!(c.simple(CMD_TRIM, 0, 6, 16 * 1024 - 1, 2).await, EINVAL);
    assert_eq!(c.read(7, 0, 4).await.unwrap(), vec![0xbb; 4]);
}

#[tokio::test]
async fn oversized_write_payload_is_skipped_and_absurd_one_closes() {
    let (exports, dev) = TestExports::one(MemDevice::new(1 << 20));
    let (mut c, task) = connect(exports);
    c.handshake("disk").await;
    let len = MAX_BLOCK_SIZE + 4096;
    let payload = vec![0x77u8; len as usize];
    c.request(CMD_WRITE, 0, 1, 0, len, &payload).await;
    let r = c.reply(0).await;
    assert_eq!((r.handle, r.error), (1, EINVAL));
    assert_eq!(c.write(2, 0, b"sync").await, 0);
    assert_eq!(c.read(3, 0, 4).await.unwrap(), b"sync");
    assert_eq!(dev.started.load(Ordering::SeqCst), 2);

    c.request(CMD_WRITE, 0, 4, 0, MAX_DISCARD_WRITE + 1, &[]).await;
    c.expect_closed().await;
    assert!(matches!(task.await.unwrap(), Err(NbdError::Protocol(_))));
}

#[tokio::test]
async fn unknown_command_and_bad_flags_are_einval_and_connection_continues() {
    let (exports, dev) = TestExports::one(MemDevice::new(4096));
    let (mut c, _task) = connect(exports);
    c.handshake("disk").await;
    assert_eq!(c.simple(99, 0, 1, 0, 0).await, EINVAL);
    assert_eq!(c.simple(CMD_BLOCK_STATUS, 0, 2, 0, 512).await, EINVAL);
    assert_eq!(c.simple(CMD_CACHE, 0, 3, 0, 512).await, EINVAL);
    // DF was not advertised (no structured replies), NO_HOLE is for write-zeroes only,
    // FAST_ZERO was not advertised, and 0x8000 is unknown.
    assert_eq!(c.simple(CMD_READ, CMD_FLAG_DF, 4, 0, 512).await, EINVAL);
    assert_eq!(c.simple(CMD_TRIM, CMD_FLAG_NO_HOLE, 5, 0, 512).await, EINVAL);
    assert_eq!(c.simple(CMD_WRITE_ZEROES, CMD_FLAG_FAST_ZERO, 6, 0, 512).await, EINVAL);
    assert_eq!(c.simple(CMD_FLUSH, 0x8000, 7, 0, 0).await, EINVAL);
    c.request(CMD_WRITE, CMD_FLAG_NO_HOLE, 8, 0, 4, b"abcd").await;
    assert_eq!(c.reply(0).await.error, EINVAL);
    assert_eq!(dev.started.load(Ordering::SeqCst), 0);
    // FUA is accepted on every command, even a read.
    c.request(CMD_READ, CMD_FLAG_FUA, 9, 0, 4, &[]).await;
    let r = c.reply(4).await;
    assert_eq!((r.error, r.data), (0, vec![0; 4]));
    assert_eq!(c.write(10, 0, b"ok").await, 0);
}

#[tokio::test]
async fn flush_trim_write_zeroes_and_fua() {
    let (exports, dev) = TestExports::one(MemDevice::new(64 * 1024));
    let (mut c, _task) = connect(exports);
    c.handshake("disk").await;
    assert_eq!(c.write(1, 0, &[0xcc; 65536]).await, 0);
    c.request(CMD_WRITE, CMD_FLAG_FUA, 2, 0, 4, b"fua!").await;
    assert_eq!(c.reply(0).await.error, 0);
    assert_eq!(dev.fua.load(Ordering::SeqCst), 1);
    assert_eq!(c.simple(CMD_FLUSH, 0, 3, 0, 0).await, 0);
    assert_eq!(dev.flushes.load(Ordering::SeqCst), 1);
    assert_eq!(c.simple(CMD_TRIM, CMD_FLAG_FUA, 4, 4096, 4096).await, 0);
    assert_eq!(dev.trims.load(Ordering::SeqCst), 1);
    assert_eq!(dev.fua.load(Ordering::SeqCst), 2);
    assert_eq!(c.read(5, 4096, 4096).await.unwrap(), vec![0; 4096]);
    assert_eq!(c.simple(CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE | CMD_FLAG_FUA, 6, 16384, 16384).await, 0);
    assert_eq!(dev.zeroes.load(Ordering::SeqCst), 1);
    assert_eq!(dev.contents(16384, 16384), vec![0; 16384]);
    assert_eq!(dev.contents(32768, 4), vec![0xcc; 4]);
    // Zero-length trim and write-zeroes succeed without calling the device.
    assert_eq!(c.simple(CMD_TRIM, 0, 7, 0, 0).await, 0);
    assert_eq!(c.simple(CMD_WRITE_ZEROES, 0, 8, 0, 0).await, 0);
    assert_eq!(dev.zeroes.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn device_errors_are_mapped_and_read_errors_carry_no_payload() {
    for (kind, errno) in [
        (BlockErrorKind::Io, EIO),
        (BlockErrorKind::ReadOnly, EPERM),
        (BlockErrorKind::NoSpace, ENOSPC),
        (BlockErrorKind::Unavailable, EIO),
        (BlockErrorKind::Invalid, EINVAL),
    ] {
        let hooks = Hooks { fail: Some(kind), ..Default::default() };
        let (exports, _) = TestExports::one(MemDevice::with_hooks(8192, hooks));
        let (mut c, _task) = connect(exports);
        c.handshake("disk").await;
        // If the failed read carried a payload the next reply would not parse.
        assert_eq!(c.read(1, 0, 4096).await, Err(errno));
        assert_eq!(c.write(2, 0, &[1; 4096]).await, errno);
        assert_eq!(c.simple(CMD_FLUSH, 0, 3, 0, 0).await, errno);
        assert_eq!(c.read(4, 0, 4096).await, Err(errno));
    }
}

#[tokio::test]
async fn short_read_and_panicking_device_give_eio() {
    for hooks in [Hooks { short_read: true, ..Default::default() }, Hooks { panic_on_read: true, ..Default::default() }]
    {
        let (exports, _) = TestExports::one(MemDevice::with_hooks(8192, hooks));
        let (mut c, _task) = connect(exports);
        c.handshake("disk").await;
        assert_eq!(c.read(1, 0, 4096).await, Err(EIO));
        assert_eq!(c.write(2, 0, b"still alive").await, 0);
    }
}

#[test]
fn errno_mapping() {
    assert_eq!(errno_for(BlockErrorKind::OutOfRange), 22);
    assert_eq!(errno_for(BlockErrorKind::Invalid), 22);
    assert_eq!(errno_for(BlockErrorKind::Io), 5);
    assert_eq!(errno_for(BlockErrorKind::ReadOnly), 1);
    assert_eq!(errno_for(BlockErrorKind::Unavailable), 5);
    assert_eq!(errno_for(BlockErrorKind::NoSpace), 28);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_are_in_flight_together() {
    // Every write waits until 32 writes are waiting at once: this completes only if the
    // server has (at least) 32 requests of one connection in flight.
    let hooks = Hooks { write_barrier: Some(Arc::new(Barrier::new(32))), ..Default::default() };
    let (exports, dev) = TestExports::one(MemDevice::with_hooks(1 << 20, hooks));
    let (mut c, _task) = connect(exports);
    c.handshake("disk").await;
    let (mut rd, mut wr) = tokio::io::split(c.s);
    let writer = tokio::spawn(async move {
        let mut b = Vec::new();
        for i in 0..64u64 {
            let data = pattern(4096, i as u8);
            let r = Request { magic: REQUEST_MAGIC, flags: 0, kind: CMD_WRITE, handle: i, offset: i * 4096, len: 4096 };
            b.extend_from_slice(&r.encode());
            b.extend_from_slice(&data);
        }
        wr.write_all(&b).await.unwrap();
        wr
    });
    let mut c = Client { s: &mut rd };
    let mut writes = Vec::new();
    timeout(T, async {
        for _ in 0..64 {
            let r = c.reply(0).await;
            assert_eq!(r.error, 0);
            writes.push(r.handle);
        }
    })
    .await
    .expect("pipelined writes did not complete");
    writes.sort_unstable();
    assert_eq!(writes, (0..64).collect::<Vec<_>>());
    let mut wr = writer.await.unwrap();
    let mut b = Vec::new();
    for i in 0..64u64 {
        let r =
            Request { magic: REQUEST_MAGIC, flags: 0, kind: CMD_READ, handle: 1000 + i, offset: i * 4096, len: 4096 };
        b.extend_from_slice(&r.encode());
    }
    wr.write_all(&b).await.unwrap();
    // Reads come back in any order, each with its own data.
    let mut reads = Vec::new();
    for _ in 0..64 {
        let r = timeout(T, c.reply(4096)).await.unwrap();
        assert_eq!(r.error, 0);
        let i = r.handle - 1000;
        assert_eq!(r.data, pattern(4096, i as u8), "read {i}");
        reads.push(i);
    }
    reads.sort_unstable();
    assert_eq!(reads, (0..64).collect::<Vec<_>>());
    assert_eq!(dev.contents(5 * 4096, 4096), pattern(4096, 5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_in_flight_are_bounded_by_count() {
    let gate = Arc::new(Semaphore::new(0));
    let hooks = Hooks { gate: Some(gate.clone()), ..Default::default() };
    let (exports, dev) = TestExports::one(MemDevice::with_hooks(1 << 20, hooks));
    let (mut c, _task) = connect(exports);
    c.handshake("disk").await;
    let n = MAX_IN_FLIGHT as u64 + 44;
    for i in 0..n {
        c.request(CMD_READ, 0, i, (i % 256) * 4096, 4096, &[]).await;
    }
    wait_until(|| dev.started.load(Ordering::SeqCst) >= MAX_IN_FLIGHT).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(dev.started.load(Ordering::SeqCst), MAX_IN_FLIGHT);
    gate.add_permits(n as usize);
    let mut handles = Vec::new();
    for _ in 0..n {
        let r = timeout(T, c.reply(4096)).await.unwrap();
        assert_eq!(r.error, 0);
        handles.push(r.handle);
    }
    handles.sort_unstable();
    assert_eq!(handles, (0..n).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_in_flight_are_bounded_by_bytes() {
    let gate = Arc::new(Semaphore::new(0));
    let hooks = Hooks { gate: Some(gate.clone()), ..Default::default() };
    let (exports, dev) = TestExports::one(MemDevice::with_hooks(4 << 20, hooks));
    let (mut c, _task) = connect(exports);
    c.handshake("disk").await;
    let len = 4u32 << 20;
    for i in 0..20 {
        c.request(CMD_READ, 0, i, 0, len, &[]).await;
    }
    let expected = MAX_BYTES_IN_FLIGHT / len as usize;
    wait_until(|| dev.started.load(Ordering::SeqCst) >= expected).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(dev.started.load(Ordering::SeqCst), expected);
    gate.add_permits(20);
    for _ in 0..20 {
        let r = timeout(T, c.reply(len as usize)).await.unwrap();
        assert_eq!(r.error, 0);
    }
}

async fn wait_until(cond: impl Fn() -> bool) {
    timeout(T, async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("condition not reached");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disc_finishes_requests_in_flight_then_closes() {
    let gate = Arc::new(Semaphore::new(0));
    let hooks = Hooks { gate: Some(gate.clone()), ..Default::default() };
    let (exports, dev) = TestExports::one(MemDevice::with_hooks(1 << 20, hooks));
    let (mut c, task) = connect(exports);
    c.handshake("disk").await;
    for i in 0..10u64 {
        c.request(CMD_WRITE, 0, i, i * 512, 512, &[i as u8 + 1; 512]).await;
    }
    c.request(CMD_DISC, 0, 99, 0, 0, &[]).await;
    wait_until(|| dev.started.load(Ordering::SeqCst) == 10).await;
    gate.add_permits(10);
    let mut handles = Vec::new();
    for _ in 0..10 {
        let r = timeout(T, c.reply(0)).await.unwrap();
        assert_eq!(r.error, 0);
        handles.push(r.handle);
    }
    handles.sort_unstable();
    assert_eq!(handles, (0..10).collect::<Vec<_>>());
    c.expect_closed().await;
    assert!(task.await.unwrap().is_ok());
    for i in 0..10usize {
        assert_eq!(dev.contents(i * 512, 512), vec![i as u8 + 1; 512]);
    }
}

#[tokio::test]
async fn client_hangup_mid_request_ends_connection() {
    let (exports, _) = TestExports::one(MemDevice::new(4096));
    let (mut c, task) = connect(exports);
    c.handshake("disk").await;
    c.request(CMD_WRITE, 0, 1, 0, 4096, &[1; 100]).await;
    drop(c);
    assert!(matches!(task.await.unwrap(), Err(NbdError::Io(_))));
}

// ---- Listener --------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_request_magic_closes_only_that_connection() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nbd.sock");
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    let (exports, _) = TestExports::one(MemDevice::new(1 << 16));
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve_unix(listener, exports, stop_rx));

    let mut a = Client { s: tokio::net::UnixStream::connect(&path).await.unwrap() };
    a.handshake("disk").await;
    assert_eq!(a.write(1, 0, b"first").await, 0);
    let mut bad =
        Request { magic: 0xdead_beef, flags: 0, kind: CMD_READ, handle: 2, offset: 0, len: 5 }.encode().to_vec();
    bad.extend_from_slice(&[0; 64]);
    a.s.write_all(&bad).await.unwrap();
    a.expect_closed().await;

    let mut b = Client { s: tokio::net::UnixStream::connect(&path).await.unwrap() };
    b.handshake("").await;
    assert_eq!(b.read(1, 0, 5).await.unwrap(), b"first");
    b.request(CMD_DISC, 0, 2, 0, 0, &[]).await;
    b.expect_closed().await;

    stop_tx.send(()).unwrap();
    timeout(T, server).await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_requests_in_flight_and_closes_connections() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nbd.sock");
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    let gate = Arc::new(Semaphore::new(0));
    let hooks = Hooks { gate: Some(gate.clone()), ..Default::default() };
    let (exports, dev) = TestExports::one(MemDevice::with_hooks(1 << 16, hooks));
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve_unix(listener, exports, stop_rx));

    let mut c = Client { s: tokio::net::UnixStream::connect(&path).await.unwrap() };
    c.handshake("disk").await;
    c.request(CMD_READ, 0, 1, 0, 512, &[]).await;
    wait_until(|| dev.started.load(Ordering::SeqCst) == 1).await;
    // An idle connection still negotiating is closed too.
    let mut idle = tokio::net::UnixStream::connect(&path).await.unwrap();
    let mut g = [0u8; GREETING_LEN];
    idle.read_exact(&mut g).await.unwrap();

    stop_tx.send(()).unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!server.is_finished(), "must wait for the request in flight");
    gate.add_permits(1);
    let r = timeout(T, c.reply(512)).await.unwrap();
    assert_eq!((r.handle, r.error), (1, 0));
    c.expect_closed().await;
    Client { s: idle }.expect_closed().await;
    timeout(T, server).await.unwrap().unwrap();
    assert!(tokio::net::UnixStream::connect(&path).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_tcp_on_loopback() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (exports, _) = TestExports::one(MemDevice::new(1 << 16));
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve_tcp(listener, exports, stop_rx));
    let mut c = Client { s: tokio::net::TcpStream::connect(addr).await.unwrap() };
    c.handshake("disk").await;
    let data = pattern(65536, 9);
    assert_eq!(c.write(1, 0, &data).await, 0);
    assert_eq!(c.read(2, 0, 65536).await.unwrap(), data);
    stop_tx.send(()).unwrap();
    c.expect_closed().await;
    timeout(T, server).await.unwrap().unwrap();
}
