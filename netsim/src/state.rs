//! The run directory and its state file: what a run created, so it can be removed.
//!
//! `netsim up` writes `state.json` before it creates anything (a namespace is recorded, then
//! made), and rewrites it whenever a process starts or stops. Other commands read it to find
//! the control socket, a node's namespace, API address and data directory. When the owning
//! process is gone (crash, `kill -9`), [`clean_leftovers`] removes what the file lists: child
//! processes that outlived it (normally already killed by their parent-death signal) and the
//! namespaces. The file is versioned like everything netsim persists.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::netns;

pub const VERSION: u32 = 1;
pub const STATE_FILE: &str = "state.json";
pub const SOCKET_FILE: &str = "control.sock";

/// Where runs live unless `--run-dir` says otherwise.
pub fn default_run_dir() -> PathBuf {
    std::env::var_os("NETSIM_RUN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp/netsim"))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Namespaces, TUNs and the router: the emulated WAN.
    Netns,
    /// Everything on 127.0.0.1 with distinct ports; no latency, no partitions.
    Loopback,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Bootstrap,
    Node,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProcessState {
    /// Planned but not started yet: a standby node, started by `netsim restart`.
    Standby,
    Starting,
    Running,
    Killed,
    Exited,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeRecord {
    pub name: String,
    pub role: Role,
    pub region: String,
    pub zone: String,
    /// Namespace the node runs in (netns mode).
    pub namespace: Option<String>,
    /// The node's IP address (its TUN's in netns mode, 127.0.0.1 on loopback).
    pub address: String,
    /// QUIC listen multiaddr.
    pub listen: String,
    /// Control API `host:port`, reachable inside the node's namespace.
    pub api: String,
    pub data_dir: PathBuf,
    pub log: PathBuf,
    pub peer_id: Option<String>,
    pub pid: Option<u32>,
    pub state: ProcessState,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunState {
    pub version: u32,
    /// Short random id; namespaces are named `netsim-<run>-<node>`.
    pub run: String,
    /// The `netsim up` process that owns everything below.
    pub pid: u32,
    pub mode: Mode,
    pub topology: String,
    pub namespaces: Vec<String>,
    pub nodes: Vec<NodeRecord>,
    /// Partitions in force, as (regions, from) lists of region names.
    #[serde(default)]
    pub partitions: Vec<(Vec<String>, Vec<String>)>,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no netsim run in {dir}: start one with `netsim up TOPOLOGY --run-dir {dir}`")]
    NoRun { dir: String },
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a netsim state file ({reason}); remove it if no run is up")]
    Corrupt { path: String, reason: String },
    #[error("cannot write {path}: {source}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

impl RunState {
    pub fn node(&self, name: &str) -> Option<&NodeRecord> {
        self.nodes.iter().find(|n| n.name == name)
    }

    pub fn node_mut(&mut self, name: &str) -> Option<&mut NodeRecord> {
        self.nodes.iter_mut().find(|n| n.name == name)
    }

    pub fn names(&self) -> String {
        self.nodes
            .iter()
            .map(|n| n.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

pub fn state_path(run_dir: &Path) -> PathBuf {
    run_dir.join(STATE_FILE)
}

pub fn socket_path(run_dir: &Path) -> PathBuf {
    run_dir.join(SOCKET_FILE)
}

pub fn load(run_dir: &Path) -> Result<RunState, Error> {
    let path = state_path(run_dir);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::NoRun {
                dir: run_dir.display().to_string(),
            });
        }
        Err(source) => {
            return Err(Error::Read {
                path: path.display().to_string(),
                source,
            });
        }
    };
    let state: RunState = serde_json::from_str(&text).map_err(|e| Error::Corrupt {
        path: path.display().to_string(),
        reason: e.to_string(),
    })?;
    if state.version != VERSION {
        return Err(Error::Corrupt {
            path: path.display().to_string(),
            reason: format!("version {} (this netsim reads {VERSION})", state.version),
        });
    }
    Ok(state)
}

/// Writes the state atomically (temporary file, then rename), so a crash never leaves half a
/// file for the next `up` to trip on.
pub fn save(run_dir: &Path, state: &RunState) -> Result<(), Error> {
    let path = state_path(run_dir);
    let tmp = run_dir.join(format!("{STATE_FILE}.tmp"));
    let err = |source| Error::Write {
        path: path.display().to_string(),
        source,
    };
    let text = serde_json::to_string_pretty(state).map_err(|e| err(std::io::Error::other(e)))?;
    std::fs::write(&tmp, text).map_err(err)?;
    std::fs::rename(&tmp, &path).map_err(err)
}

/// Whether `pid` is a live process running the executable named `exe_name`. Checking the name
/// guards against a recycled pid.
pub fn process_alive(pid: u32, exe_name: &str) -> bool {
    // A zombie is dead already; only its parent (maybe init) has yet to reap it.
    let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            stat.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(true);
    !zombie
        && std::fs::read(format!("/proc/{pid}/cmdline"))
            .map(|cmd| {
                cmd.split(|b| *b == 0)
                    .take(8)
                    .any(|arg| String::from_utf8_lossy(arg).ends_with(exe_name))
            })
            .unwrap_or(false)
}

/// The owner of a run, if it still runs.
pub fn owner_alive(state: &RunState) -> bool {
    state.pid != std::process::id() && process_alive(state.pid, "netsim")
}

/// Removes everything a dead run left: its processes, namespaces, socket and state file.
/// Returns what it removed, for the user.
pub fn clean_leftovers(run_dir: &Path, state: &RunState) -> Vec<String> {
    let mut removed = Vec::new();
    for node in &state.nodes {
        let exe = match node.role {
            Role::Bootstrap => "mesh-bootstrap",
            Role::Node => "meshd",
        };
        if let Some(pid) = node.pid
            && process_alive(pid, exe)
        {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            removed.push(format!("process {} (pid {pid})", node.name));
        }
    }
    for ns in &state.namespaces {
        if netns::exists(ns) && netns::delete(ns).is_ok() {
            removed.push(format!("namespace {ns}"));
        }
    }
    let _ = std::fs::remove_file(socket_path(run_dir));
    let _ = std::fs::remove_file(state_path(run_dir));
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> RunState {
        RunState {
            version: VERSION,
            run: "ab12".into(),
            pid: 1,
            mode: Mode::Netns,
            topology: "t.toml".into(),
            namespaces: vec!["netsim-ab12-n1".into()],
            nodes: vec![NodeRecord {
                name: "n1".into(),
                role: Role::Node,
                region: "aws/us-east-1".into(),
                zone: "aws/us-east-1/a".into(),
                namespace: Some("netsim-ab12-n1".into()),
                address: "10.77.1.1".into(),
                listen: "/ip4/10.77.1.1/udp/4001/quic-v1".into(),
                api: "127.0.0.1:5080".into(),
                data_dir: "/tmp/x/n1".into(),
                log: "/tmp/x/logs/n1.log".into(),
                peer_id: None,
                pid: Some(42),
                state: ProcessState::Running,
            }],
            partitions: vec![],
        }
    }

    #[test]
    fn round_trips_and_checks_version() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(matches!(load(dir.path()), Err(Error::NoRun { .. })));
        let mut state = sample();
        save(dir.path(), &state).expect("save");
        let back = load(dir.path()).expect("load");
        assert_eq!(back.node("n1").map(|n| n.pid), Some(Some(42)));
        state.version = 99;
        save(dir.path(), &state).expect("save");
        assert!(matches!(load(dir.path()), Err(Error::Corrupt { .. })));
    }
}
