//! Process-level series every proxy exports, refreshed at scrape time:
//! the `process_*` family and `istio_tcp_sockets_open`, which Istio's
//! ztunnel dashboard plots beside the connection counters.

use std::os::fd::BorrowedFd;

pub struct ProcessMetrics(metrics_process::Collector);

impl ProcessMetrics {
    pub fn new() -> Self {
        let c = metrics_process::Collector::default();
        c.describe();
        ProcessMetrics(c)
    }

    pub fn collect(&self) {
        self.0.collect();
        if let Some(n) = tcp_sockets() {
            metrics::gauge!("istio_tcp_sockets_open").set(n as f64);
        }
    }
}

impl Default for ProcessMetrics {
    fn default() -> Self {
        Self::new()
    }
}

/// TCP sockets this process holds, whatever network namespace each lives
/// in (ztunnel's sit in every pod's): counted from the fd table, so the
/// data path keeps no counter (the scrape runs on a blocking thread,
/// `admin::serve`). None when /proc is not readable.
fn tcp_sockets() -> Option<usize> {
    let mut n = 0;
    for entry in std::fs::read_dir("/proc/self/fd").ok()?.flatten() {
        let Some(fd) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        // SAFETY: the number comes from our own fd table and getsockopt only
        // reads. One closed since the listing fails with EBADF; one reused
        // since is counted as what it now is: a miscount of one, not misuse.
        let fd = unsafe { BorrowedFd::borrow_raw(fd) };
        if is_tcp(fd) {
            n += 1;
        }
    }
    Some(n)
}

fn is_tcp(fd: BorrowedFd) -> bool {
    socket2::SockRef::from(&fd)
        .protocol()
        .is_ok_and(|p| p == Some(socket2::Protocol::TCP))
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    #[test]
    fn counts_tcp_sockets_not_others() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        let u = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let f = std::fs::File::open("/proc/self/status").unwrap();
        for tcp in [l.as_fd(), c.as_fd(), s.as_fd()] {
            assert!(super::is_tcp(tcp));
        }
        assert!(!super::is_tcp(u.as_fd()));
        assert!(!super::is_tcp(f.as_fd()));
        // Other tests of this process may hold more, never fewer than ours.
        assert!(super::tcp_sockets().unwrap() >= 3);
    }
}
