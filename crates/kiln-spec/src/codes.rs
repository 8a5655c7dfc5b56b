//! Stable error codes.
//!
//! These strings are a public contract: the official SDKs parse a failed build's
//! `error_message` as `"<code>: <detail>"` and expose the code to users, who match on it.
//! They are therefore enums here, with exactly one place that spells each string.

use std::fmt;

/// Declares an enum whose variants are spelled on the wire as the given strings, with
/// `ALL`, `as_str`, `Display`, `FromStr` (error [`UnknownCode`]) and serde as those
/// strings. Extra attributes (e.g. a database derive) pass through.
///
/// With a trailing `else Unknown => "unknown"`, the enum also has that variant, which
/// deserialisation gives for any string it does not know: a client reading a value that a
/// newer server added gets `Unknown` instead of failing on the whole response. `ALL` and
/// `FromStr` leave it out, so nothing parses text into it by mistake.
#[macro_export]
macro_rules! string_enum {
    (
        $(#[$meta:meta])*
        pub enum $name:ident { $( $(#[$vmeta:meta])* $variant:ident => $s:literal, )* }
    ) => {
        $crate::string_enum!(@emit [$(#[$meta])*] $name [$( [$(#[$vmeta])*] $variant $s )*] []);
    };
    (
        $(#[$meta:meta])*
        pub enum $name:ident { $( $(#[$vmeta:meta])* $variant:ident => $s:literal, )* }
        $(#[$umeta:meta])* else $unknown:ident => $us:literal $(,)?
    ) => {
        $crate::string_enum!(
            @emit [$(#[$meta])*] $name [$( [$(#[$vmeta])*] $variant $s )*]
            [[$(#[$umeta])*] $unknown $us]
        );
    };
    (
        @emit [$($meta:tt)*] $name:ident [$( [$($vmeta:tt)*] $variant:ident $s:literal )*]
        [$( [$($umeta:tt)*] $unknown:ident $us:literal )?]
    ) => {
        $($meta)*
        #[derive(
            Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord,
            serde::Serialize, serde::Deserialize,
        )]
        pub enum $name {
            $( $($vmeta)* #[serde(rename = $s)] $variant, )*
            $( $($umeta)* #[serde(other, rename = $us)] $unknown, )?
        }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant,)*];

            /// The stable wire string.
            pub const fn as_str(self) -> &'static str {
                match self { $($name::$variant => $s,)* $($name::$unknown => $us,)? }
            }
        }

        impl ::std::fmt::Display for $name {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl ::std::str::FromStr for $name {
            type Err = $crate::UnknownCode;
            fn from_str(s: &str) -> ::std::result::Result<Self, Self::Err> {
                match s {
                    $($s => Ok($name::$variant),)*
                    _ => Err($crate::UnknownCode(s.to_owned())),
                }
            }
        }
    };
}

string_enum! {
    /// Why a build ended in `failed`. Carried as the prefix of the build's `error_message`.
    pub enum BuildErrorCode {
        /// The `from` reference is malformed.
        BadReference => "bad_reference",
        /// The image has no `linux/amd64` variant.
        UnsupportedPlatform => "unsupported_platform",
        /// The image could not be resolved or fetched (missing, denied, invalid).
        ImagePullFailed => "image_pull_failed",
        /// The registry could not be reached, whatever the cause (refused, DNS, timeout, a
        /// private address the server does not allow): one code so builds are no port scanner.
        RegistryUnreachable => "registry_unreachable",
        /// The image was refused: an escaping layer entry, an Alpine or shell-less base.
        ImageUnsafe => "image_unsafe",
        /// The flattened image does not fit in the requested `diskMib`.
        ImageTooLarge => "image_too_large",
        /// A `run` step (or a step's setup) exited non-zero.
        StepFailed => "step_failed",
        /// The build VM did not come up.
        BootFailed => "boot_failed",
        /// The running VM could not be captured.
        SnapshotFailed => "snapshot_failed",
        /// `startCmd` did not launch, or exited non-zero before the snapshot.
        StartCmdFailed => "start_cmd_failed",
        /// `readyCmd` did not exit 0 in time.
        ReadyCmdFailed => "ready_cmd_failed",
        /// The build could not be handed to a build host.
        DispatchFailed => "dispatch_failed",
        /// Anything else.
        BuildFailed => "build_failed",
    }
}

/// A string that is not one of the known codes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown error code {0:?}")]
pub struct UnknownCode(pub String);

/// A failure message of the form `"<code>: <detail>"`, as stored on a failed build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CodedMessage {
    /// The stable code.
    pub code: BuildErrorCode,
    /// Human-readable detail; may be empty.
    pub detail: String,
}

impl CodedMessage {
    /// A message with the given code and detail.
    pub fn new(code: BuildErrorCode, detail: impl Into<String>) -> Self {
        Self {
            code,
            detail: detail.into(),
        }
    }

    /// Parses `"<code>: <detail>"` (or a bare `"<code>"`).
    ///
    /// A message whose prefix is not a known code parses as `build_failed` with the whole
    /// message as detail, which is what the SDKs do with an unrecognised prefix.
    pub fn parse(message: &str) -> Self {
        let (head, detail) = match message.split_once(':') {
            Some((head, rest)) => (head, rest.strip_prefix(' ').unwrap_or(rest)),
            None => (message, ""),
        };
        match head.parse() {
            Ok(code) => Self::new(code, detail),
            Err(_) => Self::new(BuildErrorCode::BuildFailed, message),
        }
    }
}

impl fmt::Display for CodedMessage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.detail.is_empty() {
            f.write_str(self.code.as_str())
        } else {
            write!(f, "{}: {}", self.code, self.detail)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_round_trips_through_its_string() {
        for code in BuildErrorCode::ALL {
            assert_eq!(code.as_str().parse::<BuildErrorCode>().unwrap(), *code);
            let json = serde_json::to_string(code).unwrap();
            assert_eq!(
                serde_json::from_str::<BuildErrorCode>(&json).unwrap(),
                *code
            );
        }
    }

    #[test]
    fn stable_strings() {
        let all: Vec<_> = BuildErrorCode::ALL.iter().map(|c| c.as_str()).collect();
        assert_eq!(
            all,
            [
                "bad_reference",
                "unsupported_platform",
                "image_pull_failed",
                "registry_unreachable",
                "image_unsafe",
                "image_too_large",
                "step_failed",
                "boot_failed",
                "snapshot_failed",
                "start_cmd_failed",
                "ready_cmd_failed",
                "dispatch_failed",
                "build_failed"
            ]
        );
    }

    #[test]
    fn coded_messages_format_and_parse() {
        let m = CodedMessage::new(BuildErrorCode::StepFailed, "step 2 (`false`) exited 1");
        assert_eq!(m.to_string(), "step_failed: step 2 (`false`) exited 1");
        assert_eq!(CodedMessage::parse(&m.to_string()), m);
        assert_eq!(
            CodedMessage::parse("boot_failed"),
            CodedMessage::new(BuildErrorCode::BootFailed, "")
        );
        assert_eq!(
            CodedMessage::parse("kaboom: x"),
            CodedMessage::new(BuildErrorCode::BuildFailed, "kaboom: x")
        );
        // A detail holding further colons is kept whole.
        assert_eq!(
            CodedMessage::parse("image_pull_failed: a: b").detail,
            "a: b"
        );
    }
}
