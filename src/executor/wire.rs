//! What the appliance and a pooled sandbox's first process say to each other over the
//! sandbox's control socket (its stdin, one end of a Unix socket pair): descriptors passed
//! with a message (`SCM_RIGHTS`), and the fixed-size records of a sandbox that serves
//! one evaluation's tests (the helper's serve mode and the sandbox's sessions).
//!
//! A test is asked for with [`REQUEST_BYTES`] bytes (its CPU seconds) and three
//! descriptors (its stdin, stdout and stderr); the answer is [`REPLY_BYTES`] bytes saying
//! how the test's process ended and what it used. Nothing here allocates per message
//! beyond the descriptors.

use std::io::Read;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

/// A test request: its CPU seconds (u64, little-endian); stdin, stdout, stderr ride along.
pub const REQUEST_BYTES: usize = 8;
/// A test's answer: six little-endian i64 (see [`Reply`]).
pub const REPLY_BYTES: usize = 48;

/// How a test's process ended, as the sandbox's first process saw it (`wait4`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Reply {
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    /// Peak resident set size of the test's largest process, in KiB.
    pub max_rss_kb: u64,
    pub user_ms: u64,
    pub sys_ms: u64,
    /// The sandbox cannot serve another test (it could not clean up after this one).
    pub spent: bool,
}

impl Reply {
    pub fn encode(&self) -> [u8; REPLY_BYTES] {
        let (kind, value) = match (self.exit_code, self.signal) {
            (Some(c), _) => (0i64, c as i64),
            (None, Some(s)) => (1, s as i64),
            (None, None) => (2, 0),
        };
        let mut out = [0u8; REPLY_BYTES];
        for (i, v) in [
            kind,
            value,
            self.max_rss_kb as i64,
            self.user_ms as i64,
            self.sys_ms as i64,
            self.spent as i64,
        ]
        .iter()
        .enumerate()
        {
            out[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
        }
        out
    }

    pub fn decode(b: &[u8; REPLY_BYTES]) -> Reply {
        let v = |i: usize| {
            let mut x = [0u8; 8];
            x.copy_from_slice(&b[i * 8..i * 8 + 8]);
            i64::from_le_bytes(x)
        };
        let (kind, value) = (v(0), v(1));
        Reply {
            exit_code: (kind == 0).then_some(value as i32),
            signal: (kind == 1).then_some(value as i32),
            max_rss_kb: v(2).max(0) as u64,
            user_ms: v(3).max(0) as u64,
            sys_ms: v(4).max(0) as u64,
            spent: v(5) != 0,
        }
    }
}

/// Send `data` on the socket `fd` with `fds` attached to its first byte; returns how
/// many bytes went (the rest is the caller's to write). Never raises SIGPIPE.
pub fn send_with_fds(fd: RawFd, data: &[u8], fds: &[RawFd]) -> std::io::Result<usize> {
    let payload = std::mem::size_of_val(fds);
    // SAFETY: CMSG_SPACE is a pure computation.
    let space = unsafe { libc::CMSG_SPACE(payload as u32) } as usize;
    let mut control = vec![0u64; space.div_ceil(8).max(1)];
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: a zeroed msghdr is a valid empty one.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        // SAFETY: the control buffer holds one header with room for `payload` bytes
        // (CMSG_SPACE), so the first header and its data are inside it.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(payload as u32) as _;
            std::ptr::copy_nonoverlapping(
                fds.as_ptr().cast::<u8>(),
                libc::CMSG_DATA(cmsg),
                payload,
            );
        }
    }
    loop {
        // SAFETY: msg points at live buffers for the duration of the call.
        let n = unsafe { libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Fill `buf` from the (blocking) socket `fd`, taking the descriptors that came with its
/// first bytes (at most `max_fds`, close-on-exec). `Ok(None)`: the other end closed
/// before anything came. More descriptors than `max_fds` is an error (the kernel closes
/// those it could not deliver).
pub fn recv_with_fds(
    fd: RawFd,
    buf: &mut [u8],
    max_fds: usize,
) -> Result<Option<Vec<OwnedFd>>, String> {
    let payload = max_fds * std::mem::size_of::<RawFd>();
    // SAFETY: CMSG_SPACE is a pure computation.
    let space = unsafe { libc::CMSG_SPACE(payload as u32) } as usize;
    let mut control = vec![0u64; space.div_ceil(8).max(1)];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: a zeroed msghdr is a valid empty one.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    let n = loop {
        // SAFETY: msg points at live buffers for the duration of the call.
        let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n >= 0 {
            break n as usize;
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(format!("cannot read the control socket: {e}"));
        }
    };
    let mut fds = Vec::new();
    // SAFETY: walking the control messages the kernel wrote into `control`, within
    // msg_controllen; each SCM_RIGHTS descriptor is new and ours.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let len = (*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                let data = libc::CMSG_DATA(cmsg);
                for i in 0..len / std::mem::size_of::<RawFd>() {
                    let raw = std::ptr::read_unaligned(
                        data.add(i * std::mem::size_of::<RawFd>()).cast::<RawFd>(),
                    );
                    fds.push(OwnedFd::from_raw_fd(raw));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    // The buffer is padded to a word, so it may hold one more than asked for.
    if msg.msg_flags & libc::MSG_CTRUNC != 0 || fds.len() > max_fds {
        return Err(format!("more than {max_fds} descriptors were sent"));
    }
    if n == 0 {
        return Ok(None);
    }
    // SAFETY: `fd` stays open; ManuallyDrop leaves it so.
    let mut f = std::mem::ManuallyDrop::new(unsafe { std::fs::File::from_raw_fd(fd) });
    f.read_exact(&mut buf[n..])
        .map_err(|e| format!("a cut message on the control socket: {e}"))?;
    Ok(Some(fds))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn replies_round_trip() {
        for r in [
            Reply {
                exit_code: Some(3),
                signal: None,
                max_rss_kb: 1234,
                user_ms: 5,
                sys_ms: 6,
                spent: true,
            },
            Reply {
                exit_code: None,
                signal: Some(9),
                ..Reply::default()
            },
            Reply::default(),
        ] {
            assert_eq!(Reply::decode(&r.encode()), r);
        }
    }

    #[test]
    fn descriptors_travel_with_the_message() {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let (r, w) = std::io::pipe().unwrap();
        let sent =
            send_with_fds(a.as_raw_fd(), b"12345678", &[r.as_raw_fd(), w.as_raw_fd()]).unwrap();
        assert_eq!(sent, 8);
        let mut buf = [0u8; 8];
        let fds = recv_with_fds(b.as_raw_fd(), &mut buf, 3).unwrap().unwrap();
        assert_eq!(&buf, b"12345678");
        assert_eq!(fds.len(), 2);
        // Too many descriptors for the receiver is an error, not a silent loss.
        send_with_fds(a.as_raw_fd(), b"x", &[r.as_raw_fd(), w.as_raw_fd()]).unwrap();
        let mut one = [0u8; 1];
        assert!(recv_with_fds(b.as_raw_fd(), &mut one, 1).is_err());
        drop(a);
        assert!(recv_with_fds(b.as_raw_fd(), &mut one, 1).unwrap().is_none());
    }
}
