//! Rust SDK for [kiln]: build sandbox templates, start sandboxes from them, and run
//! commands and move files inside them. It speaks Superserve's wire format, the same as
//! the official Python and TypeScript SDKs, whose names and semantics it follows.
//!
//! - [`Client`]: the server's base URL and a team's API key (explicit, or from
//!   `KILN_URL` / `KILN_API_KEY`, falling back to `SUPERSERVE_BASE_URL` /
//!   `SUPERSERVE_API_KEY`).
//! - [`Template`]: create (a base image, [`Step`]s, a start and a ready command), wait
//!   for the build with its logs, rebuild, list, delete.
//! - [`Sandbox`]: create from a template or a [`Snapshot`], connect, list, pause, resume,
//!   snapshot, set its auto-pause/auto-delete timers, kill; its [`Commands`] (run to
//!   completion, stream, or [`spawn`](Commands::spawn) an interactive [`CommandSession`]),
//!   [`Files`] and [`Previews`] (preview URLs of its web ports, with their access tokens).
//! - [`Snapshot`]: get, list, rename, delete, wait until ready.
//! - [`Secret`]: team secrets a sandbox uses through stand-ins, never holding them
//!   ([`Sandbox::attach_secret`], [`SandboxCreateOptions::secrets`]).
//! - [`Error`]: typed, with the server's stable codes ([`Error::code`]).
//!
//! Only idempotent requests (GET, DELETE) are retried, on 429/502/503/504 and connection
//! errors ([`RetryPolicy`]). Data-plane calls (commands, files) whose token went stale or
//! whose sandbox was paused activate the sandbox once and are retried.
//!
//! ```no_run
//! use kiln_sdk::{
//!     BuildLogEvent, Client, RunOptions, Sandbox, SandboxCreateOptions, Step, Template,
//!     TemplateCreateOptions,
//! };
//!
//! # async fn demo() -> kiln_sdk::Result<()> {
//! let client = Client::from_env()?;
//! let mut template = Template::create(&client, TemplateCreateOptions {
//!     steps: vec![Step::run("pip install requests")],
//!     ..TemplateCreateOptions::new("py", "python:3.11")
//! })
//! .await?;
//! template
//!     .wait_until_ready(Some(&mut |e: &BuildLogEvent| println!("{}", e.text)))
//!     .await?;
//!
//! let sandbox = Sandbox::create(&client, SandboxCreateOptions::new("run-1", "py")).await?;
//! let r = sandbox.commands().run("python3 --version", RunOptions::default()).await?;
//! println!("{}", r.stdout);
//! sandbox.kill().await?;
//! # Ok(()) }
//! ```
//!
//! [kiln]: https://example.invalid/kiln

#![deny(missing_docs)]

mod client;
mod commands;
mod error;
mod files;
mod previews;
mod sandbox;
mod secret;
mod session;
mod snapshot;
mod sse;
mod template;

pub use client::{
    Client, ClientBuilder, RetryPolicy, DEFAULT_BASE_URL, DEFAULT_LIFECYCLE_TIMEOUT,
    DEFAULT_TIMEOUT, STREAM_IDLE_TIMEOUT,
};
pub use commands::{CommandResult, Commands, RunOptions};
pub use error::{Error, Result};
pub use files::{Files, MAX_DOWNLOAD_BYTES};
pub use previews::Previews;
pub use sandbox::{ListOptions, Sandbox, SandboxCreateOptions};
pub use secret::Secret;
pub use session::{CommandSession, Output, EXEC_SUBPROTOCOL};
pub use snapshot::{Snapshot, SnapshotOptions, SNAPSHOT_POLL_INTERVAL};
pub use template::{LogCallback, Template, TemplateCreateOptions, BUILD_POLL_INTERVAL};

/// The wire types, shared with the server (crate `kiln-api`): what the API answers.
pub use kiln_api::{
    ApiErrorCode, AuditQuery, AuthType, BuildInfo, BuildLogEvent, BuildStatus, CreateSecret,
    LogStream, NetworkConfig, PortAccess, PreviewAccess, PreviewPortList, PreviewToken,
    ProviderShortcut, ProxyAuditEvent, PublishedPreviewPort, SandboxInfo, SandboxSecretBinding,
    SandboxStatus, SecretInfo, SecretSandboxBinding, SnapshotInfo, SnapshotPage, SnapshotResources,
    SnapshotStatus, Step, TemplateInfo, TemplateStatus, TerminalSize,
};

/// The `reqwest` version the SDK uses, for [`ClientBuilder::http_client`] and
/// [`Client::base_url`].
pub use reqwest;
