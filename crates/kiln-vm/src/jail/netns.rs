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
//!
//! kiln not running as root (a developer's CLI) makes the namespace inside a new user
//! namespace instead, where it holds the capability: a forked helper (a user namespace
//! cannot be entered by a threaded process) unshares both, sets them up and hands back
//! their descriptors and the listener. QEMU joins the user namespace first (its owner's
//! uid gives it the right to), then the network one. A kernel that refuses unprivileged
//! user namespaces leaves no way to wall the network off: [`NetNs::create`] says so.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::os::fd::{AsFd, AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd, RawFd};

use super::JailError;

/// A network namespace of one VM.
#[derive(Debug)]
pub struct NetNs {
    fd: OwnedFd,
    /// The user namespace owning it, when kiln is not root.
    user: Option<OwnedFd>,
}

impl NetNs {
    /// A new namespace with loopback up and, when `port` is given, a socket listening on
    /// `127.0.0.1:port` in it (what the guest's proxy address is mapped to).
    pub fn create(port: Option<u16>) -> Result<(Self, Option<TcpListener>), JailError> {
        if nix::unistd::geteuid().is_root() {
            Self::create_as_root(port)
        } else {
            Self::create_in_user_ns(port)
        }
    }

    /// The user namespace QEMU joins before this one (kiln not root).
    pub fn user_fd(&self) -> Option<RawFd> {
        self.user.as_ref().map(|f| f.as_raw_fd())
    }

    fn create_as_root(port: Option<u16>) -> Result<(Self, Option<TcpListener>), JailError> {
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
                Ok((
                    Self {
                        fd: ns.into(),
                        user: None,
                    },
                    listener,
                ))
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

    /// Not root: the namespaces are made by a forked helper (see the module's doc), which
    /// sends back the user namespace, the network namespace and the listener.
    fn create_in_user_ns(port: Option<u16>) -> Result<(Self, Option<TcpListener>), JailError> {
        use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
        let setup = |step: &str, source: std::io::Error| JailError::Setup {
            step: step.to_owned(),
            source,
        };
        let (ours, theirs) = std::os::unix::net::UnixStream::pair()
            .map_err(|e| setup("a socket to the namespace helper", e))?;
        // SAFETY: the child makes plain syscalls on what it inherited and `_exit`s; the
        // allocation `sendmsg` makes is safe after glibc's fork (it resets malloc's locks).
        let child = match unsafe { nix::unistd::fork() } {
            Ok(nix::unistd::ForkResult::Child) => {
                let code = match helper(theirs.as_raw_fd(), port) {
                    Ok(()) => 0,
                    Err(e) => e as i32,
                };
                // SAFETY: ends the helper without running the parent's destructors.
                unsafe { libc::_exit(code) }
            }
            Ok(nix::unistd::ForkResult::Parent { child }) => child,
            Err(e) => return Err(setup("fork the namespace helper", e.into())),
        };
        drop(theirs);
        let mut space = nix::cmsg_space!([RawFd; 3]);
        let mut byte = [0u8; 1];
        let mut iov = [std::io::IoSliceMut::new(&mut byte)];
        let received = recvmsg::<()>(
            ours.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map(|msg| {
            msg.cmsgs()
                .ok()
                .into_iter()
                .flatten()
                .filter_map(|c| match c {
                    ControlMessageOwned::ScmRights(fds) => Some(fds),
                    _ => None,
                })
                .flatten()
                // SAFETY: descriptors just received, owned by nobody else.
                .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) })
                .collect::<Vec<_>>()
        });
        let status = nix::sys::wait::waitpid(child, None);
        let mut fds = received.map_err(|e| setup("receive the VM's namespaces", e.into()))?;
        let expected = if port.is_some() { 3 } else { 2 };
        if fds.len() != expected {
            let errno = match status {
                Ok(nix::sys::wait::WaitStatus::Exited(_, code)) if code != 0 => {
                    std::io::Error::from_raw_os_error(code)
                }
                _ => std::io::Error::other("the helper sent nothing"),
            };
            return Err(setup(
                "a user and network namespace for the VM (kiln is not root: the kernel must \
                 allow unprivileged user namespaces, e.g. sysctl kernel.unprivileged_userns_clone=1)",
                errno,
            ));
        }
        let listener = (fds.len() == 3).then(|| TcpListener::from(fds.remove(2)));
        let fd = fds.remove(1);
        let user = fds.remove(0);
        Ok((
            Self {
                fd,
                user: Some(user),
            },
            listener,
        ))
    }
}

/// The helper's side of [`NetNs::create_in_user_ns`]: new user and network namespaces,
/// loopback up, the listener, all sent on `sock`. Runs in a forked child: raw syscalls.
fn helper(sock: RawFd, port: Option<u16>) -> nix::Result<()> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    nix::sched::unshare(
        nix::sched::CloneFlags::CLONE_NEWUSER | nix::sched::CloneFlags::CLONE_NEWNET,
    )?;
    loopback_up()
        .map_err(|e| nix::errno::Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))?;
    let user = nix::fcntl::open(
        c"/proc/self/ns/user",
        nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )?;
    let net = nix::fcntl::open(
        c"/proc/self/ns/net",
        nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )?;
    let mut fds = [user, net, -1];
    let mut count = 2;
    if let Some(port) = port {
        let l = TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))
            .map_err(|e| nix::errno::Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))?;
        fds[2] = l.as_raw_fd();
        count = 3;
        std::mem::forget(l);
    }
    let cmsg = [ControlMessage::ScmRights(&fds[..count])];
    let iov = [std::io::IoSlice::new(b"n")];
    sendmsg::<()>(sock, &iov, &cmsg, MsgFlags::empty(), None).map(drop)
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
