//! Driving a netsim run from outside, the way a person at a terminal would: `netsim up` as a
//! child process, `netsim exec NODE -- meshctl ...` for every step, `netsim down` at the end.
//!
//! [`Driver`] owns the `netsim up` child; dropping it runs `netsim down` and waits for the
//! child, so a demo or a benchmark that fails half-way still leaves nothing running. `demo`
//! and `bench` are built on it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use serde_json::Value;

use crate::state::{self, Mode, ProcessState, Role, RunState};

/// How long `netsim up` may take until every process runs.
const UP_TIMEOUT: Duration = Duration::from_secs(90);
/// How long `netsim down` may take before the child is killed.
const DOWN_TIMEOUT: Duration = Duration::from_secs(15);

/// A running `netsim up` and the commands that act on it.
#[derive(Debug)]
pub struct Driver {
    exe: PathBuf,
    run_dir: PathBuf,
    bin_dir: Option<PathBuf>,
    up: Option<Child>,
}

/// A storage peer as `meshctl --json peers` shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct Peer {
    pub id: String,
    pub zone: String,
    pub rtt_ms: f64,
}

impl Driver {
    /// Writes `topology` (the text of a topology file) to `RUN_DIR/NAME.toml`, starts
    /// `netsim up` on it with its output in `RUN_DIR/netsim-up.log`, and waits until every
    /// process but the standby ones runs.
    pub fn up(
        run_dir: &Path,
        bin_dir: Option<&Path>,
        name: &str,
        topology: &str,
        mode: Mode,
    ) -> anyhow::Result<(Self, RunState)> {
        let exe = std::env::current_exe().context("cannot find the netsim executable")?;
        Self::up_with(exe, run_dir, bin_dir, name, topology, mode)
    }

    /// [`Driver::up`] through the `netsim` executable `exe`, for drivers that are not netsim
    /// itself (the latency tests).
    pub fn up_with(
        exe: PathBuf,
        run_dir: &Path,
        bin_dir: Option<&Path>,
        name: &str,
        topology: &str,
        mode: Mode,
    ) -> anyhow::Result<(Self, RunState)> {
        std::fs::create_dir_all(run_dir)
            .with_context(|| format!("cannot create {}", run_dir.display()))?;
        let run_dir = run_dir
            .canonicalize()
            .with_context(|| format!("cannot resolve {}", run_dir.display()))?;
        let topology_path = run_dir.join(format!("{name}.toml"));
        std::fs::write(&topology_path, topology)
            .with_context(|| format!("cannot write {}", topology_path.display()))?;
        let mut up = Command::new(&exe);
        up.arg("up")
            .arg(&topology_path)
            .arg("--run-dir")
            .arg(&run_dir);
        if let Some(bin) = bin_dir {
            up.arg("--bin-dir").arg(bin);
        }
        if mode == Mode::Loopback {
            up.arg("--loopback");
        }
        let log_path = run_dir.join("netsim-up.log");
        let log = std::fs::File::create(&log_path)
            .with_context(|| format!("cannot create {}", log_path.display()))?;
        let child = up
            .stdout(log.try_clone().context("cannot duplicate the log file")?)
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .context("cannot start netsim up")?;
        let mut driver = Self {
            exe,
            run_dir: run_dir.clone(),
            bin_dir: bin_dir.map(Path::to_path_buf),
            up: Some(child),
        };
        let state = wait_for(
            &format!("every node to start (see {})", log_path.display()),
            UP_TIMEOUT,
            || {
                if let Some(Ok(Some(status))) = driver.up.as_mut().map(Child::try_wait) {
                    return Some(Err(anyhow!(
                        "netsim up exited ({status}); see {}",
                        log_path.display()
                    )));
                }
                state::load(&run_dir)
                    .ok()
                    .filter(|s| {
                        s.nodes.iter().all(|n| {
                            matches!(n.state, ProcessState::Running | ProcessState::Standby)
                        })
                    })
                    .filter(|_| state::socket_path(&run_dir).exists())
                    .map(Ok)
            },
        )??;
        Ok((driver, state))
    }

    pub fn run_dir(&self) -> &Path {
        &self.run_dir
    }

    /// The run's state file as it is now.
    pub fn state(&self) -> anyhow::Result<RunState> {
        Ok(state::load(&self.run_dir)?)
    }

    /// `netsim exec NODE -- meshctl ARGS...`, not started yet.
    pub fn meshctl_command(&self, node: &str, args: &[&str]) -> Command {
        let mut command = Command::new(&self.exe);
        command
            .arg("exec")
            .arg(node)
            .arg("--run-dir")
            .arg(&self.run_dir);
        if let Some(bin) = &self.bin_dir {
            command.arg("--bin-dir").arg(bin);
        }
        command.arg("--").arg("meshctl").args(args);
        command.stdin(Stdio::null());
        command
    }

    /// Runs `netsim exec NODE -- meshctl ARGS...` and returns its standard output.
    pub fn meshctl(&self, node: &str, args: &[&str]) -> anyhow::Result<String> {
        let out = self
            .meshctl_command(node, args)
            .output()
            .context("cannot run netsim exec")?;
        check_output(node, args, &out)
    }

    /// `netsim exec NODE -- meshctl --json ARGS...`, parsed.
    pub fn meshctl_json(&self, node: &str, args: &[&str]) -> anyhow::Result<Value> {
        let out = self.meshctl(node, &[&["--json"], args].concat())?;
        parse_json(node, args, &out)
    }

    /// `netsim ARGS... --run-dir RUN_DIR` (kill, restart, partition, ...); returns its output.
    pub fn netsim(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new(&self.exe)
            .args(args)
            .arg("--run-dir")
            .arg(&self.run_dir)
            .stdin(Stdio::null())
            .output()
            .context("cannot run netsim")?;
        if !out.status.success() {
            bail!(
                "`netsim {}` failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Waits until `node` sees at least `peers` storage peers alive with a measured RTT.
    pub fn wait_peers(
        &self,
        node: &str,
        peers: usize,
        limit: Duration,
    ) -> anyhow::Result<Vec<Peer>> {
        wait_for(
            &format!("{node} to see {peers} storage peers alive"),
            limit,
            || {
                let v = self.meshctl_json(node, &["peers"]).ok()?;
                let alive = alive_storage_peers(&v);
                (alive.len() >= peers).then_some(alive)
            },
        )
    }

    /// Waits until every running storage node sees every other one (standby nodes not
    /// counted until they run).
    pub fn wait_mesh(&self, limit: Duration) -> anyhow::Result<()> {
        let state = self.state()?;
        let running: Vec<&str> = state
            .nodes
            .iter()
            .filter(|n| n.role == Role::Node && n.state == ProcessState::Running)
            .map(|n| n.name.as_str())
            .collect();
        for node in &running {
            self.wait_peers(node, running.len() - 1, limit)?;
        }
        Ok(())
    }

    /// Stops the run now (also done on drop).
    pub fn down(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        let Some(mut child) = self.up.take() else {
            return;
        };
        let _ = crate::cluster::down(&self.run_dir);
        let deadline = Instant::now() + DOWN_TIMEOUT;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The standard output of a finished `netsim exec NODE -- meshctl ARGS`, or an error with
/// everything it printed.
pub fn check_output(
    node: &str,
    args: &[&str],
    out: &std::process::Output,
) -> anyhow::Result<String> {
    if !out.status.success() {
        bail!(
            "`netsim exec {node} -- meshctl {}` failed ({}): {} {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `meshctl --json` output, parsed.
pub fn parse_json(node: &str, args: &[&str], out: &str) -> anyhow::Result<Value> {
    serde_json::from_str(out).with_context(|| {
        format!(
            "meshctl {} on {node} printed no JSON: {out}",
            args.join(" ")
        )
    })
}

/// The storage peers of a `meshctl --json peers` answer that are alive and have an RTT from
/// regular samples (not the provisional first ping of a peer that has just joined, which
/// reads high).
pub fn alive_storage_peers(peers: &Value) -> Vec<Peer> {
    peers["peers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["role"] == "storage" && p["liveness"] == "alive")
        .filter(|p| p["rtt_provisional"] != true)
        .filter_map(|p| {
            Some(Peer {
                id: p["id"].as_str()?.to_string(),
                zone: p["zone"].as_str().unwrap_or("?").to_string(),
                rtt_ms: p["rtt_ms"].as_f64()?,
            })
        })
        .collect()
}

/// Polls `check` every 250 ms until it returns a value, or fails after `limit`.
pub fn wait_for<T>(
    what: &str,
    limit: Duration,
    mut check: impl FnMut() -> Option<T>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = check() {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out after {}s waiting for {what}", limit.as_secs());
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alive_storage_peers_skips_the_rest() {
        let v: Value = serde_json::json!({"peers": [
            {"id": "a", "zone": "aws/us-east-1/a", "role": "storage", "liveness": "alive", "rtt_ms": 1.5},
            {"id": "b", "zone": "aws/us-east-1/b", "role": "storage", "liveness": "suspect", "rtt_ms": 1.0},
            {"id": "c", "zone": "aws/us-east-1/a", "role": "bootstrap", "liveness": "alive", "rtt_ms": 1.0},
            {"id": "d", "zone": "gcp/us-central1/a", "role": "storage", "liveness": "alive", "rtt_ms": null},
            {"id": "e", "zone": "gcp/us-central1/b", "role": "storage", "liveness": "alive", "rtt_ms": 88.8, "rtt_provisional": true},
            {"id": "f", "zone": "gcp/us-central1/b", "role": "storage", "liveness": "alive", "rtt_ms": 30.5, "rtt_provisional": false},
        ]});
        assert_eq!(
            alive_storage_peers(&v),
            [
                Peer {
                    id: "a".into(),
                    zone: "aws/us-east-1/a".into(),
                    rtt_ms: 1.5
                },
                Peer {
                    id: "f".into(),
                    zone: "gcp/us-central1/b".into(),
                    rtt_ms: 30.5
                }
            ]
        );
        assert!(alive_storage_peers(&serde_json::json!({"error": "x"})).is_empty());
    }
}
