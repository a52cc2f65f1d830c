//! The control socket's client half: connect, send one request, read its
//! replies (the server half is the daemon's, in `crate::daemon`).

use std::{
    io::{BufRead, BufReader},
    os::unix::net::UnixStream,
    path::Path,
    time::Duration,
};

use super::protocol::{Reply, Request};

/// Why a request could not be answered.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing listens there: no daemon, or a stale socket.
    #[error("cannot reach the limiter daemon at {path} (is `limiter run` running?)")]
    Connect {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The socket (or a directory on its way) is not this user's to use:
    /// the daemon may well be running.
    #[error(
        "permission denied on the control socket {path}: run as root, or as a member of the group the daemon was given with --control-group"
    )]
    Denied { path: String },
    #[error("talking to the daemon at {path}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the daemon sent a reply that is not valid: {0}")]
    Protocol(String),
    /// The daemon hung up: it stopped, or it would not answer.
    #[error("the daemon closed the connection to {path}")]
    Closed { path: String },
    #[error("{0}")]
    Refused(String),
}

/// Sends one request and returns the daemon's answer.
pub fn request(path: &Path, request: &Request) -> Result<serde_json::Value, ClientError> {
    let mut replies = Replies::open(path, request, Some(Duration::from_secs(30)))?;
    match replies.next_reply()? {
        Reply::Ok(value) => Ok(value),
        Reply::Error(message) => Err(ClientError::Refused(message)),
        other => Err(ClientError::Protocol(format!("unexpected {other:?}"))),
    }
}

/// The replies to one request, read line by line (a followed event stream
/// sends many).
pub struct Replies {
    reader: BufReader<UnixStream>,
    path: String,
}

impl Replies {
    /// Connects, sends `request`, and waits at most `timeout` for each
    /// reply (`None`: forever, for streams).
    pub fn open(
        path: &Path,
        request: &Request,
        timeout: Option<Duration>,
    ) -> Result<Replies, ClientError> {
        let shown = path.display().to_string();
        let io = |source| ClientError::Io {
            path: shown.clone(),
            source,
        };
        let stream = UnixStream::connect(path).map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                ClientError::Connect {
                    path: shown.clone(),
                    source,
                }
            }
            std::io::ErrorKind::PermissionDenied => ClientError::Denied {
                path: shown.clone(),
            },
            _ => io(source),
        })?;
        stream.set_read_timeout(timeout).map_err(io)?;
        let mut line =
            serde_json::to_string(request).map_err(|e| ClientError::Protocol(e.to_string()))?;
        line.push('\n');
        send(&stream, line.as_bytes()).map_err(io)?;
        Ok(Replies {
            reader: BufReader::new(stream),
            path: shown,
        })
    }

    /// The next reply.
    pub fn next_reply(&mut self) -> Result<Reply, ClientError> {
        let mut line = String::new();
        let read = self
            .reader
            .read_line(&mut line)
            .map_err(|source| ClientError::Io {
                path: self.path.clone(),
                source,
            })?;
        if read == 0 {
            return Err(ClientError::Closed {
                path: self.path.clone(),
            });
        }
        serde_json::from_str(&line).map_err(|e| ClientError::Protocol(e.to_string()))
    }
}

/// Writes `bytes` with MSG_NOSIGNAL: the CLI's commands die quietly of
/// SIGPIPE when their reader goes away (see `cli::main`), but a daemon
/// that hung up must be an error said in words, not that.
fn send(stream: &UnixStream, mut bytes: &[u8]) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    while !bytes.is_empty() {
        // SAFETY: the pointer and length are those of a live slice, and the
        // fd is the stream's, open for as long as it is borrowed.
        let sent = unsafe {
            libc::send(
                stream.as_raw_fd(),
                bytes.as_ptr().cast(),
                bytes.len(),
                libc::MSG_NOSIGNAL,
            )
        };
        match sent {
            0 => return Err(std::io::ErrorKind::WriteZero.into()),
            n if n > 0 => bytes = &bytes[n.unsigned_abs()..],
            _ => {
                let error = std::io::Error::last_os_error();
                if error.kind() != std::io::ErrorKind::Interrupted {
                    return Err(error);
                }
            }
        }
    }
    Ok(())
}
