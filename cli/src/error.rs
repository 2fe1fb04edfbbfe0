//! What can go wrong in a meshctl command, worded for the person at the terminal, and the exit
//! code each kind maps to.
//!
//! Every message is complete on its own (what failed, with which input, what to try); `main`
//! prints it once and does not append source chains, so causes are folded into the text here.

use std::io;
use std::path::PathBuf;

use mesh_proto::job::JobState;
use mesh_proto::{ChunkId, JobId, ManifestError, ObjectId};

/// Exit codes, documented in `meshctl --help`.
pub mod exit {
    pub const ERROR: u8 = 1;
    /// What clap exits with for a bad command line.
    pub const USAGE: u8 = 2;
    pub const NOT_FOUND: u8 = 3;
    pub const UNREACHABLE: u8 = 4;
    pub const UNAUTHORIZED: u8 = 5;
}

/// A failed meshctl command.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Arguments that parse but do not fit together (clap catches the rest).
    #[error("{0}")]
    Usage(String),

    #[error("invalid --api URL {url:?}: {reason}")]
    BadApiUrl { url: String, reason: String },

    #[error(
        "no API token: pass --token or set MESH_API_TOKEN, or point --data-dir at the node's data \
         directory (could not read {}: {})",
        path.display(),
        describe_io(source)
    )]
    NoToken { path: PathBuf, source: io::Error },

    #[error("the API token in {} is empty; pass --token or set MESH_API_TOKEN", path.display())]
    EmptyToken { path: PathBuf },

    #[error("the API token from {origin} contains characters an HTTP header cannot carry")]
    MalformedToken { origin: String },

    #[error(
        "cannot reach meshd at {api} ({cause}): is it running? start it with `meshd --data-dir {}`",
        data_dir.display()
    )]
    Unreachable {
        api: String,
        data_dir: PathBuf,
        cause: String,
    },

    #[error(
        "the API token was refused: {message} (token from {origin}; pass the node's token with \
         --token or MESH_API_TOKEN, or point --data-dir at its data directory)"
    )]
    Unauthorized { message: String, origin: String },

    #[error("object {id} not found")]
    ObjectNotFound { id: ObjectId },

    #[error("not found: {message}")]
    NotFound { message: String },

    #[error("meshd's disk is full: {message}")]
    ServerDiskFull { message: String },

    /// The node could not reach enough of the mesh, e.g. a put below its write quorum.
    #[error("meshd could not complete the request: {message}")]
    ServerUnavailable { message: String },

    #[error("meshd refused the request ({status}): {message}")]
    Server {
        status: reqwest::StatusCode,
        message: String,
    },

    #[error("talking to meshd at {api} failed: {cause}")]
    Transport { api: String, cause: String },

    #[error("meshd sent an unexpected answer: {0}")]
    BadResponse(String),

    #[error("the manifest of {id} failed verification: {source}")]
    BadManifest { id: ObjectId, source: ManifestError },

    #[error(transparent)]
    Verify(#[from] VerifyError),

    #[error("{} exists; pass --force to overwrite it", path.display())]
    FileExists { path: PathBuf },

    #[error("{} is a directory, not a file", path.display())]
    IsDirectory { path: PathBuf },

    #[error("permission denied {action} {}", path.display())]
    PermissionDenied { action: &'static str, path: PathBuf },

    #[error("no space left on device writing {}", path.display())]
    NoSpace { path: PathBuf },

    #[error("{action} {} failed: {}", path.display(), describe_io(source))]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },

    #[error("interrupted; nothing was written")]
    Interrupted,

    /// A local file the command line names (a job spec, a `--param KEY=@FILE`).
    #[error("cannot read {what} from {}: {}", path.display(), describe_io(source))]
    Read {
        what: String,
        path: PathBuf,
        source: io::Error,
    },

    /// A job that was waited for ended failed or cancelled; `details` is its error and dead
    /// letters, one per line.
    #[error("job {id} {state}{details}")]
    JobEnded {
        id: JobId,
        state: JobState,
        details: String,
    },
}

impl Error {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::ObjectNotFound { .. } | Self::NotFound { .. } => exit::NOT_FOUND,
            Self::Unreachable { .. } => exit::UNREACHABLE,
            Self::Unauthorized { .. } => exit::UNAUTHORIZED,
            Self::Usage(_) => exit::USAGE,
            _ => exit::ERROR,
        }
    }

    /// Classifies a local IO failure on `path`, so that the common ones (permission, disk full,
    /// a parent that is not a directory) get a message that names the fix.
    pub fn local_io(action: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        let path = path.into();
        match source.kind() {
            io::ErrorKind::PermissionDenied | io::ErrorKind::ReadOnlyFilesystem => {
                Self::PermissionDenied { action, path }
            }
            io::ErrorKind::StorageFull => Self::NoSpace { path },
            _ => Self::Io {
                action,
                path,
                source,
            },
        }
    }
}

/// Why a downloaded byte stream does not match its manifest. Nothing of a chunk that fails
/// these checks is ever written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error(
        "chunk {index} (bytes {offset}..{end}) is corrupt: expected BLAKE3 {expected}, got {actual}",
        end = offset + u64::from(*len)
    )]
    ChunkMismatch {
        index: usize,
        offset: u64,
        len: u32,
        expected: ChunkId,
        actual: ChunkId,
    },

    #[error("meshd sent more than the {size} bytes the manifest lists")]
    TooLong { size: u64 },

    #[error("the download ended after {received} of {size} bytes")]
    Truncated { received: u64, size: u64 },
}

/// An IO error's text without the "(os error N)" suffix, which tells a person nothing.
fn describe_io(err: &io::Error) -> String {
    let text = err.to_string();
    match text.find(" (os error") {
        Some(at) => text[..at].to_owned(),
        None => text,
    }
}

/// An error and its causes joined into one line, skipping causes whose text the previous
/// one already contains (reqwest and hyper repeat themselves).
pub fn describe_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = vec![err.to_string()];
    let mut source = err.source();
    while let Some(cause) = source {
        let text = match cause.downcast_ref::<io::Error>() {
            Some(io) => describe_io(io),
            None => cause.to_string(),
        };
        if parts.last().is_none_or(|last| !last.contains(&text)) {
            parts.push(text);
        }
        source = cause.source();
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_io_names_the_path_and_the_fix() {
        let denied = io::Error::from(io::ErrorKind::PermissionDenied);
        let msg = Error::local_io("reading", "/x/in.bin", denied).to_string();
        assert_eq!(msg, "permission denied reading /x/in.bin");

        let full = io::Error::from(io::ErrorKind::StorageFull);
        let msg = Error::local_io("writing", "/x/out.bin", full).to_string();
        assert_eq!(msg, "no space left on device writing /x/out.bin");

        let other = io::Error::from_raw_os_error(20);
        let msg = Error::local_io("writing", "/x/file/out", other).to_string();
        assert!(msg.starts_with("writing /x/file/out failed: "), "{msg}");
        assert!(!msg.contains("os error"), "{msg}");
    }

    #[test]
    fn exit_codes_follow_the_documented_table() {
        let id = ObjectId::of(b"x");
        assert_eq!(Error::ObjectNotFound { id }.exit_code(), 3);
        let unreachable = Error::Unreachable {
            api: "u".into(),
            data_dir: "d".into(),
            cause: "c".into(),
        };
        assert_eq!(unreachable.exit_code(), 4);
        let refused = Error::Unauthorized {
            message: "m".into(),
            origin: "o".into(),
        };
        assert_eq!(refused.exit_code(), 5);
        assert_eq!(Error::Interrupted.exit_code(), 1);
        let unavailable = Error::ServerUnavailable {
            message: "chunk x reached 1 of the 2 holders the write quorum needs".into(),
        };
        assert_eq!(unavailable.exit_code(), 1);
        assert_eq!(Error::Usage("u".into()).exit_code(), 2);
        assert!(
            unavailable
                .to_string()
                .contains("reached 1 of the 2 holders the write quorum needs"),
            "{unavailable}"
        );
    }

    #[test]
    fn chains_drop_repeated_causes() {
        let inner = io::Error::new(io::ErrorKind::ConnectionRefused, "connection refused");
        let outer = io::Error::other(Wrapper(inner));
        assert_eq!(describe_chain(&outer), "wrapped: connection refused");
    }

    #[derive(Debug)]
    struct Wrapper(io::Error);
    impl std::fmt::Display for Wrapper {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("wrapped")
        }
    }
    impl std::error::Error for Wrapper {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }
}
