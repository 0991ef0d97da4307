//! Batched UDP for the media paths (Linux): `recvmmsg`/`sendmmsg` move a batch of datagrams per
//! system call, and each received datagram carries the time the kernel stamped it on arrival
//! (`SO_TIMESTAMPNS`) and, when enabled, the socket's count of datagrams dropped for a full
//! buffer (`SO_RXQ_OVFL`).
//!
//! Kernel arrival times let a thread that reads its sockets once per media tick still see when
//! each packet really arrived (for RFC 3550 jitter and the jitter buffer), and let a load
//! generator measure a peer's pacing without its own scheduling in the figures.
//!
//! Written against `libc`: std and tokio have no batched or control-message receive, and this
//! is the few dozen lines the media paths need (nix's `recvmmsg` wraps the same calls with a
//! heavier API).

use std::io;
use std::mem::{size_of, zeroed};
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Largest datagram a batch slot holds (bigger ones are cut and reported as such).
pub const MAX_DATAGRAM: usize = 2048;

/// A destination address in the form the kernel takes.
#[derive(Clone, Copy)]
pub struct Destination {
    storage: libc::sockaddr_storage,
    len: libc::socklen_t,
}

impl std::fmt::Debug for Destination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Destination({:?})", from_sockaddr(&self.storage))
    }
}

impl From<SocketAddr> for Destination {
    fn from(addr: SocketAddr) -> Self {
        // SAFETY: all zeroes is a valid sockaddr_storage; the writes below stay within it
        // (sockaddr_in and sockaddr_in6 are smaller than sockaddr_storage).
        unsafe {
            let mut storage: libc::sockaddr_storage = zeroed();
            let len = match addr {
                SocketAddr::V4(v4) => {
                    let sin = &mut *(&mut storage as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in>();
                    sin.sin_family = libc::AF_INET as libc::sa_family_t;
                    sin.sin_port = v4.port().to_be();
                    sin.sin_addr = libc::in_addr { s_addr: u32::from_ne_bytes(v4.ip().octets()) };
                    size_of::<libc::sockaddr_in>()
                }
                SocketAddr::V6(v6) => {
                    let sin6 = &mut *(&mut storage as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in6>();
                    sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
                    sin6.sin6_port = v6.port().to_be();
                    sin6.sin6_addr = libc::in6_addr { s6_addr: v6.ip().octets() };
                    sin6.sin6_scope_id = v6.scope_id();
                    size_of::<libc::sockaddr_in6>()
                }
            };
            Self { storage, len: len as libc::socklen_t }
        }
    }
}

fn from_sockaddr(storage: &libc::sockaddr_storage) -> Option<SocketAddr> {
    // SAFETY: the family says which struct the kernel (or `Destination::from`) wrote.
    unsafe {
        match i32::from(storage.ss_family) {
            libc::AF_INET => {
                let sin = &*(storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>();
                let ip = std::net::Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes());
                Some(SocketAddr::from((ip, u16::from_be(sin.sin_port))))
            }
            libc::AF_INET6 => {
                let sin6 = &*(storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>();
                let ip = std::net::Ipv6Addr::from(sin6.sin6_addr.s6_addr);
                Some(SocketAddr::V6(std::net::SocketAddrV6::new(
                    ip,
                    u16::from_be(sin6.sin6_port),
                    0,
                    sin6.sin6_scope_id,
                )))
            }
            _ => None,
        }
    }
}

fn setsockopt(fd: RawFd, option: libc::c_int, value: libc::c_int) -> io::Result<()> {
    // SAFETY: `value` outlives the call and its size is passed.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            option,
            (&value as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

/// Asks the kernel to stamp each datagram's arrival time (`SO_TIMESTAMPNS`).
///
/// Linux switches arrival stamping on for the whole host when the first socket asks, through a
/// deferred work item: for a few milliseconds after that first request, datagrams are stamped
/// when they are read instead (seen in CI, where the test below ran first on a fresh machine).
/// Later sockets are stamped on arrival from the start.
pub fn enable_timestamps(fd: RawFd) -> io::Result<()> {
    setsockopt(fd, libc::SO_TIMESTAMPNS, 1)
}

/// Asks the kernel to attach the socket's drop counter to received datagrams (`SO_RXQ_OVFL`).
pub fn enable_drop_counter(fd: RawFd) -> io::Result<()> {
    setsockopt(fd, libc::SO_RXQ_OVFL, 1)
}

/// Sets the receive and send buffer sizes, beyond `net.core.[rw]mem_max` when the process may
/// (`CAP_NET_ADMIN`: the FORCE options), else as far as the limits allow.
pub fn set_buffer_sizes(fd: RawFd, bytes: usize) {
    let size = bytes.min(i32::MAX as usize) as libc::c_int;
    if setsockopt(fd, libc::SO_RCVBUFFORCE, size).is_err() {
        let _ = setsockopt(fd, libc::SO_RCVBUF, size);
    }
    if setsockopt(fd, libc::SO_SNDBUFFORCE, size).is_err() {
        let _ = setsockopt(fd, libc::SO_SNDBUF, size);
    }
}

/// Converts kernel arrival stamps (wall clock) to [`Instant`]s, from one reading of both
/// clocks.
#[derive(Debug, Clone, Copy)]
pub struct ArrivalClock {
    instant: Instant,
    wall_ns: i128,
}

impl ArrivalClock {
    /// Reads both clocks now.
    pub fn now() -> Self {
        let wall_ns = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as i128);
        Self { instant: Instant::now(), wall_ns }
    }

    /// The monotonic clock as it was read.
    pub fn instant(&self) -> Instant {
        self.instant
    }

    /// When a datagram stamped `wall_ns` arrived (never later than the reading).
    pub fn arrival(&self, wall_ns: i64) -> Instant {
        let ago = (self.wall_ns - i128::from(wall_ns)).max(0);
        self.instant.checked_sub(Duration::from_nanos(ago.min(u64::MAX as i128) as u64)).unwrap_or(self.instant)
    }
}

/// One received datagram.
#[derive(Debug)]
pub struct Received<'a> {
    /// Its source.
    pub from: Option<SocketAddr>,
    /// Its bytes (cut at [`MAX_DATAGRAM`]).
    pub data: &'a mut [u8],
    /// Kernel arrival time, ns since the Unix epoch (0 without `SO_TIMESTAMPNS`).
    pub arrival_ns: i64,
    /// The socket's drop counter, when `SO_RXQ_OVFL` is on and the kernel attached it.
    pub drops: Option<u32>,
}

/// Buffers and headers for one `sendmmsg` or `recvmmsg` batch of up to `capacity` datagrams.
pub struct Batch {
    bufs: Vec<[u8; MAX_DATAGRAM]>,
    lens: Vec<usize>,
    names: Vec<libc::sockaddr_storage>,
    name_lens: Vec<libc::socklen_t>,
    control: Vec<[u64; 16]>,
    iovs: Vec<libc::iovec>,
    headers: Vec<libc::mmsghdr>,
    filled: usize,
}

impl std::fmt::Debug for Batch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batch").field("capacity", &self.bufs.len()).field("filled", &self.filled).finish()
    }
}

// SAFETY: the raw pointers in `iovs` and `headers` point into this batch's own buffers; they are
// rebuilt immediately before every system call and never followed otherwise, so moving the
// batch to another thread is sound.
unsafe impl Send for Batch {}

impl Batch {
    /// A batch of up to `capacity` datagrams (at least one).
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        Self {
            bufs: vec![[0; MAX_DATAGRAM]; capacity],
            lens: vec![0; capacity],
            // SAFETY: plain C structs; all zeroes (null pointers, zero lengths) is valid.
            names: vec![unsafe { zeroed() }; capacity],
            name_lens: vec![0; capacity],
            control: vec![[0; 16]; capacity],
            iovs: vec![unsafe { zeroed() }; capacity],
            headers: vec![unsafe { zeroed() }; capacity],
            filled: 0,
        }
    }

    /// Datagrams queued for sending.
    pub fn len(&self) -> usize {
        self.filled
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.filled == 0
    }

    /// Whether the batch is full (send it before queueing more).
    pub fn is_full(&self) -> bool {
        self.filled == self.bufs.len()
    }

    /// Queues a datagram to `to`: `write` fills the buffer and returns the length (0 queues
    /// nothing). Returns false when the batch is full.
    pub fn queue(&mut self, to: &Destination, write: impl FnOnce(&mut [u8]) -> usize) -> bool {
        if self.is_full() {
            return false;
        }
        let len = write(&mut self.bufs[self.filled]).min(MAX_DATAGRAM);
        if len > 0 {
            self.lens[self.filled] = len;
            self.names[self.filled] = to.storage;
            self.name_lens[self.filled] = to.len;
            self.filled += 1;
        }
        true
    }

    fn prepare(&mut self, count: usize, receiving: bool) {
        for i in 0..count {
            self.iovs[i] = libc::iovec {
                iov_base: self.bufs[i].as_mut_ptr().cast(),
                iov_len: if receiving { MAX_DATAGRAM } else { self.lens[i] },
            };
            // SAFETY: plain C struct.
            let mut header: libc::mmsghdr = unsafe { zeroed() };
            header.msg_hdr.msg_name = (&mut self.names[i] as *mut libc::sockaddr_storage).cast();
            header.msg_hdr.msg_namelen =
                if receiving { size_of::<libc::sockaddr_storage>() as libc::socklen_t } else { self.name_lens[i] };
            header.msg_hdr.msg_iov = &mut self.iovs[i];
            header.msg_hdr.msg_iovlen = 1;
            if receiving {
                header.msg_hdr.msg_control = self.control[i].as_mut_ptr().cast();
                header.msg_hdr.msg_controllen = size_of::<[u64; 16]>() as _;
            }
            self.headers[i] = header;
        }
    }

    /// Sends everything queued on `fd` and empties the batch. A full send buffer is waited out
    /// (50 µs at a time) rather than dropped; a datagram the kernel refuses (unreachable port,
    /// and the like) is skipped. Returns how many were refused.
    pub fn send(&mut self, fd: RawFd) -> u64 {
        let total = self.filled;
        self.prepare(total, false);
        let mut done = 0;
        let mut refused = 0;
        while done < total {
            // SAFETY: headers[done..total] point into buffers owned by self, alive for the call.
            let n = unsafe { libc::sendmmsg(fd, self.headers[done..].as_mut_ptr(), (total - done) as u32, 0) };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_micros(50)),
                    io::ErrorKind::Interrupted => {}
                    _ => {
                        refused += 1;
                        done += 1;
                    }
                }
                continue;
            }
            done += n as usize;
        }
        self.filled = 0;
        refused
    }

    /// Receives what is queued on `fd`, up to the batch's capacity, without waiting. Returns
    /// how many datagrams arrived (0 when none was waiting); read them with
    /// [`Batch::received`].
    pub fn receive(&mut self, fd: RawFd) -> io::Result<usize> {
        let capacity = self.bufs.len();
        self.prepare(capacity, true);
        self.filled = 0;
        // SAFETY: every header points into buffers owned by self, alive for the call.
        let n = unsafe {
            libc::recvmmsg(fd, self.headers.as_mut_ptr(), capacity as u32, libc::MSG_DONTWAIT, std::ptr::null_mut())
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::WouldBlock { Ok(0) } else { Err(e) };
        }
        Ok(n as usize)
    }

    /// Datagram `i` of the last [`Batch::receive`].
    pub fn received(&mut self, i: usize) -> Received<'_> {
        let header = &self.headers[i];
        let len = (header.msg_len as usize).min(MAX_DATAGRAM);
        let from = from_sockaddr(&self.names[i]);
        let mut arrival_ns = 0;
        let mut drops = None;
        let msg = &header.msg_hdr;
        // SAFETY: the kernel filled msg_control/msg_controllen for this datagram; the CMSG
        // macros walk within it and the reads are unaligned-safe.
        unsafe {
            let mut cmsg = libc::CMSG_FIRSTHDR(msg);
            while !cmsg.is_null() {
                let c = &*cmsg;
                if c.cmsg_level == libc::SOL_SOCKET && c.cmsg_type == libc::SCM_TIMESTAMPNS {
                    let ts: libc::timespec = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast());
                    arrival_ns = ts.tv_sec * 1_000_000_000 + ts.tv_nsec;
                } else if c.cmsg_level == libc::SOL_SOCKET && c.cmsg_type == libc::SO_RXQ_OVFL {
                    drops = Some(std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<u32>()));
                }
                cmsg = libc::CMSG_NXTHDR(msg, cmsg);
            }
        }
        Received { from, data: &mut self.bufs[i][..len], arrival_ns, drops }
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;

    use super::*;

    #[test]
    fn destinations_round_trip() {
        for addr in ["127.0.0.1:4000", "[::1]:5004"] {
            let addr: SocketAddr = addr.parse().expect("address");
            assert_eq!(from_sockaddr(&Destination::from(addr).storage), Some(addr));
        }
    }

    #[test]
    fn a_batch_goes_out_and_comes_back_with_arrival_times() {
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        enable_timestamps(rx.as_raw_fd()).expect("SO_TIMESTAMPNS");
        enable_drop_counter(rx.as_raw_fd()).expect("SO_RXQ_OVFL");
        // The first socket on the host to ask switches stamping on asynchronously (see
        // `enable_timestamps`): give it a moment, as a media host has long before its calls.
        std::thread::sleep(Duration::from_millis(200));
        let to = Destination::from(rx.local_addr().expect("addr"));
        let mut out = Batch::new(4);
        for i in 0..3u8 {
            assert!(out.queue(&to, |buf| {
                buf[..3].copy_from_slice(&[i, i, i]);
                3
            }));
        }
        assert_eq!(out.len(), 3);
        assert_eq!(out.send(tx.as_raw_fd()), 0);
        assert!(out.is_empty());
        let clock_before = ArrivalClock::now();
        std::thread::sleep(Duration::from_millis(20));
        let clock = ArrivalClock::now();
        let mut inbox = Batch::new(8);
        assert_eq!(inbox.receive(rx.as_raw_fd()).expect("receive"), 3);
        for i in 0..3u8 {
            let got = inbox.received(usize::from(i));
            assert_eq!(got.data, &[i, i, i]);
            assert_eq!(got.from, Some(tx.local_addr().expect("addr")));
            assert!(got.arrival_ns > 0, "the kernel stamped it");
            let arrival = clock.arrival(got.arrival_ns);
            // Arrived about 20 ms before the second reading, after the first.
            assert!(arrival <= clock.instant - Duration::from_millis(15), "{:?}", clock.instant - arrival);
            assert!(arrival + Duration::from_millis(5) >= clock_before.instant);
        }
        assert_eq!(inbox.receive(rx.as_raw_fd()).expect("nothing waiting"), 0);
    }
}
