//! A VM's network namespace: QEMU's whole network world.
//!
//! QEMU's user network makes a host socket for every connection its guest opens. In the
//! host's namespace that reaches the host's services and networks unless libslirp's
//! `restrict=on` stops it, and `restrict=on` lets through only `guestfwd` rules, which
//! spawn a process per connection (or funnel every connection into one stream). So QEMU
//! runs in a namespace of its own that holds nothing but a loopback device: the guest's
//! connections to its gateway address land on that loopback, where the only listener is
//! the VM's egress proxy ([`NetNs::create`] makes the socket in the namespace and hands it
//! to the proxy, which itself runs in the host's namespace to reach upstreams). Anything
//! else the guest tries finds no route.
//!
//! Making a namespace needs `CAP_SYS_ADMIN`: a thread of kiln's (root) unshares into a new
//! one, sets it up and leaves; the namespace lives on through the descriptor kept of it,
//! which QEMU joins between fork and exec.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use super::JailError;

/// A network namespace of one VM.
#[derive(Debug)]
pub struct NetNs {
    fd: OwnedFd,
}

impl NetNs {
    /// A new namespace with loopback up and, when `port` is given, a socket listening on
    /// `127.0.0.1:port` in it (what the guest's proxy address is mapped to).
    pub fn create(port: Option<u16>) -> Result<(Self, Option<TcpListener>), JailError> {
        std::thread::Builder::new()
            .name("kiln-netns".into())
            .spawn(move || {
                let step = |what: &'static str| {
                    move |e: std::io::Error| JailError::Setup {
                        step: what.to_owned(),
                        source: e,
                    }
                };
                // This thread only: the rest of the process stays in the host's namespace.
                nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(|e| step("a new network namespace")(e.into()))?;
                loopback_up().map_err(step("bring up loopback in the VM's namespace"))?;
                let listener = match port {
                    Some(p) => Some(
                        TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, p)))
                            .map_err(step("listen for the egress proxy in the VM's namespace"))?,
                    ),
                    None => None,
                };
                let ns = std::fs::File::open("/proc/thread-self/ns/net")
                    .map_err(step("open the VM's network namespace"))?;
                Ok((Self { fd: ns.into() }, listener))
            })
            .map_err(|e| JailError::Setup {
                step: "a thread to make the VM's network namespace".into(),
                source: e,
            })?
            .join()
            .unwrap_or_else(|_| {
                Err(JailError::Setup {
                    step: "make the VM's network namespace".into(),
                    source: std::io::Error::other("the thread panicked"),
                })
            })
    }
}

impl AsFd for NetNs {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// `ip link set lo up`, in the calling thread's network namespace.
fn loopback_up() -> std::io::Result<()> {
    let sock = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
    // SAFETY: an all-zero ifreq is valid; the name fits with its NUL.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    use std::os::fd::AsRawFd as _;
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write the ifreq we own.
    unsafe {
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) < 0 {
            return Err(std::io::Error::last_os_error());
        }
        req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}
