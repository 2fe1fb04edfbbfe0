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
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use mesh_netsim::driver::Driver;
use mesh_netsim::state::{Mode, NodeRecord, Role, RunState};
use mesh_netsim::topology::{self, Topology};
use serde_json::Value;

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

/// A running `netsim up` (a [`Driver`]); dropping it runs `netsim down`. The run directory,
/// with every process's log, is removed only after [`NetsimRun::passed`]; a failed test
/// leaves it.
#[derive(Debug)]
pub struct NetsimRun {
    driver: Option<Driver>,
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
        let text = std::fs::read_to_string(topology_file)
            .with_context(|| format!("cannot read {}", topology_file.display()))?;
        let name = topology_file
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("topology");
        let run_dir = std::env::temp_dir().join(format!(
            "mesh-netsim-test-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        let (driver, state) = Driver::up_with(
            bin_dir.join("netsim"),
            &run_dir,
            Some(&bin_dir),
            name,
            &text,
            Mode::Netns,
        )?;
        Ok(Self {
            driver: Some(driver),
            topology,
            state,
            passed: false,
            _turn: turn,
        })
    }

    /// The test passed: tear down and remove the run directory.
    pub fn passed(mut self) {
        self.passed = true;
    }

    fn driver(&self) -> &Driver {
        // Only `drop` takes the driver out.
        self.driver.as_ref().expect("the run is up until dropped")
    }

    pub fn run_dir(&self) -> &Path {
        self.driver().run_dir()
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
        self.driver().meshctl(node, args)
    }

    /// `meshctl --json ARGS...` on `node`, parsed.
    pub fn meshctl_json(&self, node: &str, args: &[&str]) -> anyhow::Result<Value> {
        self.driver().meshctl_json(node, args)
    }

    /// `netsim ARGS... --run-dir DIR` (kill, restart, partition, heal), then the new state.
    pub fn netsim(&mut self, args: &[&str]) -> anyhow::Result<()> {
        self.driver().netsim(args)?;
        self.state = self.driver().state()?;
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
        let path = self.run_dir().join(name);
        std::fs::write(&path, &data).with_context(|| format!("cannot write {}", path.display()))?;
        Ok((path, data))
    }
}

impl Drop for NetsimRun {
    fn drop(&mut self) {
        let Some(driver) = self.driver.take() else {
            return;
        };
        let run_dir = driver.run_dir().to_path_buf();
        driver.down();
        if self.passed {
            let _ = std::fs::remove_dir_all(&run_dir);
        } else {
            eprintln!(
                "netsim run kept for inspection (logs in {}/logs)",
                run_dir.display()
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
    let started = Instant::now();
    let deadline = started + limit;
    let mut last = String::from("no answer yet");
    loop {
        match check() {
            Ok(Some(v)) => {
                eprintln!("waited {:.1}s for {what}", started.elapsed().as_secs_f64());
                return Ok(v);
            }
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
