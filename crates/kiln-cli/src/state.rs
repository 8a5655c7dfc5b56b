//! Where kiln keeps its state: `KILN_HOME`, else `$XDG_DATA_HOME/kiln`, else
//! `~/.local/share/kiln` (the store's rule, so every kiln process agrees).

use std::path::PathBuf;

/// The state directory (not created here).
pub fn state_dir() -> PathBuf {
    kiln_engine::Layout::default_root().unwrap_or_else(|| PathBuf::from("/var/lib/kiln"))
}
