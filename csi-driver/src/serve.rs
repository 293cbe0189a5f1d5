//! Serving CSI (and reaching node agents) over unix sockets, the transport kubelet and
//! the sidecars use.

use std::path::{Path, PathBuf};

use crate::error::CsiError;

/// The socket path of a CSI endpoint given as `unix:///path/csi.sock`, `unix:/path` or a
/// plain absolute path.
pub fn socket_path(endpoint: &str) -> Result<PathBuf, CsiError> {
    let p = endpoint.strip_prefix("unix://").or_else(|| endpoint.strip_prefix("unix:")).unwrap_or(endpoint);
    if !p.starts_with('/') {
        return Err(CsiError::InvalidArgument(format!(
            "endpoint {endpoint:?}: expected unix:///absolute/path or an absolute path"
        )));
    }
    Ok(PathBuf::from(p))
}

/// Binds a unix socket, replacing a stale socket file left by an earlier process (but
/// never another kind of file), and creating the parent directory.
pub fn bind(path: &Path) -> std::io::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::FileTypeExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path)?,
        Ok(_) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    tokio::net::UnixListener::bind(path)
}

/// A gRPC channel to a unix socket.
pub async fn channel(path: &Path) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    let path = path.to_owned();
    tonic::transport::Endpoint::from_static("http://peersan.invalid")
        .connect_timeout(std::time::Duration::from_secs(5))
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tokio::net::UnixStream::connect(path).await?))
            }
        }))
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        assert_eq!(socket_path("unix:///csi/csi.sock").unwrap(), PathBuf::from("/csi/csi.sock"));
        assert_eq!(socket_path("unix:/csi/csi.sock").unwrap(), PathBuf::from("/csi/csi.sock"));
        assert_eq!(socket_path("/csi/csi.sock").unwrap(), PathBuf::from("/csi/csi.sock"));
        assert!(socket_path("tcp://1.2.3.4:5").is_err());
        assert!(socket_path("csi.sock").is_err());
    }
}
