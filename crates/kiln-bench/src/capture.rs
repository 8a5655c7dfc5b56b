//! Reads kiln-vm's own timing events in this process, so that the engine-level figures can
//! be split without a hook in the engine: `vm restored` carries `loaded_ms` (QEMU launched
//! -> snapshot loaded and running) and `ready_ms` (-> agent connected and clock set);
//! `vm ready` carries `elapsed_ms` of a cold boot to agent-ready.

use std::sync::Mutex;

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::layer::Context;
use tracing_subscriber::Layer;

/// One `vm restored` event.
#[derive(Debug, Clone, Copy)]
pub struct Restored {
    /// Launch -> snapshot loaded, vCPUs running.
    pub loaded_ms: f64,
    /// Launch -> agent connected and guest clock set.
    pub ready_ms: f64,
}

static RESTORED: Mutex<Vec<Restored>> = Mutex::new(Vec::new());

/// Takes the restore events seen since the last call.
pub fn take_restored() -> Vec<Restored> {
    std::mem::take(&mut *RESTORED.lock().unwrap_or_else(|e| e.into_inner()))
}

/// The layer that records them.
#[derive(Debug, Default)]
pub struct CaptureLayer;

#[derive(Default)]
struct Fields {
    message: String,
    loaded_ms: Option<u64>,
    ready_ms: Option<u64>,
}

impl Visit for Fields {
    fn record_u64(&mut self, field: &Field, value: u64) {
        match field.name() {
            "loaded_ms" => self.loaded_ms = Some(value),
            "ready_ms" => self.ready_ms = Some(value),
            _ => {}
        }
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        if let Ok(v) = u64::try_from(value) {
            self.record_u64(field, v);
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            value.clone_into(&mut self.message);
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.message = format!("{value:?}");
        }
    }
}

impl<S: Subscriber> Layer<S> for CaptureLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        if !event.metadata().target().starts_with("kiln_vm") {
            return;
        }
        let mut f = Fields::default();
        event.record(&mut f);
        if f.message == "vm restored" {
            if let (Some(l), Some(r)) = (f.loaded_ms, f.ready_ms) {
                RESTORED
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(Restored {
                        loaded_ms: l as f64,
                        ready_ms: r as f64,
                    });
            }
        }
    }
}
