//! Offloads that take the per-packet cost out of the device:
//!
//! - **TUN TSO** (`IFF_VNET_HDR` + `TUNSETOFFLOAD`): the kernel hands the
//!   device whole TCP super-packets (up to 64 KiB) with a virtio-net header
//!   instead of one read per segment; [`segments`] cuts them into MTU-sized
//!   TCP/IPv4 segments in user space (sequence numbers, IP ids, flags and
//!   both checksums fixed up), which are then encrypted one by one.
//! - **UDP GSO** (`UDP_SEGMENT`): the encrypted segments of one super-packet
//!   leave in one `sendmsg`; the kernel splits them into datagrams.
//! - **UDP GRO** (`UDP_GRO`): one `recvmsg` returns a run of datagrams from
//!   one sender, split again by their size.

use std::{
    io,
    net::{SocketAddr, UdpSocket},
    os::fd::AsRawFd as _,
};

/// Size of the virtio-net header the TUN device prefixes.
pub const VNET_HDR_LEN: usize = 10;
const VIRTIO_NET_HDR_F_NEEDS_CSUM: u8 = 1;
const VIRTIO_NET_HDR_GSO_NONE: u8 = 0;
const VIRTIO_NET_HDR_GSO_TCPV4: u8 = 1;
const UDP_SEGMENT: libc::c_int = 103;
const UDP_GRO: libc::c_int = 104;

/// The parts of a virtio-net header we use.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VnetHdr {
    pub flags: u8,
    pub gso_type: u8,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
}

impl VnetHdr {
    pub fn parse(b: &[u8]) -> Option<Self> {
        let b = b.get(..VNET_HDR_LEN)?;
        let u16le = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        Some(Self {
            flags: b[0],
            gso_type: b[1],
            gso_size: u16le(4),
            csum_start: u16le(6),
            csum_offset: u16le(8),
        })
    }
}

fn sum16(data: &[u8], mut acc: u64) -> u64 {
    let (pairs, rest) = data.as_chunks::<2>();
    for c in pairs {
        acc += u64::from(u16::from_be_bytes(*c));
    }
    if let [last] = rest {
        acc += u64::from(u16::from_be_bytes([*last, 0]));
    }
    acc
}

fn fold(mut acc: u64) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// Completes a partial checksum (`NEEDS_CSUM`): the field holds the
/// pseudo-header sum; the sum from `start` to the end goes in.
fn complete_csum(pkt: &mut [u8], start: usize, offset: usize) -> Option<()> {
    let at = start.checked_add(offset)?;
    if at + 2 > pkt.len() || start > pkt.len() {
        return None;
    }
    let c = !fold(sum16(&pkt[start..], 0));
    pkt[at..at + 2].copy_from_slice(&c.to_be_bytes());
    Some(())
}

fn ipv4_csum(h: &mut [u8]) {
    h[10] = 0;
    h[11] = 0;
    let c = !fold(sum16(h, 0));
    h[10..12].copy_from_slice(&c.to_be_bytes());
}

fn tcp4_csum(ip: &[u8], tcp: &mut [u8]) {
    tcp[16] = 0;
    tcp[17] = 0;
    let mut acc = sum16(&ip[12..20], 0);
    acc += 6 + tcp.len() as u64;
    let c = !fold(sum16(tcp, acc));
    tcp[16..18].copy_from_slice(&c.to_be_bytes());
}

/// Calls `f` with each IP packet of what the TUN device returned (header
/// included in `buf`): the packet itself with its checksum completed, or
/// the segments of a TCP/IPv4 super-packet. Returns false (and calls
/// nothing) for a header it cannot handle.
pub fn segments(buf: &mut [u8], scratch: &mut Vec<u8>, mut f: impl FnMut(&[u8])) -> bool {
    let Some(h) = VnetHdr::parse(buf) else {
        return false;
    };
    let pkt = &mut buf[VNET_HDR_LEN..];
    if h.gso_type == VIRTIO_NET_HDR_GSO_NONE {
        if h.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0
            && complete_csum(pkt, h.csum_start.into(), h.csum_offset.into()).is_none()
        {
            return false;
        }
        f(pkt);
        return true;
    }
    if h.gso_type & 0x7f != VIRTIO_NET_HDR_GSO_TCPV4 || pkt.len() < 40 || pkt[0] >> 4 != 4 {
        return false;
    }
    let ihl = usize::from(pkt[0] & 0x0f) * 4;
    let Some(doff) = pkt.get(ihl + 12).map(|b| usize::from(b >> 4) * 4) else {
        return false;
    };
    let hdrs = ihl + doff;
    let mss = usize::from(h.gso_size);
    if ihl < 20 || doff < 20 || hdrs > pkt.len() || mss == 0 {
        return false;
    }
    let id = u16::from_be_bytes([pkt[4], pkt[5]]);
    let seq = u32::from_be_bytes([pkt[ihl + 4], pkt[ihl + 5], pkt[ihl + 6], pkt[ihl + 7]]);
    let flags = pkt[ihl + 13];
    let payload_len = pkt.len() - hdrs;
    let n = payload_len.div_ceil(mss).max(1);
    for i in 0..n {
        let start = hdrs + i * mss;
        let end = (start + mss).min(pkt.len());
        scratch.clear();
        scratch.extend_from_slice(&pkt[..hdrs]);
        scratch.extend_from_slice(&pkt[start..end]);
        let total = scratch.len() as u16;
        scratch[2..4].copy_from_slice(&total.to_be_bytes());
        scratch[4..6].copy_from_slice(&id.wrapping_add(i as u16).to_be_bytes());
        ipv4_csum(&mut scratch[..ihl]);
        let s = seq.wrapping_add((i * mss) as u32);
        scratch[ihl + 4..ihl + 8].copy_from_slice(&s.to_be_bytes());
        let mut fl = flags;
        if i + 1 < n {
            fl &= !(0x01 | 0x08); // FIN, PSH only on the last
        }
        if i > 0 {
            fl &= !0x80; // CWR only on the first
        }
        scratch[ihl + 13] = fl;
        let (ip, tcp) = scratch.split_at_mut(ihl);
        tcp4_csum(ip, tcp);
        f(scratch);
    }
    true
}

/// Sends `buf` (datagrams of `seg` bytes, the last maybe shorter) to `to`
/// in one `sendmsg` with `UDP_SEGMENT`.
pub fn send_gso(sock: &UdpSocket, to: SocketAddr, buf: &[u8], seg: usize) -> io::Result<()> {
    if buf.len() <= seg {
        return sock.send_to(buf, to).map(drop);
    }
    // The destination as the kernel takes it: sockaddr_in or sockaddr_in6
    // (an IPv4 one on the dual-stack socket goes out over IPv4).
    // SAFETY: plain data structures filled below.
    let mut addr: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let namelen = match to {
        SocketAddr::V4(v4) => {
            // SAFETY: sockaddr_storage is large and aligned enough.
            let a = unsafe {
                &mut *(&mut addr as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in>()
            };
            a.sin_family = libc::AF_INET as libc::sa_family_t;
            a.sin_port = v4.port().to_be();
            a.sin_addr.s_addr = u32::from(*v4.ip()).to_be();
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(v6) => {
            // SAFETY: as above.
            let a = unsafe {
                &mut *(&mut addr as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in6>()
            };
            a.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            a.sin6_port = v6.port().to_be();
            a.sin6_addr.s6_addr = v6.ip().octets();
            a.sin6_flowinfo = v6.flowinfo().to_be();
            a.sin6_scope_id = v6.scope_id();
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    let mut iov = libc::iovec {
        iov_base: buf.as_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    let mut cbuf = [0u64; 4]; // aligned room for one cmsg with a u16
    // SAFETY: zeroed msghdr, then pointers to live locals.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = (&mut addr as *mut libc::sockaddr_storage).cast();
    msg.msg_namelen = namelen as u32;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE is a pure computation.
    msg.msg_controllen = unsafe { libc::CMSG_SPACE(2) } as usize;
    // SAFETY: msg_control points at cbuf, large enough for one cmsg.
    unsafe {
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = libc::SOL_UDP;
        (*c).cmsg_type = UDP_SEGMENT;
        (*c).cmsg_len = libc::CMSG_LEN(2) as usize;
        std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<u16>(), seg as u16);
    }
    // SAFETY: a valid socket and message.
    let r = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, 0) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Turns UDP GRO on: `recv_gro` may then return several datagrams.
pub fn enable_gro(sock: &UdpSocket) -> io::Result<()> {
    let one: libc::c_int = 1;
    // SAFETY: a valid socket and option value.
    let r = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_UDP,
            UDP_GRO,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as u32,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sets the socket's buffers (as root beyond the sysctl limits).
pub fn set_buffers(sock: &UdpSocket, bytes: usize) {
    let v = bytes as libc::c_int;
    for opt in [libc::SO_SNDBUFFORCE, libc::SO_RCVBUFFORCE] {
        // SAFETY: a valid socket and option value.
        unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&v as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as u32,
            );
        }
    }
}

/// Receives into `buf`; returns (bytes, sender, datagram size) where the
/// datagram size is what GRO coalesced by (the whole length otherwise).
pub fn recv_gro(sock: &UdpSocket, buf: &mut [u8]) -> io::Result<(usize, SocketAddr, usize)> {
    // SAFETY: plain data structures filled by the kernel.
    let mut addr: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut cbuf = [0u64; 8];
    // SAFETY: zeroed msghdr, then pointers to live locals.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = (&mut addr as *mut libc::sockaddr_storage).cast();
    msg.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as u32;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&cbuf);
    // SAFETY: a valid socket and message.
    let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let n = n as usize;
    let mut seg = n;
    // SAFETY: iterating the control messages the kernel wrote into cbuf.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_UDP && (*c).cmsg_type == UDP_GRO {
                let v = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::c_int>());
                if v > 0 {
                    seg = v as usize;
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    let from = match addr.ss_family as libc::c_int {
        libc::AF_INET => {
            // SAFETY: the kernel wrote a sockaddr_in.
            let a: libc::sockaddr_in =
                unsafe { std::ptr::read((&addr as *const libc::sockaddr_storage).cast()) };
            SocketAddr::from((
                std::net::Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
                u16::from_be(a.sin_port),
            ))
        }
        libc::AF_INET6 => {
            // SAFETY: the kernel wrote a sockaddr_in6.
            let a: libc::sockaddr_in6 =
                unsafe { std::ptr::read((&addr as *const libc::sockaddr_storage).cast()) };
            // An IPv4 sender on the dual-stack socket is v4-mapped: give
            // it back as IPv4 (endpoints, roaming, `wg show`).
            SocketAddr::from((
                std::net::Ipv6Addr::from(a.sin6_addr.s6_addr).to_canonical(),
                u16::from_be(a.sin6_port),
            ))
        }
        _ => return Err(io::Error::other("unknown sender address family")),
    };
    Ok((n, from, seg))
}

/// User-space TCP GRO for what the device decrypted: consecutive
/// segments of one TCP/IPv4 flow (same addresses, ports, header bytes
/// apart from sequence number and checksum, full-size payloads, no FIN,
/// SYN, RST, URG) are merged into one super-packet written to the TUN
/// device in one call with a TCPV4 GSO virtio-net header; anything else
/// is written as it is.
#[derive(Debug, Default)]
pub struct TcpCoalescer {
    /// virtio-net header room + the packet being built.
    buf: Vec<u8>,
    segments: usize,
    mss: usize,
    hdr_len: usize,
    next_seq: u32,
}

/// Largest coalesced IP packet.
const MAX_COALESCED: usize = 65_000;

impl TcpCoalescer {
    fn mergeable(&self, pkt: &[u8]) -> bool {
        if self.segments == 0 || pkt.len() < 40 {
            return false;
        }
        let cur = &self.buf[VNET_HDR_LEN..];
        let h = self.hdr_len;
        if pkt.len() <= h || pkt.len() - h > self.mss || cur.len() + pkt.len() - h > MAX_COALESCED {
            return false;
        }
        // The last merged segment was full-size and had no PSH.
        if cur[33] & 0x08 != 0 || !(cur.len() - h).is_multiple_of(self.mss) {
            return false;
        }
        let seq = u32::from_be_bytes([pkt[24], pkt[25], pkt[26], pkt[27]]);
        // Same IP header apart from length, id, checksum; same TCP header
        // apart from sequence number, PSH and checksum.
        seq == self.next_seq
            && pkt[0] == cur[0]
            && pkt[1] == cur[1]
            && pkt[6..10] == cur[6..10]
            && pkt[12..20] == cur[12..20]
            && pkt[20..24] == cur[20..24]
            && pkt[28..33] == cur[28..33]
            && (pkt[33] & !0x08) == (cur[33] & !0x08)
            && pkt[34..36] == cur[34..36]
            && pkt[38..h] == cur[38..h]
    }

    /// A packet that may start a run: TCP/IPv4 without options in IP, no
    /// fragments, only ACK (and PSH).
    fn candidate(pkt: &[u8]) -> Option<usize> {
        if pkt.len() < 40 || pkt[0] != 0x45 || pkt[9] != 6 || pkt[6] & 0x3f != 0 || pkt[7] != 0 {
            return None;
        }
        let doff = usize::from(pkt[32] >> 4) * 4;
        let h = 20 + doff;
        let flags = pkt[33];
        (doff >= 20 && pkt.len() > h && flags & !(0x10 | 0x08) == 0 && flags & 0x10 != 0)
            .then_some(h)
    }

    /// Adds one decrypted IP packet; writes out (with `write`) whatever can
    /// no longer grow.
    pub fn push(&mut self, pkt: &[u8], mut write: impl FnMut(&[u8])) {
        if self.mergeable(pkt) {
            let h = self.hdr_len;
            self.buf.extend_from_slice(&pkt[h..]);
            // PSH travels with the last segment.
            let psh = pkt[33] & 0x08;
            self.buf[VNET_HDR_LEN + 33] |= psh;
            self.segments += 1;
            self.next_seq = self.next_seq.wrapping_add((pkt.len() - h) as u32);
            return;
        }
        self.flush(&mut write);
        self.buf.clear();
        self.buf.resize(VNET_HDR_LEN, 0);
        self.buf.extend_from_slice(pkt);
        match Self::candidate(pkt) {
            Some(h) => {
                self.segments = 1;
                self.hdr_len = h;
                self.mss = pkt.len() - h;
                let seq = u32::from_be_bytes([pkt[24], pkt[25], pkt[26], pkt[27]]);
                self.next_seq = seq.wrapping_add(self.mss as u32);
            }
            None => {
                // Not mergeable: out at once.
                write(&self.buf);
                self.buf.clear();
                self.segments = 0;
            }
        }
    }

    /// Writes out the packet being built, if any.
    pub fn flush(&mut self, mut write: impl FnMut(&[u8])) {
        if self.segments == 0 {
            return;
        }
        if self.segments > 1 {
            let h = self.hdr_len;
            let total = self.buf.len() - VNET_HDR_LEN;
            let pkt = &mut self.buf[VNET_HDR_LEN..];
            pkt[2..4].copy_from_slice(&(total as u16).to_be_bytes());
            ipv4_csum(&mut pkt[..20]);
            // Partial checksum: the folded pseudo-header sum.
            let mut acc = sum16(&pkt[12..20], 0);
            acc += 6 + (total - 20) as u64;
            pkt[36..38].copy_from_slice(&fold(acc).to_be_bytes());
            let vh = &mut self.buf[..VNET_HDR_LEN];
            vh[0] = VIRTIO_NET_HDR_F_NEEDS_CSUM;
            vh[1] = VIRTIO_NET_HDR_GSO_TCPV4;
            vh[2..4].copy_from_slice(&(h as u16).to_le_bytes());
            vh[4..6].copy_from_slice(&(self.mss as u16).to_le_bytes());
            vh[6..8].copy_from_slice(&20u16.to_le_bytes());
            vh[8..10].copy_from_slice(&16u16.to_le_bytes());
        }
        write(&self.buf);
        self.buf.clear();
        self.segments = 0;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A TCP/IPv4 super-packet: 20 + 20 header bytes and `payload` bytes.
    fn super_packet(payload: usize, mss: u16) -> Vec<u8> {
        let mut v = vec![0u8; VNET_HDR_LEN];
        v[1] = VIRTIO_NET_HDR_GSO_TCPV4;
        v[4..6].copy_from_slice(&mss.to_le_bytes());
        let mut ip = vec![
            0x45, 0, 0, 0, 0x12, 0x34, 0x40, 0, 64, 6, 0, 0, 10, 1, 0, 1, 10, 2, 0, 1,
        ];
        let total = (40 + payload) as u16;
        ip[2..4].copy_from_slice(&total.to_be_bytes());
        let mut tcp = vec![0u8; 20];
        tcp[0..2].copy_from_slice(&5201u16.to_be_bytes());
        tcp[2..4].copy_from_slice(&40000u16.to_be_bytes());
        tcp[4..8].copy_from_slice(&1000u32.to_be_bytes());
        tcp[12] = 5 << 4;
        tcp[13] = 0x18 | 0x80; // PSH ACK CWR
        v.extend(ip);
        v.extend(tcp);
        v.extend((0..payload).map(|i| i as u8));
        v
    }

    #[test]
    fn tso_segments_have_right_headers_and_checksums() {
        let mut pkt = super_packet(3000, 1400);
        let mut scratch = Vec::new();
        let mut out: Vec<Vec<u8>> = Vec::new();
        assert!(segments(&mut pkt, &mut scratch, |s| out.push(s.to_vec())));
        assert_eq!(out.len(), 3);
        assert_eq!(
            out.iter().map(|s| s.len() - 40).collect::<Vec<_>>(),
            [1400, 1400, 200]
        );
        let mut payload = Vec::new();
        for (i, s) in out.iter().enumerate() {
            // Both checksums verify (sum including the field folds to 0xffff).
            assert_eq!(fold(sum16(&s[..20], 0)), 0xffff, "IP checksum of {i}");
            let pseudo = sum16(&s[12..20], 6 + (s.len() as u64 - 20));
            assert_eq!(fold(sum16(&s[20..], pseudo)), 0xffff, "TCP checksum of {i}");
            assert_eq!(u16::from_be_bytes([s[2], s[3]]) as usize, s.len());
            assert_eq!(u16::from_be_bytes([s[4], s[5]]), 0x1234 + i as u16);
            let seq = u32::from_be_bytes([s[24], s[25], s[26], s[27]]);
            assert_eq!(seq, 1000 + 1400 * i as u32);
            let psh = s[33] & 0x08 != 0;
            let cwr = s[33] & 0x80 != 0;
            assert_eq!((psh, cwr), (i == 2, i == 0), "flags of {i}");
            payload.extend_from_slice(&s[40..]);
        }
        assert_eq!(payload, (0..3000).map(|i| i as u8).collect::<Vec<_>>());
    }

    #[test]
    fn coalescing_undoes_segmentation() {
        let mut pkt = super_packet(5000, 1400);
        pkt[VNET_HDR_LEN + 33] = 0x18; // PSH ACK (a CWR segment is not merged)
        let mut scratch = Vec::new();
        let mut segs: Vec<Vec<u8>> = Vec::new();
        assert!(segments(&mut pkt, &mut scratch, |s| segs.push(s.to_vec())));
        assert_eq!(segs.len(), 4);
        let mut c = TcpCoalescer::default();
        let mut written: Vec<Vec<u8>> = Vec::new();
        for s in &segs {
            c.push(s, |w| written.push(w.to_vec()));
        }
        // A packet of another flow ends the run.
        let mut other = segs[0].clone();
        other[20] ^= 1;
        c.push(&other, |w| written.push(w.to_vec()));
        c.flush(|w| written.push(w.to_vec()));
        assert_eq!(written.len(), 2, "one super-packet, then the other flow");
        let big = &written[0];
        let h = VnetHdr::parse(big).unwrap();
        assert_eq!((h.gso_type, h.gso_size, h.flags), (1, 1400, 1));
        let ip = &big[VNET_HDR_LEN..];
        assert_eq!(ip.len(), 40 + 5000);
        assert_eq!(u16::from_be_bytes([ip[2], ip[3]]) as usize, ip.len());
        assert_eq!(fold(sum16(&ip[..20], 0)), 0xffff);
        assert_eq!(
            &ip[40..],
            &(0..5000).map(|i| i as u8).collect::<Vec<_>>()[..]
        );
        assert_eq!(ip[33] & 0x08, 0x08, "PSH of the last segment kept");
        // Completing the partial checksum gives a valid TCP checksum.
        let mut done = big.clone();
        assert!(segments(&mut done.clone(), &mut scratch, |_| {}));
        let ipd = &mut done[VNET_HDR_LEN..];
        complete_csum(ipd, 20, 16).unwrap();
        let pseudo = sum16(&ipd[12..20], 6 + (ipd.len() as u64 - 20));
        assert_eq!(fold(sum16(&ipd[20..], pseudo)), 0xffff);
        // The other flow's packet went out unchanged behind an empty header.
        assert_eq!(&written[1][VNET_HDR_LEN..], &other[..]);
        assert_eq!(&written[1][..VNET_HDR_LEN], &[0u8; VNET_HDR_LEN]);
    }

    #[test]
    fn bad_headers_are_refused_not_panicking() {
        let mut scratch = Vec::new();
        for mut p in [
            vec![0u8; 3],
            {
                let mut p = super_packet(100, 0);
                p[1] = VIRTIO_NET_HDR_GSO_TCPV4;
                p
            },
            {
                let mut p = super_packet(100, 1400);
                p[VNET_HDR_LEN] = 0x4f; // ihl 60 > packet headers
                p.truncate(VNET_HDR_LEN + 30);
                p
            },
            {
                let mut p = vec![0u8; VNET_HDR_LEN + 20];
                p[0] = VIRTIO_NET_HDR_F_NEEDS_CSUM;
                p[6..8].copy_from_slice(&500u16.to_le_bytes());
                p
            },
        ] {
            assert!(!segments(&mut p, &mut scratch, |_| panic!(
                "no segment expected"
            )));
        }
    }
}
