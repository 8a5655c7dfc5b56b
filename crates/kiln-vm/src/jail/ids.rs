//! The ids jailed processes run as: one unprivileged uid per process, leased per VM.
//!
//! One uid per VM process (rather than one shared user) because the kernel separates
//! users in everything it does: a process may signal, trace or read `/proc` of another
//! process of its own uid, and owns every file that uid created. With a uid of its own, a
//! QEMU taken over by its guest can touch no other VM's processes or files even where a
//! namespace would let it see them. The range is the operator's (`KILN_JAIL_IDS=first:count`,
//! default [`IdRange::DEFAULT`], outside the ranges distributions give users and
//! containers): `first` is the group of every jailed QEMU (the files a VM maps from
//! outside its run directory are given to it, see `crate::jail::grant_group`), and slot
//! `n` is the pair `first + 1 + 2n` (QEMU) and `first + 2 + 2n` (its egress proxy).
//!
//! A slot is leased by an exclusive `flock` on `<dir>/<n>.lock` (`/run/kiln/jail/slots`:
//! tmpfs, so a reboot frees them all), held by the VM's owner and inherited by the VM's
//! processes: it is free again only once the owner and the processes are all gone, so a
//! uid is never shared by two live VMs, whatever process (server, CLI keeper, build)
//! leased it.

use std::fs::File;
use std::os::fd::AsRawFd as _;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};

use super::JailError;

/// A range of ids for jailed processes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdRange {
    first: u32,
    count: u32,
}

impl IdRange {
    /// 0x70000000 and the 65536 ids after it: above the ranges systemd and the shadow
    /// tools give to users, system services and containers (up to 0x6FFFFFFF), below the
    /// ids some tools treat as signed (0x80000000).
    pub const DEFAULT: IdRange = IdRange {
        first: 0x7000_0000,
        count: 65536,
    };

    /// A range of `count` ids from `first` (at least one slot, above the system ids).
    pub fn new(first: u32, count: u32) -> Result<Self, String> {
        if first < 65536 {
            return Err(format!(
                "{first}: the first id must be 65536 or above (clear of users and system ids)"
            ));
        }
        if count < 3 {
            return Err(format!(
                "{count} ids: at least 3 are needed (a group and a pair)"
            ));
        }
        if first
            .checked_add(count - 1)
            .is_none_or(|last| last > 0x7fff_ffff)
        {
            return Err(format!("{first}:{count} goes past 2147483647"));
        }
        Ok(Self { first, count })
    }

    /// The group of every jailed QEMU.
    pub fn group(&self) -> u32 {
        self.first
    }

    /// How many VMs can be jailed at once.
    pub fn slots(&self) -> u32 {
        (self.count - 1) / 2
    }

    /// The ids of slot `n`.
    pub fn pair(&self, n: u32) -> Pair {
        Pair {
            vmm: self.first + 1 + 2 * n,
            proxy: self.first + 2 + 2 * n,
        }
    }
}

impl std::fmt::Display for IdRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.first, self.count)
    }
}

impl std::str::FromStr for IdRange {
    type Err = String;

    /// `first:count`.
    fn from_str(s: &str) -> Result<Self, String> {
        let (first, count) = s
            .trim()
            .split_once(':')
            .ok_or_else(|| format!("{s:?}: expected first:count, e.g. 1879048192:65536"))?;
        let num = |v: &str| {
            v.trim()
                .parse::<u32>()
                .map_err(|_| format!("{v:?} is not a number"))
        };
        Self::new(num(first)?, num(count)?)
    }
}

/// The uids of one VM's processes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pair {
    /// QEMU's.
    pub vmm: u32,
    /// The egress proxy's.
    pub proxy: u32,
}

/// A leased slot: its ids are this VM's until the lease and every process that inherited
/// it are gone.
#[derive(Debug)]
pub struct Lease {
    slot: u32,
    ids: Pair,
    lock: File,
}

impl Lease {
    /// The slot.
    pub fn slot(&self) -> u32 {
        self.slot
    }

    /// Its ids.
    pub fn ids(&self) -> Pair {
        self.ids
    }

    /// The lock, for a process to inherit (it keeps the slot leased while it lives).
    pub fn lock_file(&self) -> &File {
        &self.lock
    }
}

impl IdRange {
    /// The slot a uid of this range belongs to (`None`: not one of its uids).
    pub fn slot_of(&self, uid: u32) -> Option<u32> {
        let n = uid.checked_sub(self.first + 1)? / 2;
        (n < self.slots()).then_some(n)
    }
}

/// Whether slot `n`'s lease in `dir` is free (no live holder). Takes and drops the lock,
/// so a lease racing with the check moves on to the next slot.
pub fn is_free(dir: &Path, n: u32) -> bool {
    let Ok(lock) = File::options()
        .read(true)
        .open(dir.join(format!("{n}.lock")))
    else {
        return true;
    };
    // SAFETY: flock on a descriptor `lock` owns.
    unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
}

/// Where the next search for a free slot starts in this process: slots are tried in turn
/// rather than from 0 each time, so a slot just freed is not at once reused.
static CURSOR: AtomicU32 = AtomicU32::new(0);

/// Leases a free slot of `range`, its lock file in `dir` (created if missing).
pub fn lease(dir: &Path, range: IdRange) -> Result<Lease, JailError> {
    std::fs::create_dir_all(dir).map_err(JailError::io("creating", dir))?;
    let slots = range.slots();
    let start = CURSOR.fetch_add(1, Ordering::Relaxed) % slots;
    for i in 0..slots {
        let slot = (start + i) % slots;
        let path = dir.join(format!("{slot}.lock"));
        let lock = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(JailError::io("opening", &path))?;
        // SAFETY: flock on a descriptor `lock` owns.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            CURSOR.store(slot + 1, Ordering::Relaxed);
            return Ok(Lease {
                slot,
                ids: range.pair(slot),
                lock,
            });
        }
    }
    Err(JailError::NoSlot(range))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_range_gives_a_group_and_disjoint_pairs() {
        let r: IdRange = "1879048192:65536".parse().unwrap();
        assert_eq!(r, IdRange::DEFAULT);
        assert_eq!(r.group(), 0x7000_0000);
        assert_eq!(r.slots(), 32767);
        assert_eq!(
            r.pair(0),
            Pair {
                vmm: 0x7000_0001,
                proxy: 0x7000_0002
            }
        );
        assert_eq!(r.pair(1).vmm, 0x7000_0003);
        let last = r.pair(r.slots() - 1);
        assert!(last.proxy < 0x7000_0000 + 65536);
        for bad in ["100:1000", "70000:2", "2147483000:1000", "x:1", "5"] {
            assert!(bad.parse::<IdRange>().is_err(), "{bad}");
        }
    }

    #[test]
    fn a_slot_is_leased_once_until_released() {
        let dir = tempfile::tempdir().unwrap();
        let range = IdRange::new(100_000, 5).unwrap();
        assert_eq!(range.slots(), 2);
        let a = lease(dir.path(), range).unwrap();
        let b = lease(dir.path(), range).unwrap();
        assert_ne!(a.slot(), b.slot());
        assert_ne!(a.ids().vmm, b.ids().vmm);
        assert!(matches!(
            lease(dir.path(), range),
            Err(JailError::NoSlot(_))
        ));
        // An inherited copy of the lock keeps the slot leased after the owner lets go.
        let inherited = a.lock_file().try_clone().unwrap();
        let freed = a.slot();
        drop(a);
        assert!(matches!(
            lease(dir.path(), range),
            Err(JailError::NoSlot(_))
        ));
        drop(inherited);
        let c = lease(dir.path(), range).unwrap();
        assert_eq!(c.slot(), freed);
        drop(b);
    }
}
