//! The statuses of templates, builds and sandboxes, and the streams of build logs,
//! spelled exactly as Superserve's SDK (`superserve==0.11.4`, `types.py`) spells them.
//!
//! These enums are both the wire form and what the store keeps (with the `sqlx` feature
//! they are TEXT columns holding the same strings), so each status exists once. The rules
//! that depend only on the status (which ones are terminal, live, which moves are allowed)
//! are methods here, so every caller derives its status sets from one definition.

/// Statuses go to the wire as their strings and, with the `sqlx` feature, to the database.
/// Each has an `Unknown` variant that a client reads a status from a newer server as; kiln
/// never writes it (see `string_enum!`).
macro_rules! status_enum {
    ($(#[$meta:meta])* pub enum $name:ident { $($body:tt)* }) => {
        kiln_spec::string_enum! {
            $(#[$meta])*
            #[cfg_attr(feature = "sqlx", derive(sqlx::Type))]
            #[cfg_attr(feature = "sqlx", sqlx(type_name = "TEXT", rename_all = "lowercase"))]
            pub enum $name { $($body)* }
            /// A value this client does not know (from a newer server).
            else Unknown => "unknown"
        }
    };
}

status_enum! {
    /// A template's status; it follows the template's latest build.
    pub enum TemplateStatus {
        /// The latest build is queued.
        Pending => "pending",
        /// The latest build is running (or snapshotting).
        Building => "building",
        /// The latest build produced a live artifact.
        Ready => "ready",
        /// The latest build failed (an older artifact may still be live).
        Failed => "failed",
    }
}

status_enum! {
    /// A build's status. `ready`, `failed` and `cancelled` are terminal.
    pub enum BuildStatus {
        /// Queued, not yet picked up.
        Pending => "pending",
        /// Pulling, booting, running steps.
        Building => "building",
        /// Capturing the VM.
        Snapshotting => "snapshotting",
        /// Done; the artifact is live.
        Ready => "ready",
        /// Ended with a coded error.
        Failed => "failed",
        /// Stopped on request.
        Cancelled => "cancelled",
    }
}

impl BuildStatus {
    /// Whether nothing more will happen to a build in this status.
    pub const fn is_terminal(self) -> bool {
        matches!(
            self,
            BuildStatus::Ready | BuildStatus::Failed | BuildStatus::Cancelled
        )
    }
}

status_enum! {
    /// The stream a build log line came from.
    pub enum LogStream {
        /// The step's standard output.
        Stdout => "stdout",
        /// The step's standard error.
        Stderr => "stderr",
        /// kiln's own progress messages.
        System => "system",
    }
}

status_enum! {
    /// A sandbox's status. `migrating` is in the SDK's enum; kiln accepts it for wire
    /// compatibility although it never migrates a sandbox today.
    pub enum SandboxStatus {
        /// Restoring from the template snapshot.
        Starting => "starting",
        /// Running.
        Active => "active",
        /// Being paused.
        Pausing => "pausing",
        /// Paused (snapshotted, not running).
        Paused => "paused",
        /// Being resumed.
        Resuming => "resuming",
        /// Moving between hosts.
        Migrating => "migrating",
        /// Broken; will not run again.
        Failed => "failed",
        /// Gone.
        Deleted => "deleted",
    }
}

status_enum! {
    /// A snapshot's status (the SDK's `SnapshotStatus`). `ready` and `failed` are where a
    /// snapshot stays; `deleting` is in the SDK's enum, but kiln removes a snapshot at once
    /// (a deleted one is not found), so it never answers it.
    pub enum SnapshotStatus {
        /// Being captured, or made forkable in the background.
        Creating => "creating",
        /// Sandboxes can be created from it.
        Ready => "ready",
        /// The capture failed; `error_message` says why. It holds nothing.
        Failed => "failed",
        /// Being removed.
        Deleting => "deleting",
    }
}

impl SnapshotStatus {
    /// Whether the snapshot holds (or is about to hold) an artifact: it counts against the
    /// team's snapshot limit and pins its template.
    pub const fn is_kept(self) -> bool {
        matches!(self, SnapshotStatus::Creating | SnapshotStatus::Ready)
    }

    /// The kept statuses ([`SnapshotStatus::is_kept`]), for store filters.
    pub fn kept() -> Vec<SnapshotStatus> {
        Self::ALL.iter().copied().filter(|s| s.is_kept()).collect()
    }
}

impl SandboxStatus {
    /// Whether the sandbox counts against the team's live-sandbox limit and pins its
    /// template: everything except `failed` and `deleted`.
    pub const fn is_live(self) -> bool {
        !matches!(
            self,
            SandboxStatus::Failed | SandboxStatus::Deleted | SandboxStatus::Unknown
        )
    }

    /// Whether a VM is (or is about to be) running for the sandbox, so that a process must
    /// own it: the live statuses except `paused`, which is a snapshot on disk. After a
    /// crash, a sandbox in one of these with no owner left is recovered or failed.
    pub const fn needs_owner(self) -> bool {
        self.is_live() && !matches!(self, SandboxStatus::Paused)
    }

    /// The live statuses ([`SandboxStatus::is_live`]), for store filters.
    pub fn live() -> Vec<SandboxStatus> {
        Self::ALL.iter().copied().filter(|s| s.is_live()).collect()
    }

    /// The statuses whose VM needs an owner ([`SandboxStatus::needs_owner`]).
    pub fn owned() -> Vec<SandboxStatus> {
        Self::ALL
            .iter()
            .copied()
            .filter(|s| s.needs_owner())
            .collect()
    }

    /// Whether a sandbox may move from `self` to `to`.
    ///
    /// Any live sandbox may fail or be deleted; `failed` may only be deleted; `deleted` is
    /// final. The rest is the pause/resume cycle.
    pub const fn can_move_to(self, to: SandboxStatus) -> bool {
        use SandboxStatus::*;
        match (self, to) {
            (Deleted, _) => false,
            (Failed, Deleted) => true,
            (Failed, _) => false,
            (_, Failed | Deleted) => true,
            (Starting, Active)
            | (Active, Pausing | Migrating)
            | (Pausing, Paused | Active)
            | (Paused, Resuming)
            | (Resuming, Active | Paused)
            | (Migrating, Active) => true,
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings<T: Copy + std::fmt::Display>(all: &[T]) -> Vec<String> {
        all.iter().map(ToString::to_string).collect()
    }

    /// The SDKs match on these strings.
    #[test]
    fn stable_strings() {
        assert_eq!(
            strings(TemplateStatus::ALL),
            ["pending", "building", "ready", "failed"]
        );
        assert_eq!(
            strings(BuildStatus::ALL),
            [
                "pending",
                "building",
                "snapshotting",
                "ready",
                "failed",
                "cancelled"
            ]
        );
        assert_eq!(strings(LogStream::ALL), ["stdout", "stderr", "system"]);
        assert_eq!(
            strings(SnapshotStatus::ALL),
            ["creating", "ready", "failed", "deleting"]
        );
        assert_eq!(
            strings(SandboxStatus::ALL),
            [
                "starting",
                "active",
                "pausing",
                "paused",
                "resuming",
                "migrating",
                "failed",
                "deleted"
            ]
        );
    }

    #[test]
    fn statuses_from_a_newer_server_read_as_unknown() {
        let s: SandboxStatus = serde_json::from_str("\"hibernating\"").unwrap();
        assert_eq!(s, SandboxStatus::Unknown);
        assert!("hibernating".parse::<SandboxStatus>().is_err());
        assert!(
            "unknown".parse::<BuildStatus>().is_err(),
            "never parsed from text"
        );
        assert!(!SandboxStatus::ALL.contains(&SandboxStatus::Unknown));
        assert!(!SandboxStatus::Unknown.can_move_to(SandboxStatus::Active));
    }

    #[test]
    fn status_sets() {
        use SandboxStatus::*;
        assert_eq!(
            SandboxStatus::live(),
            [Starting, Active, Pausing, Paused, Resuming, Migrating]
        );
        assert_eq!(
            SandboxStatus::owned(),
            [Starting, Active, Pausing, Resuming, Migrating]
        );
        assert!(BuildStatus::Cancelled.is_terminal() && !BuildStatus::Snapshotting.is_terminal());
        assert_eq!(
            SnapshotStatus::kept(),
            [SnapshotStatus::Creating, SnapshotStatus::Ready]
        );
    }

    #[test]
    fn transitions() {
        use SandboxStatus::*;
        assert!(Starting.can_move_to(Active));
        assert!(Active.can_move_to(Pausing) && Pausing.can_move_to(Paused));
        assert!(Paused.can_move_to(Resuming) && Resuming.can_move_to(Active));
        for s in SandboxStatus::ALL {
            assert!(!Deleted.can_move_to(*s));
            assert_eq!(Failed.can_move_to(*s), *s == Deleted);
        }
        assert!(!Starting.can_move_to(Paused));
        assert!(
            !Paused.can_move_to(Active),
            "a resume goes through resuming"
        );
        assert!(Active.is_live() && Paused.is_live());
        assert!(!Failed.is_live() && !Deleted.is_live());
    }

    #[test]
    fn serde_and_parse_use_the_wire_strings() {
        assert_eq!(
            serde_json::to_string(&BuildStatus::Snapshotting).unwrap(),
            "\"snapshotting\""
        );
        assert_eq!("stderr".parse::<LogStream>().unwrap(), LogStream::Stderr);
    }
}
