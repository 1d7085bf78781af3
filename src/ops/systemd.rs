//! systemd integration without a library: `sd_notify` over the `$NOTIFY_SOCKET` datagram
//! socket (READY=1, STATUS=, WATCHDOG=1, STOPPING=1) and the watchdog interval from
//! `$WATCHDOG_USEC`. Outside systemd every call is a no-op.
//!
//! Kept by hand rather than the `sd-notify` crate: its 0.5 connects `$NOTIFY_SOCKET` as a
//! filesystem path, so the abstract sockets (`@...`) that systemd hands to services of
//! user managers and containers are never reached; this reaches both (tested below).

use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

/// Send one notification (e.g. `"READY=1\nSTATUS=serving"`). Returns whether it was sent.
pub fn notify(state: &str) -> bool {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return false;
    };
    let path = path.to_string_lossy().into_owned();
    let addr = if let Some(name) = path.strip_prefix('@') {
        use std::os::linux::net::SocketAddrExt;
        SocketAddr::from_abstract_name(name.as_bytes())
    } else {
        SocketAddr::from_pathname(&path)
    };
    let Ok(addr) = addr else { return false };
    let Ok(sock) = UnixDatagram::unbound() else {
        return false;
    };
    sock.send_to_addr(state.as_bytes(), &addr).is_ok()
}

/// How often systemd expects `WATCHDOG=1`, if the watchdog is on for this process.
pub fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.parse::<u32>().ok()? != std::process::id() {
            return None;
        }
    }
    (usec > 0).then(|| Duration::from_micros(usec))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notifications_reach_the_socket() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("notify");
        let server = UnixDatagram::bind(&path).expect("bind");
        // SAFETY (edition 2021): test-local variable, read back in this thread only.
        std::env::set_var("NOTIFY_SOCKET", &path);
        assert!(notify("READY=1\nSTATUS=ok"));
        std::env::remove_var("NOTIFY_SOCKET");
        let mut buf = [0u8; 64];
        let n = server.recv(&mut buf).expect("recv");
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=ok");
        assert!(!notify("READY=1"), "no socket, no notification");

        // An abstract socket (`@name`), as systemd gives services of user managers and
        // containers. In the same test: both change the process's environment.
        use std::os::linux::net::SocketAddrExt;
        let name = format!("crucible-test-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).expect("abstract name");
        let server = UnixDatagram::bind_addr(&addr).expect("bind");
        std::env::set_var("NOTIFY_SOCKET", format!("@{name}"));
        let sent = notify("WATCHDOG=1");
        std::env::remove_var("NOTIFY_SOCKET");
        assert!(sent);
        let n = server.recv(&mut buf).expect("recv");
        assert_eq!(&buf[..n], b"WATCHDOG=1");
    }
}
