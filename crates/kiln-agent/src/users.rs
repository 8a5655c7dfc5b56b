//! User resolution from the guest's own /etc/passwd and /etc/group.
//!
//! The agent is a static glibc binary: glibc's NSS (getpwnam & co.) would try to dlopen
//! modules from the guest image and can crash or misbehave, so we parse the files.

use std::path::Path;

use anyhow::{bail, Context, Result};

/// A user to run a process as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups (includes the primary gid).
    pub groups: Vec<u32>,
    pub home: String,
}

impl ResolvedUser {
    pub fn root() -> Self {
        Self {
            name: "root".into(),
            uid: 0,
            gid: 0,
            groups: vec![0],
            home: "/root".into(),
        }
    }
}

#[derive(Debug)]
struct PasswdEntry {
    name: String,
    uid: u32,
    gid: u32,
    home: String,
}

#[derive(Debug)]
struct GroupEntry {
    name: String,
    gid: u32,
    members: Vec<String>,
}

fn read_lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .map(|s| s.lines().map(str::to_owned).collect())
        .unwrap_or_default()
}

fn passwd(root: &Path) -> Vec<PasswdEntry> {
    read_lines(&root.join("etc/passwd"))
        .iter()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            if f.len() < 7 || l.starts_with('#') {
                return None;
            }
            Some(PasswdEntry {
                name: f[0].to_owned(),
                uid: f[2].parse().ok()?,
                gid: f[3].parse().ok()?,
                home: f[5].to_owned(),
            })
        })
        .collect()
}

fn groups(root: &Path) -> Vec<GroupEntry> {
    read_lines(&root.join("etc/group"))
        .iter()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            if f.len() < 4 || l.starts_with('#') {
                return None;
            }
            Some(GroupEntry {
                name: f[0].to_owned(),
                gid: f[2].parse().ok()?,
                members: f[3]
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect(),
            })
        })
        .collect()
}

/// Resolve `user`, `uid`, `user:group` or `uid:gid` against `root`/etc/{passwd,group}.
/// A numeric uid with no passwd entry is allowed (like Docker): gid 0, HOME=/.
pub fn resolve(spec: &str, root: &Path) -> Result<ResolvedUser> {
    let spec = spec.trim();
    if spec.is_empty() {
        bail!("empty user");
    }
    let (user_part, group_part) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let pw = passwd(root);
    let gr = groups(root);
    let entry = match user_part.parse::<u32>() {
        Ok(uid) => pw.iter().find(|e| e.uid == uid),
        Err(_) => Some(
            pw.iter()
                .find(|e| e.name == user_part)
                .with_context(|| format!("user {user_part:?} not found in /etc/passwd"))?,
        ),
    };
    let mut user = match entry {
        Some(e) => ResolvedUser {
            name: e.name.clone(),
            uid: e.uid,
            gid: e.gid,
            groups: Vec::new(),
            home: if e.home.is_empty() {
                "/".into()
            } else {
                e.home.clone()
            },
        },
        None => {
            let uid: u32 = user_part.parse().context("uid")?;
            ResolvedUser {
                name: uid.to_string(),
                uid,
                gid: 0,
                groups: Vec::new(),
                home: "/".into(),
            }
        }
    };
    if let Some(g) = group_part {
        user.gid = match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => {
                gr.iter()
                    .find(|e| e.name == g)
                    .with_context(|| format!("group {g:?} not found in /etc/group"))?
                    .gid
            }
        };
    }
    let mut sup = vec![user.gid];
    for g in &gr {
        if g.members.contains(&user.name) && !sup.contains(&g.gid) {
            sup.push(g.gid);
        }
    }
    user.groups = sup;
    Ok(user)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_names_ids_and_groups() -> Result<()> {
        let dir = tempfile::tempdir()?;
        std::fs::create_dir_all(dir.path().join("etc"))?;
        std::fs::write(
            dir.path().join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/bash\nalice:x:1000:1000::/home/alice:/bin/sh\nbad line\n",
        )?;
        std::fs::write(
            dir.path().join("etc/group"),
            "root:x:0:\nalice:x:1000:\ndocker:x:998:bob,alice\nstaff:x:50:\n",
        )?;
        let a = resolve("alice", dir.path())?;
        assert_eq!((a.uid, a.gid, a.home.as_str()), (1000, 1000, "/home/alice"));
        assert_eq!(a.groups, vec![1000, 998]);
        let a = resolve("1000:staff", dir.path())?;
        assert_eq!((a.uid, a.gid, a.name.as_str()), (1000, 50, "alice"));
        let n = resolve("4242", dir.path())?;
        assert_eq!((n.uid, n.gid, n.home.as_str()), (4242, 0, "/"));
        assert!(resolve("mallory", dir.path()).is_err());
        assert!(resolve("alice:nogroup", dir.path()).is_err());
        Ok(())
    }
}
