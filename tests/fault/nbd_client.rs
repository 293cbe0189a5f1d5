//! A small NBD client over a unix socket: fixed newstyle handshake, `NBD_OPT_GO`, then
//! pipelined `READ`, `WRITE` (optionally FUA) and `FLUSH` with simple replies. Every request
//! has its own handle and its own outcome: the server's error code, or the loss of the
//! connection (which fails every request still waiting).

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::oneshot;

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const FLAG_FIXED_NEWSTYLE: u16 = 1;
const FLAG_NO_ZEROES: u16 = 2;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const INFO_EXPORT: u16 = 0;
const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_FLUSH: u16 = 3;
const CMD_FLAG_FUA: u16 = 1;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NbdError {
    /// The server answered with this error code (an errno value).
    Server(u32),
    /// The connection broke before the answer arrived.
    Disconnected(String),
}

impl std::fmt::Display for NbdError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NbdError::Server(e) => write!(f, "server error {e}"),
            NbdError::Disconnected(why) => write!(f, "connection lost: {why}"),
        }
    }
}

type Reply = Result<Vec<u8>, NbdError>;

#[derive(Default)]
struct Pending {
    /// Handle -> (bytes of data that follow a successful reply, who waits for it).
    waiting: HashMap<u64, (u32, oneshot::Sender<Reply>)>,
    /// Set once the connection is lost; later requests fail at once.
    dead: Option<String>,
}

impl Pending {
    fn fail_all(&mut self, why: &str) {
        if self.dead.is_none() {
            self.dead = Some(why.to_owned());
        }
        for (_, (_, tx)) in self.waiting.drain() {
            let _ = tx.send(Err(NbdError::Disconnected(why.to_owned())));
        }
    }
}

pub struct NbdClient {
    pub size: u64,
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    pending: Arc<Mutex<Pending>>,
    next_handle: AtomicU64,
    reader: tokio::task::JoinHandle<()>,
}

fn proto_err(what: impl Into<String>) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, what.into())
}

impl NbdClient {
    /// Connects to `socket` and negotiates `export` with `NBD_OPT_GO`.
    pub async fn connect(socket: &Path, export: &str) -> std::io::Result<NbdClient> {
        let mut s = UnixStream::connect(socket).await?;
        let mut greeting = [0u8; 18];
        s.read_exact(&mut greeting).await?;
        let magic = u64::from_be_bytes(greeting[0..8].try_into().unwrap());
        let opt = u64::from_be_bytes(greeting[8..16].try_into().unwrap());
        let flags = u16::from_be_bytes(greeting[16..18].try_into().unwrap());
        if magic != NBDMAGIC || opt != IHAVEOPT || flags & FLAG_FIXED_NEWSTYLE == 0 {
            return Err(proto_err(format!("not a fixed newstyle NBD server: {greeting:02x?}")));
        }
        let client_flags = u32::from(flags & (FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES));
        let mut req = Vec::new();
        req.extend_from_slice(&client_flags.to_be_bytes());
        // NBD_OPT_GO: name length, name, no information requests.
        let mut data = Vec::new();
        data.extend_from_slice(&(export.len() as u32).to_be_bytes());
        data.extend_from_slice(export.as_bytes());
        data.extend_from_slice(&0u16.to_be_bytes());
        req.extend_from_slice(&IHAVEOPT.to_be_bytes());
        req.extend_from_slice(&OPT_GO.to_be_bytes());
        req.extend_from_slice(&(data.len() as u32).to_be_bytes());
        req.extend_from_slice(&data);
        s.write_all(&req).await?;

        let mut size = None;
        loop {
            let mut hdr = [0u8; 20];
            s.read_exact(&mut hdr).await?;
            let magic = u64::from_be_bytes(hdr[0..8].try_into().unwrap());
            let option = u32::from_be_bytes(hdr[8..12].try_into().unwrap());
            let kind = u32::from_be_bytes(hdr[12..16].try_into().unwrap());
            let len = u32::from_be_bytes(hdr[16..20].try_into().unwrap());
            if magic != OPT_REPLY_MAGIC || option != OPT_GO {
                return Err(proto_err(format!("bad option reply {hdr:02x?}")));
            }
            let mut payload = vec![0u8; len as usize];
            s.read_exact(&mut payload).await?;
            match kind {
                REP_ACK => break,
                REP_INFO if payload.len() >= 12 && u16::from_be_bytes([payload[0], payload[1]]) == INFO_EXPORT => {
                    size = Some(u64::from_be_bytes(payload[2..10].try_into().unwrap()));
                }
                REP_INFO => {}
                _ if kind & (1 << 31) != 0 => {
                    return Err(std::io::Error::other(format!(
                        "NBD_OPT_GO refused ({kind:#x}): {}",
                        String::from_utf8_lossy(&payload)
                    )));
                }
                _ => return Err(proto_err(format!("unexpected option reply type {kind}"))),
            }
        }
        let size = size.ok_or_else(|| proto_err("no NBD_INFO_EXPORT before NBD_REP_ACK"))?;

        let (rd, wr) = s.into_split();
        let pending = Arc::new(Mutex::new(Pending::default()));
        let reader = tokio::spawn(read_replies(rd, pending.clone()));
        Ok(NbdClient { size, writer: tokio::sync::Mutex::new(wr), pending, next_handle: AtomicU64::new(1), reader })
    }

    /// Whether the connection is known to be lost.
    pub fn is_dead(&self) -> bool {
        self.pending.lock().unwrap().dead.is_some()
    }

    async fn request(&self, kind: u16, flags: u16, offset: u64, len: u32, data: &[u8]) -> Reply {
        let handle = self.next_handle.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut p = self.pending.lock().unwrap();
            if let Some(why) = &p.dead {
                return Err(NbdError::Disconnected(why.clone()));
            }
            let expect = if kind == CMD_READ { len } else { 0 };
            p.waiting.insert(handle, (expect, tx));
        }
        let mut hdr = [0u8; 28];
        hdr[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        hdr[4..6].copy_from_slice(&flags.to_be_bytes());
        hdr[6..8].copy_from_slice(&kind.to_be_bytes());
        hdr[8..16].copy_from_slice(&handle.to_be_bytes());
        hdr[16..24].copy_from_slice(&offset.to_be_bytes());
        hdr[24..28].copy_from_slice(&len.to_be_bytes());
        let sent = {
            let mut w = self.writer.lock().await;
            match w.write_all(&hdr).await {
                Ok(()) if !data.is_empty() => w.write_all(data).await,
                r => r,
            }
        };
        if let Err(e) = sent {
            // A request cut in the middle leaves the stream unusable.
            self.pending.lock().unwrap().fail_all(&format!("send: {e}"));
        }
        rx.await.unwrap_or_else(|_| Err(NbdError::Disconnected("reply channel closed".into())))
    }

    pub async fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), NbdError> {
        let flags = if fua { CMD_FLAG_FUA } else { 0 };
        self.request(CMD_WRITE, flags, offset, data.len() as u32, data).await.map(|_| ())
    }

    pub async fn read(&self, offset: u64, len: u32) -> Result<Vec<u8>, NbdError> {
        self.request(CMD_READ, 0, offset, len, &[]).await
    }

    pub async fn flush(&self) -> Result<(), NbdError> {
        self.request(CMD_FLUSH, 0, 0, 0, &[]).await.map(|_| ())
    }
}

/// Reads the whole export `export` (`size` bytes) through the NBD socket `socket`, 1 MiB at a
/// time with eight reads in flight.
pub async fn read_export(socket: &Path, export: &str, size: u64) -> Result<Vec<u8>, String> {
    use futures::StreamExt;
    const CHUNK: u64 = 1 << 20;
    let c = tokio::time::timeout(std::time::Duration::from_secs(10), NbdClient::connect(socket, export))
        .await
        .map_err(|_| "NBD handshake timed out".to_string())?
        .map_err(|e| format!("NBD connect: {e}"))?;
    if c.size != size {
        return Err(format!("export size {} instead of {size}", c.size));
    }
    let chunks: Vec<Result<Vec<u8>, _>> = tokio::time::timeout(
        std::time::Duration::from_secs(60),
        futures::stream::iter(0..size.div_ceil(CHUNK))
            .map(|k| c.read(k * CHUNK, CHUNK.min(size - k * CHUNK) as u32))
            .buffered(8)
            .collect(),
    )
    .await
    .map_err(|_| "reading the volume took more than 60 s".to_string())?;
    let mut out = Vec::with_capacity(size as usize);
    for (k, r) in chunks.into_iter().enumerate() {
        out.extend_from_slice(&r.map_err(|e| format!("read at {}: {e}", k as u64 * CHUNK))?);
    }
    Ok(out)
}

impl Drop for NbdClient {
    fn drop(&mut self) {
        self.reader.abort();
        self.pending.lock().unwrap().fail_all("client closed");
    }
}

async fn read_replies(mut rd: tokio::net::unix::OwnedReadHalf, pending: Arc<Mutex<Pending>>) {
    let why = loop {
        let mut hdr = [0u8; 16];
        if let Err(e) = rd.read_exact(&mut hdr).await {
            break format!("receive: {e}");
        }
        let magic = u32::from_be_bytes(hdr[0..4].try_into().unwrap());
        let error = u32::from_be_bytes(hdr[4..8].try_into().unwrap());
        let handle = u64::from_be_bytes(hdr[8..16].try_into().unwrap());
        if magic != SIMPLE_REPLY_MAGIC {
            break format!("bad reply magic {magic:#x}");
        }
        let Some((expect, tx)) = pending.lock().unwrap().waiting.remove(&handle) else {
            break format!("reply for unknown handle {handle}");
        };
        if error != 0 {
            let _ = tx.send(Err(NbdError::Server(error)));
            continue;
        }
        let mut data = vec![0u8; expect as usize];
        if let Err(e) = rd.read_exact(&mut data).await {
            let why = format!("receive read data: {e}");
            let _ = tx.send(Err(NbdError::Disconnected(why.clone())));
            break why;
        }
        let _ = tx.send(Ok(data));
    };
    pending.lock().unwrap().fail_all(&why);
}
