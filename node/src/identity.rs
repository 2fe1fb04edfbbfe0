//! The node's persistent secrets in its data directory, and the directory lock.
//!
//! - `identity.key`: an Ed25519 keypair (libp2p protobuf encoding), which gives the node its
//!   peer id. Created on first start, reused after.
//! - `api.token`: the bearer token of the control API, 32 random bytes as hex.
//! - `meshd.lock`: held (flock) while a node runs, so a second node on the same directory is
//!   refused with a clear message before RocksDB is touched.
//!
//! Secrets are written to a temporary file with mode 0600 and renamed into place, so a crash
//! never leaves half a key.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use libp2p::PeerId;
use libp2p::identity::Keypair;
use tracing::{info, warn};

pub const IDENTITY_FILE: &str = "identity.key";
pub const LOCK_FILE: &str = "meshd.lock";

/// Problems with the data directory or the files in it.
#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
    #[error("cannot use data directory {path}: {source}")]
    Create {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("data directory {path} is not writable: {source}")]
    NotWritable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "data directory {path} is in use by another meshd{holder}; stop it or choose another --data-dir"
    )]
    InUse { path: PathBuf, holder: String },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a valid identity key: {reason}")]
    BadKey { path: PathBuf, reason: String },
    #[error("{path} is not a valid API token: it must be one line of printable characters")]
    BadToken { path: PathBuf },
}

/// Creates the data directory if needed and takes its lock for the life of the returned file.
pub fn lock_data_dir(dir: &Path) -> Result<File, DataDirError> {
    std::fs::create_dir_all(dir).map_err(|source| DataDirError::Create {
        path: dir.to_owned(),
        source,
    })?;
    let path = dir.join(LOCK_FILE);
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(|source| DataDirError::NotWritable {
            path: dir.to_owned(),
            source,
        })?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut pid = String::new();
            let _ = file.read_to_string(&mut pid);
            let holder = match pid.trim() {
                "" => String::new(),
                pid => format!(" (pid {pid})"),
            };
            return Err(DataDirError::InUse {
                path: dir.to_owned(),
                holder,
            });
        }
        Err(std::fs::TryLockError::Error(source)) => {
            return Err(DataDirError::NotWritable {
                path: dir.to_owned(),
                source,
            });
        }
    }
    let _ = file.set_len(0);
    let _ = write!(file, "{}", std::process::id());
    Ok(file)
}

/// Loads `identity.key`, creating it on first start.
pub fn load_or_create_identity(dir: &Path) -> Result<Keypair, DataDirError> {
    let path = dir.join(IDENTITY_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => {
            warn_if_readable_by_others(&path);
            Keypair::from_protobuf_encoding(&bytes).map_err(|e| DataDirError::BadKey {
                path: path.clone(),
                reason: e.to_string(),
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let keypair = Keypair::generate_ed25519();
            let bytes = keypair
                .to_protobuf_encoding()
                .map_err(|e| DataDirError::BadKey {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
            write_secret(&path, &bytes)?;
            info!(peer = %PeerId::from(keypair.public()), "created a new node identity");
            Ok(keypair)
        }
        Err(source) => Err(DataDirError::Read { path, source }),
    }
}

/// Loads `api.token`, creating it on first start.
pub fn load_or_create_token(dir: &Path) -> Result<String, DataDirError> {
    let path = dir.join(mesh_proto::api::TOKEN_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            warn_if_readable_by_others(&path);
            let token = text.trim();
            if token.is_empty() || !token.chars().all(|c| c.is_ascii_graphic()) {
                return Err(DataDirError::BadToken { path });
            }
            Ok(token.to_owned())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut raw = [0u8; 32];
            getrandom::fill(&mut raw).map_err(|e| DataDirError::NotWritable {
                path: path.clone(),
                source: std::io::Error::other(e.to_string()),
            })?;
            let token = hex::encode(raw);
            write_secret(&path, format!("{token}\n").as_bytes())?;
            Ok(token)
        }
        Err(source) => Err(DataDirError::Read { path, source }),
    }
}

fn write_secret(path: &Path, bytes: &[u8]) -> Result<(), DataDirError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = path.with_extension("tmp");
    let not_writable = |source| DataDirError::NotWritable {
        path: dir.to_owned(),
        source,
    };
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(not_writable)?;
    file.write_all(bytes).map_err(not_writable)?;
    file.sync_all().map_err(not_writable)?;
    std::fs::rename(&tmp, path).map_err(not_writable)?;
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

fn warn_if_readable_by_others(path: &Path) {
    if let Ok(meta) = std::fs::metadata(path)
        && meta.permissions().mode() & 0o077 != 0
    {
        warn!(path = %path.display(), mode = format!("{:o}", meta.permissions().mode() & 0o777), "secret file is readable by other users; chmod 600 it");
    }
}

/// Reads a cluster key file: 64 hex characters (surrounding whitespace ignored).
pub fn read_cluster_key(path: &Path) -> Result<[u8; 32], String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut key = [0u8; 32];
    hex::decode_to_slice(text.trim(), &mut key).map_err(|e| {
        format!(
            "{} must hold 64 hex characters (make one with `meshd init`): {e}",
            path.display()
        )
    })?;
    Ok(key)
}

/// Writes a new random cluster key to `path` (mode 0600), refusing to overwrite one.
pub fn create_cluster_key(path: &Path) -> Result<(), String> {
    let mut key = [0u8; 32];
    getrandom::fill(&mut key).map_err(|e| format!("no randomness: {e}"))?;
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
    writeln!(file, "{}", hex::encode(key))
        .and_then(|()| file.sync_all())
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_and_token_are_created_once_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let a = load_or_create_identity(dir.path()).unwrap();
        let b = load_or_create_identity(dir.path()).unwrap();
        assert_eq!(PeerId::from(a.public()), PeerId::from(b.public()));
        let t1 = load_or_create_token(dir.path()).unwrap();
        let t2 = load_or_create_token(dir.path()).unwrap();
        assert_eq!(t1, t2);
        assert_eq!(t1.len(), 64);
        for f in [IDENTITY_FILE, mesh_proto::api::TOKEN_FILE] {
            let mode = std::fs::metadata(dir.path().join(f))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{f}");
        }
    }

    #[test]
    fn a_corrupt_identity_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(IDENTITY_FILE), b"garbage").unwrap();
        let err = load_or_create_identity(dir.path()).unwrap_err().to_string();
        assert!(err.contains("not a valid identity key"), "{err}");
    }

    #[test]
    fn the_lock_is_exclusive() {
        let dir = tempfile::tempdir().unwrap();
        let held = lock_data_dir(dir.path()).unwrap();
        let err = lock_data_dir(dir.path()).unwrap_err().to_string();
        assert!(err.contains("in use by another meshd"), "{err}");
        assert!(
            err.contains(&format!("pid {}", std::process::id())),
            "{err}"
        );
        drop(held);
        lock_data_dir(dir.path()).unwrap();
    }

    #[test]
    fn a_data_dir_under_a_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("file");
        std::fs::write(&file, b"x").unwrap();
        let err = lock_data_dir(&file.join("data")).unwrap_err().to_string();
        assert!(err.contains("cannot use data directory"), "{err}");
    }
}
