//! The store's records as the API shows them: the one place where kiln's rows become
//! `kiln-api` types. The server and the CLI (local and remote) print only these.

use kiln_api::{
    BuildInfo, BuildLogEvent, SandboxInfo, SandboxSecretBinding, SandboxStatus, SnapshotInfo,
    SnapshotResources, TemplateInfo,
};
use kiln_store::{BindingState, Build, LogLine, Sandbox, Snapshot, Template};

use crate::Engine;

pub(crate) fn template(t: &Template) -> TemplateInfo {
    TemplateInfo {
        id: t.id.clone(),
        name: t.name.clone(),
        team_id: t.team_id.clone(),
        status: t.status,
        vcpu: t.vcpu,
        memory_mib: t.memory_mib,
        disk_mib: t.disk_mib,
        size_bytes: t.size_bytes,
        error_message: t.error_message.clone(),
        created_at: t.created_at,
        built_at: t.built_at,
        latest_build_id: t.latest_build_id.clone(),
        build_spec: Some(t.build_spec.clone()),
    }
}

pub(crate) fn build(b: &Build) -> BuildInfo {
    BuildInfo {
        id: b.id.clone(),
        template_id: b.template_id.clone(),
        status: b.status,
        build_spec_hash: b.build_spec_hash.clone(),
        image_digest: b.image_digest.clone(),
        error_message: b.error_message.clone(),
        created_at: b.created_at,
        started_at: b.started_at,
        finalized_at: b.finalized_at,
    }
}

pub(crate) fn snapshot(s: &Snapshot) -> SnapshotInfo {
    SnapshotInfo {
        id: s.id.clone(),
        sandbox_id: s.sandbox_id.clone(),
        template_id: Some(s.template_id.clone()),
        kind: s.kind.clone(),
        status: s.status,
        name: s.name.clone(),
        size_bytes: s.size_bytes,
        resources: SnapshotResources {
            vcpu_count: s.vcpu_count,
            memory_mib: s.memory_mib,
            disk_mib: s.disk_mib,
        },
        created_at: s.created_at,
        ready_at: s.ready_at,
        error_message: s.error_message.clone(),
    }
}

pub(crate) fn log_line(l: &LogLine) -> BuildLogEvent {
    BuildLogEvent {
        timestamp: l.timestamp,
        stream: l.stream,
        text: l.text.clone(),
        finished: false,
        status: None,
    }
}

impl Engine {
    /// A sandbox as the API shows it, with its egress rules (kept next to its VM, not in
    /// the store).
    pub(crate) fn sandbox_info(&self, s: &Sandbox) -> SandboxInfo {
        SandboxInfo {
            id: s.id.clone(),
            name: s.name.clone(),
            status: s.status,
            vcpu_count: s.vcpu_count,
            memory_mib: s.memory_mib,
            created_at: s.created_at,
            updated_at: Some(s.updated_at),
            template_id: Some(s.template_id.clone()),
            build_id: Some(s.build_id.clone()),
            metadata: s.metadata.clone(),
            timeout_seconds: s.timeout_seconds.map(u64::from),
            auto_delete_seconds: s.auto_delete_seconds.map(u64::from),
            auto_delete_at: s.delete_at.filter(|_| s.status == SandboxStatus::Paused),
            source_snapshot_id: s.source_snapshot_id.clone(),
            network: self.network_rules(&s.id),
            preview_access: s.preview_access,
            secrets: secret_bindings(s),
        }
    }
}

/// A sandbox's bindings as the API lists them: detached ones are gone, a deleted secret's
/// are `revoked`; none at all is no list.
fn secret_bindings(s: &Sandbox) -> Option<Vec<SandboxSecretBinding>> {
    let list: Vec<SandboxSecretBinding> = s
        .secrets
        .iter()
        .filter(|b| b.state != BindingState::Detached)
        .map(|b| SandboxSecretBinding {
            env_key: b.env_key.clone(),
            secret_name: b.secret_name.clone(),
            revoked: (b.state == BindingState::Revoked).then_some(true),
        })
        .collect();
    (!list.is_empty()).then_some(list)
}
