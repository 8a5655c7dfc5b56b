//! Network bring-up with ioctls (the guest image may have no `ip` binary):
//! `lo` up; `eth0` = 10.0.2.15/24 via 10.0.2.2 (QEMU user networking).
//!
//! The host runs that network restricted: nothing on or through the host answers, DNS
//! included. The one way out is the egress proxy ([`kiln_agent_proto::EGRESS_PROXY`]),
//! which every process finds in `http_proxy`/`https_proxy` (see [`proxy_env`]); names are
//! resolved by the proxy, on the host, where the sandbox's rules are applied.

use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd};

use anyhow::{bail, Context, Result};
use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};

const ETH_ADDR: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
const ETH_MASK: Ipv4Addr = Ipv4Addr::new(255, 255, 255, 0);
const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
/// Whether eth0 is up, so that execs get the proxy variables.
static PROXIED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The proxy variables every exec starts with once the network is up (a request's own
/// env, or the template's, may override them).
pub fn proxy_env() -> Vec<(String, String)> {
    if !PROXIED.load(std::sync::atomic::Ordering::Relaxed) {
        return Vec::new();
    }
    let (addr, port) = kiln_agent_proto::EGRESS_PROXY;
    let url = format!("http://{addr}:{port}");
    let mut out = Vec::new();
    for key in ["http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"] {
        out.push((key.to_owned(), url.clone()));
    }
    // The guest itself never goes through the proxy (which refuses loopback): by name,
    // by loopback address or by its own address.
    let mut local = format!("localhost,127.0.0.1,::1,{ETH_ADDR}");
    if let Ok(name) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
        let name = name.trim();
        if !name.is_empty() {
            local.push(',');
            local.push_str(name);
        }
    }
    for key in ["no_proxy", "NO_PROXY"] {
        out.push((key.to_owned(), local.clone()));
    }
    out
}

/// glibc's `struct rtentry` (net/route.h), not exported by the libc crate for gnu.
#[repr(C)]
struct RtEntry {
    rt_pad1: libc::c_ulong,
    rt_dst: libc::sockaddr,
    rt_gateway: libc::sockaddr,
    rt_genmask: libc::sockaddr,
    rt_flags: libc::c_ushort,
    rt_pad2: libc::c_short,
    rt_pad3: libc::c_ulong,
    rt_tos: libc::c_uchar,
    rt_class: libc::c_uchar,
    rt_pad4: [libc::c_short; 3],
    rt_metric: libc::c_short,
    rt_dev: *mut libc::c_char,
    rt_mtu: libc::c_ulong,
    rt_window: libc::c_ulong,
    rt_irtt: libc::c_ushort,
}

/// An IPv4 `sockaddr_in` (port 0) in its generic `sockaddr` form, as the ioctls take it:
/// `sa_data` holds the port and then the address, both in network byte order.
fn sockaddr_in(ip: Ipv4Addr) -> libc::sockaddr {
    let mut sa_data = [0; 14];
    for (d, s) in sa_data[2..6].iter_mut().zip(ip.octets()) {
        *d = s as libc::c_char;
    }
    libc::sockaddr {
        sa_family: libc::AF_INET as libc::sa_family_t,
        sa_data,
    }
}

fn ifreq(name: &str) -> Result<libc::ifreq> {
    // SAFETY: `ifreq` is plain data (a name array and a union of integers, sockaddrs and
    // a pointer nothing here reads), so all zeroes is a valid value.
    let mut r: libc::ifreq = unsafe { std::mem::zeroed() };
    if name.len() >= r.ifr_name.len() {
        bail!("interface name too long");
    }
    for (d, s) in r.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    Ok(r)
}

/// A datagram socket, only there to carry the interface and route ioctls.
struct Sock(OwnedFd);

impl Sock {
    fn new() -> Result<Self> {
        let fd = socket(
            AddressFamily::Inet,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .map_err(std::io::Error::from)
        .context("socket")?;
        Ok(Self(fd))
    }

    /// Neither nix nor rustix wraps the interface and route ioctls used here.
    fn ioctl<T>(&self, req: libc::c_ulong, arg: &mut T, what: &str) -> Result<()> {
        // SAFETY: the fd is ours and open; each caller passes the struct its request
        // reads and writes (`ifreq` for SIOC[GS]IF*, `RtEntry` for SIOCADDRT), and the
        // kernel only touches it for the duration of the call.
        let r = unsafe { libc::ioctl(self.0.as_raw_fd(), req as _, arg as *mut T) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EEXIST) {
                return Ok(());
            }
            bail!("{what}: {e}");
        }
        Ok(())
    }

    fn up(&self, name: &str) -> Result<()> {
        let mut r = ifreq(name)?;
        self.ioctl(libc::SIOCGIFFLAGS, &mut r, "SIOCGIFFLAGS")?;
        // SAFETY: SIOCGIFFLAGS succeeded, so the union holds the flags; an integer field
        // is valid for any bits anyway.
        unsafe {
            r.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
        }
        self.ioctl(libc::SIOCSIFFLAGS, &mut r, "SIOCSIFFLAGS")
    }

    fn set_addr(&self, name: &str, addr: Ipv4Addr, mask: Ipv4Addr) -> Result<()> {
        let mut r = ifreq(name)?;
        r.ifr_ifru.ifru_addr = sockaddr_in(addr);
        self.ioctl(libc::SIOCSIFADDR, &mut r, "SIOCSIFADDR")?;
        let mut r = ifreq(name)?;
        r.ifr_ifru.ifru_netmask = sockaddr_in(mask);
        self.ioctl(libc::SIOCSIFNETMASK, &mut r, "SIOCSIFNETMASK")
    }

    fn default_route(&self, gw: Ipv4Addr) -> Result<()> {
        let mut rt = RtEntry {
            rt_pad1: 0,
            rt_dst: sockaddr_in(Ipv4Addr::UNSPECIFIED),
            rt_gateway: sockaddr_in(gw),
            rt_genmask: sockaddr_in(Ipv4Addr::UNSPECIFIED),
            rt_flags: (libc::RTF_UP | libc::RTF_GATEWAY) as libc::c_ushort,
            rt_pad2: 0,
            rt_pad3: 0,
            rt_tos: 0,
            rt_class: 0,
            rt_pad4: [0; 3],
            rt_metric: 0,
            rt_dev: std::ptr::null_mut(),
            rt_mtu: 0,
            rt_window: 0,
            rt_irtt: 0,
        };
        self.ioctl(libc::SIOCADDRT, &mut rt, "SIOCADDRT")
    }
}

/// Configure `lo` and (if present) `eth0`; write resolv.conf and turn on the proxy
/// variables only if `net` (the host gave the VM its network).
pub fn setup(net: bool) -> Result<()> {
    let s = Sock::new()?;
    s.up("lo")?;
    if !std::path::Path::new("/sys/class/net/eth0").exists() {
        tracing::info!("no eth0; network left down");
        return Ok(());
    }
    s.set_addr("eth0", ETH_ADDR, ETH_MASK)?;
    s.up("eth0")?;
    s.default_route(GATEWAY)?;
    if net {
        // resolv.conf may be a dangling symlink (systemd-resolved images): replace it.
        // There is no DNS server to point at; a lookup fails at once instead of waiting
        // out timeouts, and proxy-aware clients never look up names themselves.
        let _ = std::fs::remove_file("/etc/resolv.conf");
        std::fs::write(
            "/etc/resolv.conf",
            "# kiln: names are resolved by the egress proxy ($https_proxy); no DNS server\n\
             options timeout:1 attempts:1\nnameserver 127.0.0.1\n",
        )?;
        PROXIED.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    tracing::info!(addr = %ETH_ADDR, gw = %GATEWAY, net, "network configured");
    Ok(())
}
