//! File operations: streamed read/write, stat, list, mkdir -p, remove.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};

use bytes::Bytes;
use kiln_agent_proto::frame::{channel, DATA_CHUNK};
use kiln_agent_proto::{
    AgentMsg, DirEntry, ErrorCode, FileKind, FileStat, HostMsg, WriteFileRequest,
};

use crate::server::{io_code, spawn_worker, Ctx, Entry, Input};
use crate::users;

/// Entries per `dir_entries` message (keeps each control frame small).
const LIST_BATCH: usize = 256;

fn fail(ctx: &Ctx, what: &str, path: &str, e: &std::io::Error) {
    ctx.error(io_code(e), format!("{what} {path}: {e}"));
}

fn check_path(ctx: &Ctx, path: &str) -> bool {
    if !path.starts_with('/') {
        ctx.error(ErrorCode::InvalidRequest, "path must be absolute");
        return false;
    }
    true
}

pub fn stat_of(md: &fs::Metadata, path: &Path) -> FileStat {
    let ft = md.file_type();
    let kind = if ft.is_symlink() {
        FileKind::Symlink
    } else if ft.is_dir() {
        FileKind::Dir
    } else if ft.is_file() {
        FileKind::File
    } else {
        FileKind::Other
    };
    FileStat {
        kind,
        size: md.size(),
        mode: md.mode() & 0o7777,
        uid: md.uid(),
        gid: md.gid(),
        mtime_unix_nanos: md.mtime().saturating_mul(1_000_000_000) + md.mtime_nsec(),
        link_target: ft
            .is_symlink()
            .then(|| fs::read_link(path).ok())
            .flatten()
            .map(|p| p.to_string_lossy().into_owned()),
    }
}

/// `mkdir -p`, returning the directories actually created (for chown).
fn mkdir_p(path: &Path, mode: u32) -> std::io::Result<Vec<PathBuf>> {
    let mut missing = Vec::new();
    let mut cur = Some(path);
    while let Some(p) = cur {
        match fs::symlink_metadata(p) {
            Ok(md) if md.is_dir() => break,
            Ok(_) => match fs::metadata(p) {
                Ok(md) if md.is_dir() => break,
                _ => {
                    return Err(std::io::Error::from_raw_os_error(libc::ENOTDIR));
                }
            },
            Err(_) => missing.push(p.to_path_buf()),
        }
        cur = p.parent();
    }
    let mut created = Vec::new();
    for p in missing.into_iter().rev() {
        match fs::create_dir(&p) {
            Ok(()) => {
                let _ = fs::set_permissions(&p, fs::Permissions::from_mode(mode));
                created.push(p);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
    }
    Ok(created)
}

fn chown(path: &Path, uid: u32, gid: u32) -> std::io::Result<()> {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid))
}

/// Requests served on a worker thread.
pub fn run(ctx: &Ctx, msg: HostMsg) {
    match msg {
        HostMsg::Stat { path } => {
            if !check_path(ctx, &path) {
                return;
            }
            match fs::symlink_metadata(&path) {
                Ok(md) => ctx.reply(&AgentMsg::Stat(stat_of(&md, Path::new(&path)))),
                Err(e) => fail(ctx, "stat", &path, &e),
            }
        }
        HostMsg::ListDir { path } => list(ctx, &path),
        HostMsg::Mkdir { path, mode } => {
            if !check_path(ctx, &path) {
                return;
            }
            match mkdir_p(Path::new(&path), mode.unwrap_or(0o755)) {
                Ok(_) => ctx.reply(&AgentMsg::Done { bytes: 0 }),
                Err(e) => fail(ctx, "mkdir", &path, &e),
            }
        }
        HostMsg::Remove { path, recursive } => {
            if !check_path(ctx, &path) {
                return;
            }
            if path == "/" {
                ctx.error(ErrorCode::InvalidRequest, "refusing to remove /");
                return;
            }
            let r = match fs::symlink_metadata(&path) {
                Ok(md) if md.is_dir() => {
                    if recursive {
                        fs::remove_dir_all(&path)
                    } else {
                        fs::remove_dir(&path)
                    }
                }
                Ok(_) => fs::remove_file(&path),
                Err(e) => Err(e),
            };
            match r {
                Ok(()) => ctx.reply(&AgentMsg::Done { bytes: 0 }),
                Err(e) => fail(ctx, "remove", &path, &e),
            }
        }
        HostMsg::ReadFile {
            path,
            offset,
            limit,
        } => read(ctx, &path, offset, limit),
        other => ctx.error(
            ErrorCode::Unsupported,
            format!("unexpected request {other:?}"),
        ),
    }
}

fn list(ctx: &Ctx, path: &str) {
    if !check_path(ctx, path) {
        return;
    }
    let rd = match fs::read_dir(path) {
        Ok(rd) => rd,
        Err(e) => return fail(ctx, "list", path, &e),
    };
    let mut entries: Vec<DirEntry> = rd
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let p = e.path();
            let md = fs::symlink_metadata(&p).ok()?;
            Some(DirEntry {
                name: e.file_name().to_string_lossy().into_owned(),
                stat: stat_of(&md, &p),
            })
        })
        .collect();
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    for batch in entries.chunks(LIST_BATCH) {
        ctx.reply(&AgentMsg::DirEntries {
            entries: batch.to_vec(),
        });
    }
    ctx.reply(&AgentMsg::Done {
        bytes: entries.len() as u64,
    });
}

fn read(ctx: &Ctx, path: &str, offset: u64, limit: Option<u64>) {
    if !check_path(ctx, path) {
        return;
    }
    let mut f = match File::open(path) {
        Ok(f) => f,
        Err(e) => return fail(ctx, "open", path, &e),
    };
    if let Ok(md) = f.metadata() {
        if md.is_dir() {
            ctx.error(ErrorCode::IsADirectory, format!("{path} is a directory"));
            return;
        }
    }
    if offset > 0 {
        if let Err(e) = f.seek(SeekFrom::Start(offset)) {
            return fail(ctx, "seek", path, &e);
        }
    }
    let mut left = limit.unwrap_or(u64::MAX);
    let mut total = 0u64;
    let mut buf = vec![0u8; DATA_CHUNK];
    while left > 0 {
        let want = (buf.len() as u64).min(left) as usize;
        match f.read(&mut buf[..want]) {
            Ok(0) => break,
            Ok(n) => {
                if !ctx.data(channel::STDOUT, Bytes::copy_from_slice(&buf[..n])) {
                    return; // host went away
                }
                total += n as u64;
                left -= n as u64;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return fail(ctx, "read", path, &e),
        }
    }
    ctx.reply(&AgentMsg::Done { bytes: total });
}

/// Open the target synchronously (so following data frames find the stream), then
/// write on a worker thread, returning credit as bytes hit the file.
pub fn start_write(ctx: Ctx, req: WriteFileRequest) -> Option<Entry> {
    if !check_path(&ctx, &req.path) {
        return None;
    }
    let owner = match req.owner.as_deref() {
        None => None,
        Some(spec) => match users::resolve(spec, &ctx.agent.root) {
            Ok(u) => Some((u.uid, u.gid)),
            Err(e) => {
                ctx.error(ErrorCode::UserNotFound, format!("{e:#}"));
                return None;
            }
        },
    };
    let path = PathBuf::from(&req.path);
    if req.create_parents {
        if let Some(parent) = path.parent() {
            match mkdir_p(parent, 0o755) {
                Ok(created) => {
                    if let Some((uid, gid)) = owner {
                        for d in created {
                            let _ = chown(&d, uid, gid);
                        }
                    }
                }
                Err(e) => {
                    fail(&ctx, "mkdir", &req.path, &e);
                    return None;
                }
            }
        }
    }
    let mode = req.mode.unwrap_or(0o644);
    let mut oo = OpenOptions::new();
    oo.write(true).create(true).mode(mode);
    if req.append {
        oo.append(true);
    } else {
        oo.truncate(true);
    }
    let file = match oo.open(&path) {
        Ok(f) => f,
        Err(e) => {
            fail(&ctx, "open", &req.path, &e);
            return None;
        }
    };
    // An explicit mode applies even if the file existed (open's mode only applies on create).
    if let Some(m) = req.mode {
        let _ = file.set_permissions(fs::Permissions::from_mode(m));
    }
    if let Some((uid, gid)) = owner {
        if let Err(e) = chown(&path, uid, gid) {
            fail(&ctx, "chown", &req.path, &e);
            return None;
        }
    }
    let (tx, rx) = mpsc::channel::<Input>();
    let window = ctx.window.clone();
    let done = Arc::new(AtomicBool::new(false));
    let d = done.clone();
    spawn_worker(move || {
        write_loop(&ctx, file, rx, &req.path);
        d.store(true, Ordering::SeqCst);
    });
    Some(Entry {
        done,
        pid: None,
        input: Some(tx),
        window,
        pty: None,
    })
}

fn write_loop(ctx: &Ctx, mut file: File, rx: mpsc::Receiver<Input>, path: &str) {
    let mut total = 0u64;
    for item in rx {
        match item {
            Input::Data(b) => {
                if let Err(e) = file.write_all(&b) {
                    return fail(ctx, "write", path, &e);
                }
                total += b.len() as u64;
                ctx.reply(&AgentMsg::Credit {
                    bytes: b.len() as u32,
                });
            }
            Input::Eof => {
                if let Err(e) = file.flush() {
                    return fail(ctx, "flush", path, &e);
                }
                ctx.reply(&AgentMsg::Done { bytes: total });
                return;
            }
        }
    }
    // Sender dropped without eof: the connection was reset or the frame was rejected.
    tracing::info!(path, total, "file write aborted");
}
