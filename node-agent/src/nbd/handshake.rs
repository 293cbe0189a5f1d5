//! Fixed newstyle negotiation (the handshake phase).

use std::io;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tracing::{debug, warn};

use super::proto::{self, OptHeader};
use super::{
    ExportInfo, Exports, MAX_BLOCK_SIZE, MAX_DISCARD_OPTION, MAX_OPTION_LEN, MIN_BLOCK_SIZE, NbdError,
    PREFERRED_BLOCK_SIZE, TRANSMISSION_FLAGS,
};
use crate::block::BlockDevice;

/// Handshake flags the server offers.
const HANDSHAKE_FLAGS: u16 = proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES;

/// The outcome of a successful negotiation: the export to serve.
pub(crate) struct Negotiated<D> {
    pub device: Arc<D>,
    pub name: String,
}

/// Runs the handshake. Returns `Ok(None)` when the client ends the session during
/// negotiation (`NBD_OPT_ABORT` or hanging up between options), `Ok(Some(_))` when the
/// client entered the transmission phase.
pub(crate) async fn negotiate<R, W, E>(
    reader: &mut R,
    writer: &mut W,
    exports: &E,
) -> Result<Option<Negotiated<E::Device>>, NbdError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
    E: Exports,
{
    writer.write_all(&proto::greeting(HANDSHAKE_FLAGS)).await?;
    writer.flush().await?;

    let mut flags = [0u8; 4];
    if !read_or_eof(reader, &mut flags).await? {
        debug!("client hung up before sending its flags");
        return Ok(None);
    }
    let client_flags = u32::from_be_bytes(flags);
    if client_flags & !proto::KNOWN_CLIENT_FLAGS != 0 {
        warn!(client_flags, "client sent unknown handshake flags; closing");
        return Err(NbdError::Protocol(format!("unknown client flags {client_flags:#x}")));
    }
    // A client without NBD_FLAG_C_FIXED_NEWSTYLE speaks plain newstyle, which only has
    // NBD_OPT_EXPORT_NAME; serving it the same way is harmless, so it is not refused.
    let no_zeroes = client_flags & proto::FLAG_C_NO_ZEROES != 0;

    let mut data = Vec::new();
    let mut out = Vec::new();
    loop {
        let mut hdr = [0u8; proto::OPT_HEADER_LEN];
        if !read_or_eof(reader, &mut hdr).await? {
            debug!("client hung up during negotiation");
            return Ok(None);
        }
        let hdr = OptHeader::parse(&hdr);
        if hdr.magic != proto::IHAVEOPT {
            warn!(magic = hdr.magic, "bad option magic; closing");
            return Err(NbdError::Protocol(format!("bad option magic {:#018x}", hdr.magic)));
        }
        let option = hdr.option;
        let name = proto::option_name(option);
        debug!(option, name, len = hdr.len, "option");

        if hdr.len > MAX_OPTION_LEN {
            if option == proto::OPT_EXPORT_NAME || hdr.len > MAX_DISCARD_OPTION {
                // NBD_OPT_EXPORT_NAME has no error reply; anything past the discard limit
                // is treated as a denial-of-service attempt.
                warn!(option, len = hdr.len, "option payload too long; closing");
                return Err(NbdError::Protocol(format!("{name} with {} bytes of data", hdr.len)));
            }
            warn!(option, len = hdr.len, "option payload too long; skipping it");
            discard(reader, u64::from(hdr.len)).await?;
            proto::put_opt_reply(&mut out, option, proto::REP_ERR_TOO_BIG, b"option data too long");
            send(writer, &mut out).await?;
            continue;
        }

        data.clear();
        data.resize(hdr.len as usize, 0);
        reader.read_exact(&mut data).await?;

        match option {
            proto::OPT_EXPORT_NAME => {
                let Ok(export) = std::str::from_utf8(&data) else {
                    warn!("NBD_OPT_EXPORT_NAME with a name that is not UTF-8; closing");
                    return Err(NbdError::Protocol("export name is not UTF-8".into()));
                };
                let Some(device) = exports.lookup(export) else {
                    warn!(export, "NBD_OPT_EXPORT_NAME for an unknown export; closing");
                    return Err(NbdError::UnknownExport(export.to_owned()));
                };
                // 8 bytes size, 2 bytes flags, then (unless NO_ZEROES) 124 zero bytes.
                out.extend_from_slice(&device.size().to_be_bytes());
                out.extend_from_slice(&TRANSMISSION_FLAGS.to_be_bytes());
                if !no_zeroes {
                    out.resize(out.len() + 124, 0);
                }
                send(writer, &mut out).await?;
                debug!(export, "entering transmission (NBD_OPT_EXPORT_NAME)");
                return Ok(Some(Negotiated { device, name: export.to_owned() }));
            }
            proto::OPT_ABORT => {
                // The client may already have closed its end; a failed reply is fine.
                proto::put_opt_reply(&mut out, option, proto::REP_ACK, b"");
                let _ = send(writer, &mut out).await;
                debug!("client aborted negotiation");
                return Ok(None);
            }
            proto::OPT_LIST => {
                if data.is_empty() {
                    for ExportInfo { name, description } in exports.list() {
                        let mut payload = Vec::with_capacity(4 + name.len() + description.len());
                        payload.extend_from_slice(&(name.len() as u32).to_be_bytes());
                        payload.extend_from_slice(name.as_bytes());
                        payload.extend_from_slice(description.as_bytes());
                        proto::put_opt_reply(&mut out, option, proto::REP_SERVER, &payload);
                    }
                    proto::put_opt_reply(&mut out, option, proto::REP_ACK, b"");
                } else {
                    proto::put_opt_reply(&mut out, option, proto::REP_ERR_INVALID, b"NBD_OPT_LIST takes no data");
                }
                send(writer, &mut out).await?;
            }
            proto::OPT_INFO | proto::OPT_GO => {
                let go = option == proto::OPT_GO;
                match parse_info_request(&data) {
                    Err(msg) => {
                        warn!(option, "malformed {name}: {msg}");
                        proto::put_opt_reply(&mut out, option, proto::REP_ERR_INVALID, msg.as_bytes());
                    }
                    Ok((export, requests)) => match exports.lookup(export) {
                        None => {
                            debug!(export, "{name} for an unknown export");
                            let msg = format!("unknown export {export:?}");
                            proto::put_opt_reply(&mut out, option, proto::REP_ERR_UNKNOWN, msg.as_bytes());
                        }
                        Some(device) => {
                            put_export_info(&mut out, option, exports, export, &device, &requests);
                            proto::put_opt_reply(&mut out, option, proto::REP_ACK, b"");
                            if go {
                                send(writer, &mut out).await?;
                                debug!(export, "entering transmission (NBD_OPT_GO)");
                                return Ok(Some(Negotiated { device, name: export.to_owned() }));
                            }
                        }
                    },
                }
                send(writer, &mut out).await?;
            }
            _ => {
                // Includes NBD_OPT_STRUCTURED_REPLY (simple replies only), NBD_OPT_STARTTLS
                // (no TLS), the meta-context options and NBD_OPT_EXTENDED_HEADERS.
                let msg = format!("{name} ({option}) is not supported by this server");
                proto::put_opt_reply(&mut out, option, proto::REP_ERR_UNSUP, msg.as_bytes());
                send(writer, &mut out).await?;
            }
        }
    }
}

/// Parses the data of `NBD_OPT_INFO` / `NBD_OPT_GO`: name length, name, number of
/// information requests, requests.
fn parse_info_request(data: &[u8]) -> Result<(&str, Vec<u16>), String> {
    if data.len() < 6 {
        return Err(format!("option data too short ({} bytes)", data.len()));
    }
    let name_len = proto::be_u32(&data[0..4]) as usize;
    if name_len > data.len() - 6 {
        return Err(format!("export name length {name_len} exceeds the option data"));
    }
    let name = std::str::from_utf8(&data[4..4 + name_len]).map_err(|_| "export name is not UTF-8".to_owned())?;
    let rest = &data[4 + name_len..];
    let count = proto::be_u16(&rest[0..2]) as usize;
    let list = &rest[2..];
    if list.len() != count * 2 {
        return Err(format!("{count} information requests announced but {} bytes of them sent", list.len()));
    }
    let requests = list.chunks_exact(2).map(proto::be_u16).collect();
    Ok((name, requests))
}

/// Appends the `NBD_REP_INFO` replies for an export.
fn put_export_info<E: Exports>(
    out: &mut Vec<u8>,
    option: u32,
    exports: &E,
    requested_name: &str,
    device: &Arc<E::Device>,
    requests: &[u16],
) {
    let mut payload = Vec::with_capacity(16);
    payload.extend_from_slice(&proto::INFO_EXPORT.to_be_bytes());
    payload.extend_from_slice(&device.size().to_be_bytes());
    payload.extend_from_slice(&TRANSMISSION_FLAGS.to_be_bytes());
    proto::put_opt_reply(out, option, proto::REP_INFO, &payload);

    // Sent whether or not it was asked for (the protocol allows it); a client that did
    // not ask is still told the limits the server enforces.
    payload.clear();
    payload.extend_from_slice(&proto::INFO_BLOCK_SIZE.to_be_bytes());
    payload.extend_from_slice(&MIN_BLOCK_SIZE.to_be_bytes());
    payload.extend_from_slice(&PREFERRED_BLOCK_SIZE.to_be_bytes());
    payload.extend_from_slice(&MAX_BLOCK_SIZE.to_be_bytes());
    proto::put_opt_reply(out, option, proto::REP_INFO, &payload);

    let want_name = requests.contains(&proto::INFO_NAME);
    let want_description = requests.contains(&proto::INFO_DESCRIPTION);
    if !want_name && !want_description {
        return;
    }
    // The canonical entry is the listed export that resolves to the same device (the
    // client may have used the empty default name, or an alias).
    let entry = exports
        .list()
        .into_iter()
        .find(|e| e.name == requested_name || exports.lookup(&e.name).is_some_and(|d| Arc::ptr_eq(&d, device)));
    if want_name {
        let name = entry.as_ref().map_or(requested_name, |e| e.name.as_str());
        payload.clear();
        payload.extend_from_slice(&proto::INFO_NAME.to_be_bytes());
        payload.extend_from_slice(name.as_bytes());
        proto::put_opt_reply(out, option, proto::REP_INFO, &payload);
    }
    if want_description && let Some(e) = entry.as_ref().filter(|e| !e.description.is_empty()) {
        payload.clear();
        payload.extend_from_slice(&proto::INFO_DESCRIPTION.to_be_bytes());
        payload.extend_from_slice(e.description.as_bytes());
        proto::put_opt_reply(out, option, proto::REP_INFO, &payload);
    }
}

/// Writes and flushes `out`, then clears it.
async fn send<W: AsyncWrite + Unpin>(writer: &mut W, out: &mut Vec<u8>) -> io::Result<()> {
    writer.write_all(out).await?;
    writer.flush().await?;
    out.clear();
    Ok(())
}

/// Fills `buf`, or returns `Ok(false)` if the stream ends before the first byte.
pub(crate) async fn read_or_eof<R: AsyncRead + Unpin>(reader: &mut R, buf: &mut [u8]) -> io::Result<bool> {
    let n = reader.read(buf).await?;
    if n == 0 {
        return Ok(false);
    }
    reader.read_exact(&mut buf[n..]).await?;
    Ok(true)
}

/// Reads and throws away `len` bytes, in small pieces.
pub(crate) async fn discard<R: AsyncRead + Unpin>(reader: &mut R, len: u64) -> io::Result<()> {
    let copied = tokio::io::copy(&mut (&mut *reader).take(len), &mut tokio::io::sink()).await?;
    if copied < len {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "stream ended inside a payload"));
    }
    Ok(())
}
