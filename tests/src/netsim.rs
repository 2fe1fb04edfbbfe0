//! A netsim run for tests: real `mesh-bootstrap` and `meshd` processes in network namespaces
//! behind netsim's emulated WAN, driven the way an operator drives one (`netsim up`,
//! `netsim exec NODE -- meshctl`, `netsim kill|partition|heal`).
//!
//! It uses the binaries `cargo test --workspace` builds next to the test executables
//! (`target/debug/`): `netsim`, `meshd`, `meshctl` and `mesh-bootstrap` (each of their packages
//! has integration tests, which is what makes cargo build them). Runs need root and
//! `/dev/net/tun`; without them [`NetsimRun::up`] fails, it never skips.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use mesh_netsim::state::{self, NodeRecord, ProcessState, Role, RunState};
use mesh_netsim::topology::{self, Topology};
use serde_json::Value;

/// Longest `netsim up` may take to start every process.
const UP_TIMEOUT: Duration = Duration::from_secs(120);

/// netsim runs are heavy (a router and a process per node on a 2-core machine) and share the
/// machine's namespaces: tests take turns.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// The directory holding the workspace's binaries: the parent of the `deps/` directory the
/// test executable runs from.
pub fn bin_dir() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot find the test executable")?;
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .ok_or_else(|| anyhow!("{} has no grandparent directory", exe.display()))?
        .to_path_buf();
    for name in ["netsim", "meshd", "meshctl", "mesh-bootstrap"] {
        if !dir.join(name).is_file() {
            bail!(
                "{name} is not in {}: run these tests through `cargo test --workspace`, which builds it",
                dir.display()
            );
        }
    }
    Ok(dir)
}

/// A running `netsim up`; dropping it runs `netsim down`. The run directory, with every
/// process's log, is removed only after [`NetsimRun::passed`]; a failed test leaves it.
#[derive(Debug)]
pub struct NetsimRun {
    child: Child,
    run_dir: PathBuf,
    bin_dir: PathBuf,
    pub topology: Topology,
    pub state: RunState,
    passed: bool,
    _turn: MutexGuard<'static, ()>,
}

impl NetsimRun {
    /// Starts `topology_file` in netns mode and waits until every process runs.
    pub fn up(topology_file: &Path) -> anyhow::Result<Self> {
        let turn = ONE_AT_A_TIME
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !mesh_netsim::netns::have_privileges() {
            bail!(
                "this test runs meshd in network namespaces behind netsim's router: it needs root \
                 and /dev/net/tun (CI runs as root; it does not skip)"
            );
        }
        let bin_dir = bin_dir()?;
        let topology = topology::load(topology_file)?;
        let run_dir = std::env::temp_dir().join(format!(
            "mesh-netsim-test-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&run_dir)
            .with_context(|| format!("cannot create {}", run_dir.display()))?;
        let log = std::fs::File::create(run_dir.join("netsim-up.log"))
            .context("cannot create netsim-up.log")?;
        let child = Command::new(bin_dir.join("netsim"))
            .arg("up")
            .arg(topology_file)
            .arg("--run-dir")
            .arg(&run_dir)
            .arg("--bin-dir")
            .arg(&bin_dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone().context("log")?)
            .stderr(log)
            .spawn()
            .context("cannot start netsim up")?;
        let mut run = Self {
            child,
            run_dir,
            bin_dir,
            topology,
            state: RunState {
                version: state::VERSION,
                run: String::new(),
                pid: 0,
                mode: state::Mode::Netns,
                topology: String::new(),
                namespaces: Vec::new(),
                nodes: Vec::new(),
                partitions: Vec::new(),
            },
            passed: false,
            _turn: turn,
        };
        let deadline = Instant::now() + UP_TIMEOUT;
        loop {
            if let Ok(Some(status)) = run.child.try_wait() {
                bail!(
                    "netsim up exited ({status}); see {}/netsim-up.log",
                    run.run_dir.display()
                );
            }
            if let Ok(s) = state::load(&run.run_dir)
                && s.nodes.iter().all(|n| n.state == ProcessState::Running)
                && state::socket_path(&run.run_dir).exists()
            {
                run.state = s;
                return Ok(run);
            }
            if Instant::now() > deadline {
                bail!(
                    "netsim up did not start every node within {}s; see {}",
                    UP_TIMEOUT.as_secs(),
                    run.run_dir.display()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The test passed: tear down and remove the run directory.
    pub fn passed(mut self) {
        self.passed = true;
    }

    pub fn run_dir(&self) -> &Path {
        &self.run_dir
    }

    /// The storage nodes (not the bootstrap peer).
    pub fn storage_nodes(&self) -> impl Iterator<Item = &NodeRecord> {
        self.state.nodes.iter().filter(|n| n.role == Role::Node)
    }

    pub fn node(&self, name: &str) -> anyhow::Result<&NodeRecord> {
        self.state
            .nodes
            .iter()
            .find(|n| n.name == name)
            .ok_or_else(|| anyhow!("no node {name} in this run"))
    }

    /// Node names by peer id.
    pub fn names(&self) -> BTreeMap<String, String> {
        self.state
            .nodes
            .iter()
            .filter_map(|n| Some((n.peer_id.clone()?, n.name.clone())))
            .collect()
    }

    /// `netsim exec NODE -- meshctl ARGS...`: its standard output, or an error with its output.
    pub fn meshctl(&self, node: &str, args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new(self.bin_dir.join("netsim"))
            .arg("exec")
            .arg(node)
            .arg("--run-dir")
            .arg(&self.run_dir)
            .arg("--bin-dir")
            .arg(&self.bin_dir)
            .arg("--")
            .arg("meshctl")
            .args(args)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .output()
            .context("cannot run netsim exec")?;
        if !out.status.success() {
            bail!(
                "`meshctl {}` on {node} failed: {}{}",
                args.join(" "),
                String::from_utf8_lossy(&out.stdout).trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `meshctl --json ARGS...` on `node`, parsed.
    pub fn meshctl_json(&self, node: &str, args: &[&str]) -> anyhow::Result<Value> {
        let out = self.meshctl(node, &[&["--json"], args].concat())?;
        serde_json::from_str(&out).with_context(|| {
            format!(
                "meshctl {} on {node} printed no JSON: {out}",
                args.join(" ")
            )
        })
    }

    /// `netsim ARGS... --run-dir DIR` (kill, restart, partition, heal).
    pub fn netsim(&mut self, args: &[&str]) -> anyhow::Result<()> {
        let out = Command::new(self.bin_dir.join("netsim"))
            .args(args)
            .arg("--run-dir")
            .arg(&self.run_dir)
            .output()
            .context("cannot run netsim")?;
        if !out.status.success() {
            bail!(
                "`netsim {}` failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        self.refresh()
    }

    /// Re-reads the run's state (process states, peer ids after a restart).
    pub fn refresh(&mut self) -> anyhow::Result<()> {
        self.state = state::load(&self.run_dir)?;
        Ok(())
    }

    /// The emulated RTT between two nodes: the link between their regions.
    pub fn emulated_rtt(&self, a: &NodeRecord, b: &NodeRecord) -> anyhow::Result<Duration> {
        let region = |n: &NodeRecord| {
            self.topology
                .region_index(&n.region)
                .ok_or_else(|| anyhow!("{} is in unknown region {}", n.name, n.region))
        };
        Ok(self.topology.link(region(a)?, region(b)?).rtt)
    }

    /// Writes `size` random bytes to a file in the run directory (readable from every node's
    /// namespace: namespaces share the file system).
    pub fn random_file(&self, name: &str, size: usize) -> anyhow::Result<(PathBuf, Vec<u8>)> {
        use rand::RngCore;
        let mut data = vec![0u8; size];
        rand::rng().fill_bytes(&mut data);
        let path = self.run_dir.join(name);
        std::fs::write(&path, &data).with_context(|| format!("cannot write {}", path.display()))?;
        Ok((path, data))
    }
}

impl Drop for NetsimRun {
    fn drop(&mut self) {
        let _ = Command::new(self.bin_dir.join("netsim"))
            .arg("down")
            .arg("--run-dir")
            .arg(&self.run_dir)
            .output();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        if self.passed {
            let _ = std::fs::remove_dir_all(&self.run_dir);
        } else {
            eprintln!(
                "netsim run kept for inspection (logs in {}/logs)",
                self.run_dir.display()
            );
        }
    }
}

/// Calls `check` every 500 ms (each call starts processes, on a 2-core machine) until it
/// returns `Ok(Some(_))`; fails with its last complaint after `limit`.
pub fn wait_for<T>(
    what: &str,
    limit: Duration,
    mut check: impl FnMut() -> anyhow::Result<Option<T>>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + limit;
    let mut last = String::from("no answer yet");
    loop {
        match check() {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last = format!("{e:#}"),
        }
        if Instant::now() > deadline {
            bail!(
                "timed out after {}s waiting for {what}: {last}",
                limit.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}
