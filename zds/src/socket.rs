use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::time::Duration;

use nix::sys::socket::{
    accept4, bind, connect, listen, recvmsg, sendmsg, socket, AddressFamily, Backlog,
    ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType, UnixAddr,
};
use prost::Message;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use crate::proto::*;
use crate::ZdsError;

const MAX_DATAGRAM: usize = 64 * 1024;
pub const ACK_TIMEOUT: Duration = Duration::from_secs(5);

fn seqpacket() -> std::io::Result<OwnedFd> {
    Ok(socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?)
}

fn register(fd: OwnedFd) -> std::io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: the AsyncFd owns the OwnedFd, so the fd outlives its registration.
    unsafe { AsyncFd::register(fd) }.map_err(|e| e.into_parts().1)
}

/// One end of a ZDS connection: datagram send/receive with optional fds.
struct Dgram(AsyncFd<OwnedFd>);

impl Dgram {
    async fn send(&self, bytes: &[u8], fd: Option<BorrowedFd<'_>>) -> Result<(), ZdsError> {
        let fds: Vec<RawFd> = fd.iter().map(|f| f.as_raw_fd()).collect();
        let cmsgs: Vec<ControlMessage> = if fds.is_empty() {
            vec![]
        } else {
            vec![ControlMessage::ScmRights(&fds)]
        };
        self.0
            .async_io(Interest::WRITABLE, |s| {
                sendmsg::<()>(
                    s.as_raw_fd(),
                    &[IoSlice::new(bytes)],
                    &cmsgs,
                    MsgFlags::MSG_NOSIGNAL,
                    None,
                )
                .map_err(std::io::Error::from)
            })
            .await?;
        Ok(())
    }

    async fn recv(&self) -> Result<(Vec<u8>, Vec<OwnedFd>), ZdsError> {
        let mut buf = vec![0u8; MAX_DATAGRAM];
        let (n, fds, truncated) = self
            .0
            .async_io(Interest::READABLE, |s| {
                let mut cmsg = nix::cmsg_space!([RawFd; 4]);
                let mut iov = [IoSliceMut::new(&mut buf)];
                let msg = recvmsg::<()>(
                    s.as_raw_fd(),
                    &mut iov,
                    Some(&mut cmsg),
                    MsgFlags::MSG_CMSG_CLOEXEC,
                )
                .map_err(std::io::Error::from)?;
                let mut fds = Vec::new();
                for c in msg.cmsgs().map_err(std::io::Error::from)? {
                    if let ControlMessageOwned::ScmRights(raw) = c {
                        // SAFETY: the kernel just installed these fds for us; we own them.
                        fds.extend(raw.into_iter().map(|f| unsafe { OwnedFd::from_raw_fd(f) }));
                    }
                }
                let truncated = msg
                    .flags
                    .intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC);
                Ok((msg.bytes, fds, truncated))
            })
            .await?;
        if n == 0 && fds.is_empty() {
            return Err(ZdsError::Closed);
        }
        if truncated {
            return Err(ZdsError::Protocol("datagram or its fds truncated".into()));
        }
        buf.truncate(n);
        Ok((buf, fds))
    }
}

/// ztunnel's end.
pub struct ZdsClient(Dgram);

impl ZdsClient {
    /// Connects and says hello (V1).
    pub async fn connect(path: &Path) -> Result<Self, ZdsError> {
        let fd = seqpacket()?;
        let addr = UnixAddr::new(path).map_err(std::io::Error::from)?;
        connect(fd.as_raw_fd(), &addr).map_err(std::io::Error::from)?;
        let c = ZdsClient(Dgram(register(fd)?));
        c.0.send(
            &ZdsHello {
                version: Version::V1 as i32,
            }
            .encode_to_vec(),
            None,
        )
        .await?;
        Ok(c)
    }

    /// The next request, checked against the datagram rules: `add` carries
    /// exactly one fd (the pod netns), nothing else carries any.
    pub async fn recv(&self) -> Result<(Payload, Option<OwnedFd>), ZdsError> {
        let (bytes, mut fds) = self.0.recv().await?;
        let req = WorkloadRequest::decode(bytes.as_slice())?;
        let payload = req
            .payload
            .ok_or_else(|| ZdsError::Protocol("request without payload".into()))?;
        match (&payload, fds.len()) {
            (Payload::Add(_), 1) => Ok((payload, fds.pop())),
            (Payload::Add(a), n) => Err(ZdsError::Protocol(format!(
                "add {} carries {n} fds, want 1",
                a.uid
            ))),
            (_, 0) => Ok((payload, None)),
            (_, n) => Err(ZdsError::Protocol(format!(
                "{payload:?} carries {n} fds, want 0"
            ))),
        }
    }

    pub async fn ack(&self, error: Option<String>) -> Result<(), ZdsError> {
        let resp = WorkloadResponse {
            payload: Some(ResponsePayload::Ack(Ack {
                error: error.unwrap_or_default(),
            })),
        };
        self.0.send(&resp.encode_to_vec(), None).await
    }
}

/// The node agent's listening socket.
pub struct ZdsServer(AsyncFd<OwnedFd>);

impl ZdsServer {
    pub fn bind(path: &Path) -> Result<Self, ZdsError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let _ = std::fs::remove_file(path);
        let fd = seqpacket()?;
        let addr = UnixAddr::new(path).map_err(std::io::Error::from)?;
        bind(fd.as_raw_fd(), &addr).map_err(std::io::Error::from)?;
        listen(&fd, Backlog::new(8).map_err(std::io::Error::from)?)
            .map_err(std::io::Error::from)?;
        Ok(ZdsServer(register(fd)?))
    }

    /// Accepts a ztunnel and reads its hello.
    pub async fn accept(&self) -> Result<ZdsConn, ZdsError> {
        let fd = self
            .0
            .async_io(Interest::READABLE, |s| {
                accept4(
                    s.as_raw_fd(),
                    SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
                )
                .map_err(std::io::Error::from)
            })
            .await?;
        // SAFETY: accept4 returned a fresh fd that nothing else owns.
        let conn = Dgram(register(unsafe { OwnedFd::from_raw_fd(fd) })?);
        let (bytes, fds) = conn.recv().await?;
        let hello = ZdsHello::decode(bytes.as_slice())?;
        if hello.version != Version::V1 as i32 || !fds.is_empty() {
            return Err(ZdsError::Protocol(format!("unexpected hello {hello:?}")));
        }
        Ok(ZdsConn(conn))
    }
}

/// The agent's side of one ztunnel connection: lockstep request/ack.
pub struct ZdsConn(Dgram);

impl ZdsConn {
    async fn call(&self, payload: Payload, fd: Option<BorrowedFd<'_>>) -> Result<(), ZdsError> {
        let bytes = WorkloadRequest {
            payload: Some(payload),
        }
        .encode_to_vec();
        self.call_raw(&bytes, fd).await
    }

    pub async fn add(
        &self,
        uid: &str,
        info: WorkloadInfo,
        netns: &impl AsFd,
    ) -> Result<(), ZdsError> {
        self.call(
            Payload::Add(AddWorkload {
                uid: uid.into(),
                workload_info: Some(info),
            }),
            Some(netns.as_fd()),
        )
        .await
    }

    pub async fn del(&self, uid: &str) -> Result<(), ZdsError> {
        self.call(Payload::Del(DelWorkload { uid: uid.into() }), None)
            .await
    }

    pub async fn keep(&self, uid: &str) -> Result<(), ZdsError> {
        self.call(Payload::Keep(KeepWorkload { uid: uid.into() }), None)
            .await
    }

    pub async fn snapshot_sent(&self) -> Result<(), ZdsError> {
        self.call(Payload::SnapshotSent(SnapshotSent {}), None)
            .await
    }

    /// Sends raw bytes and fds, for tests of the protocol rules.
    pub async fn call_raw(&self, bytes: &[u8], fd: Option<BorrowedFd<'_>>) -> Result<(), ZdsError> {
        self.0.send(bytes, fd).await?;
        let (bytes, _) = tokio::time::timeout(ACK_TIMEOUT, self.0.recv())
            .await
            .map_err(|_| ZdsError::Timeout(ACK_TIMEOUT))??;
        match WorkloadResponse::decode(bytes.as_slice())?.payload {
            Some(ResponsePayload::Ack(a)) if a.error.is_empty() => Ok(()),
            Some(ResponsePayload::Ack(a)) => Err(ZdsError::Nack(a.error)),
            None => Err(ZdsError::Protocol("response without payload".into())),
        }
    }
}
