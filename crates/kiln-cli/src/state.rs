//! Where kiln keeps its state: `KILN_HOME`, else `$XDG_DATA_HOME/kiln`, else `~/.local/share/kiln`.

use std::path::PathBuf;

/// The state directory (not created here).
#[allow(dead_code)]
pub fn state_dir() -> PathBuf {
    if let Some(home) = std::env::var_os("KILN_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(home);
    }
    if let Some(xdg) = std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(xdg).join("kiln");
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from);
    home.join(".local/share/kiln")
}
