//! The one ELF question kiln asks: does this executable need a dynamic loader?
//!
//! Plain `std`, no crate imports: kiln-cli's build script includes this file with `#[path]`
//! to check the agent it embeds, so the build and `kiln setup` refuse the same binaries.

/// Whether `data` is an ELF64 executable with no `PT_INTERP` (i.e. needs no dynamic
/// loader: it can run as `/init` in an initramfs that has no libc).
pub fn is_static(data: &[u8]) -> std::io::Result<bool> {
    let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, "not an ELF64 executable");
    if data.len() < 64 || &data[..4] != b"\x7fELF" || data[4] != 2 {
        return Err(bad());
    }
    let u16at = |o: usize| u16::from_le_bytes([data[o], data[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(data[0x20..0x28].try_into().map_err(|_| bad())?) as usize;
    let (phentsize, phnum) = (u16at(0x36), u16at(0x38));
    for i in 0..phnum {
        let off = phoff + i * phentsize;
        let Some(t) = data.get(off..off + 4) else {
            return Err(bad());
        };
        if u32::from_le_bytes([t[0], t[1], t[2], t[3]]) == 3 {
            return Ok(false);
        }
    }
    Ok(true)
}
