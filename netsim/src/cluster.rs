//! `netsim up` and the commands around it: real `mesh-bootstrap` and `meshd` processes, each in
//! its own namespace behind the router (or side by side on loopback).
//!
//! The `up` process owns everything: the router, the child processes and the run's state file.
//! Its main loop is the only place that changes them; it takes requests from the control
//! socket, scripted events from the topology, and Ctrl-C / SIGTERM, and notices children that
//! exit. Children are started through `netsim __enter`, a trampoline that sets the parent-death
//! signal, joins the namespace and `exec`s the binary, so they die with the `up` process even
//! when it is killed with SIGKILL. Any error while starting, a `down`, or a signal runs the same
//! shutdown: stop the children, stop the router (its TUNs vanish with it), delete the
//! namespaces, remove the state file. Logs and data directories stay in the run directory.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs::OpenOptions;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::control::{self, Incoming, Request, Response};
use crate::link::Model;
use crate::netns;
use crate::router::{self, Control, Endpoint, Router};
use crate::state::{self, Mode, NodeRecord, ProcessState, Role, RunState};
use crate::topology::{self, Action, Topology};

/// How long a process may take to print that it started.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long stopped processes get to exit after SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// QUIC port every node listens on in netns mode (each has its own address).
const QUIC_PORT: u16 = 4001;
/// Control API address inside each namespace.
const NETNS_API: &str = "127.0.0.1:5080";

#[derive(Debug, Clone)]
pub struct Options {
    pub topology: PathBuf,
    pub run_dir: PathBuf,
    pub bin_dir: Option<PathBuf>,
    pub mode: Mode,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Topology(#[from] topology::Error),
    #[error(transparent)]
    State(#[from] state::Error),
    #[error(transparent)]
    Netns(#[from] netns::Error),
    #[error(transparent)]
    Router(#[from] router::Error),
    #[error(transparent)]
    Control(#[from] control::Error),
    #[error(
        "a netsim run is already up in {dir} (pid {pid}); stop it with `netsim down --run-dir {dir}`"
    )]
    AlreadyUp { dir: String, pid: u32 },
    #[error(
        "cannot find `{name}`: looked in {looked}; build it (`cargo build --release --bin {name}`) or pass --bin-dir"
    )]
    Binary { name: String, looked: String },
    #[error("{name} did not start: {reason}; its log is {log}")]
    StartFailed {
        name: String,
        reason: String,
        log: String,
    },
    #[error("no node named {name:?}; nodes are {known}")]
    UnknownNode { name: String, known: String },
    #[error("interrupted")]
    Interrupted,
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

/// Finds binary `name`: in `bin_dir` when given (and only there), else next to the running
/// `netsim`, else on PATH.
pub fn find_binary(name: &str, bin_dir: Option<&Path>) -> Result<PathBuf, Error> {
    let is_file = |p: &Path| p.is_file();
    if let Some(dir) = bin_dir {
        let p = dir.join(name);
        return if is_file(&p) {
            Ok(p)
        } else {
            Err(Error::Binary {
                name: name.to_string(),
                looked: dir.display().to_string(),
            })
        };
    }
    let mut looked = Vec::new();
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf))
    {
        let p = dir.join(name);
        if is_file(&p) {
            return Ok(p);
        }
        looked.push(dir.display().to_string());
    }
    for dir in std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()) {
        let p = dir.join(name);
        if is_file(&p) {
            return Ok(p);
        }
    }
    looked.push("$PATH".to_string());
    Err(Error::Binary {
        name: name.to_string(),
        looked: looked.join(", "),
    })
}

/// `netsim __enter`: runs in the child between `fork` and the real binary. Arms the
/// parent-death signal, joins the namespace, and `exec`s; returns only on failure.
pub fn enter_and_exec(parent: u32, namespace: Option<&str>, command: &[OsString]) -> anyhow::Error {
    if let Err(e) = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL) {
        return anyhow::anyhow!("cannot set the parent-death signal: {e}");
    }
    // The parent may have died before the signal was armed.
    if nix::unistd::getppid().as_raw() as u32 != parent {
        return anyhow::anyhow!("netsim exited while starting this process");
    }
    if let Some(ns) = namespace
        && let Err(e) = netns::enter(ns)
    {
        return e.into();
    }
    let Some((program, args)) = command.split_first() else {
        return anyhow::anyhow!("no command to run");
    };
    let e = Command::new(program).args(args).exec();
    anyhow::anyhow!("cannot run {}: {e}", Path::new(program).display())
}

/// Removes terminal colour codes, so log lines can be searched.
pub fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // ESC [ parameters... final letter
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The value of `key=` in a log line (`peer=12D3...`).
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let start = line.find(&format!("{key}="))? + key.len() + 1;
    line[start..].split_whitespace().next()
}

/// The multiaddr after `--bootstrap ` in mesh-bootstrap's start line.
fn bootstrap_addr(line: &str) -> Option<&str> {
    let start = line.find("--bootstrap ")? + "--bootstrap ".len();
    line[start..].split_whitespace().next()
}

struct Cluster {
    run_dir: PathBuf,
    topology: Topology,
    state: RunState,
    exe: PathBuf,
    meshd: PathBuf,
    bootstrap_bin: PathBuf,
    cluster_key: PathBuf,
    /// What nodes pass as `--bootstrap`.
    join_addr: Option<String>,
    children: BTreeMap<String, Child>,
    /// Where each process's current run starts in its (appended) log.
    log_start: BTreeMap<String, u64>,
    router: Option<Router>,
    interrupted: Arc<AtomicBool>,
    down: bool,
}

/// `netsim up`: starts everything and runs until `netsim down`, Ctrl-C or SIGTERM.
pub fn up(options: &Options) -> Result<(), Error> {
    let topology = topology::load(&options.topology)?;
    std::fs::create_dir_all(&options.run_dir).map_err(io(format!(
        "cannot create run directory {}",
        options.run_dir.display()
    )))?;
    let run_dir = options
        .run_dir
        .canonicalize()
        .map_err(io("cannot resolve the run directory"))?;
    match state::load(&run_dir) {
        Ok(old) if state::owner_alive(&old) => {
            return Err(Error::AlreadyUp {
                dir: run_dir.display().to_string(),
                pid: old.pid,
            });
        }
        Ok(old) => {
            let removed = state::clean_leftovers(&run_dir, &old);
            println!(
                "cleaned up after run {} (pid {} is gone): {}",
                old.run,
                old.pid,
                if removed.is_empty() {
                    "nothing was left".to_string()
                } else {
                    removed.join(", ")
                }
            );
        }
        Err(state::Error::NoRun { .. }) => {}
        Err(e) => return Err(e.into()),
    }
    // A run starts from scratch: fresh identities, data and cluster key.
    for sub in ["nodes", "logs"] {
        let dir = run_dir.join(sub);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(io(format!("cannot create {}", dir.display())))?;
    }
    let _ = std::fs::remove_file(run_dir.join("cluster.key"));
    let bin_dir = options.bin_dir.as_deref();
    let meshd = find_binary("meshd", bin_dir)?;
    let bootstrap_bin = find_binary("mesh-bootstrap", bin_dir)?;
    let exe = std::env::current_exe().map_err(io("cannot find the netsim executable"))?;

    let interrupted = Arc::new(AtomicBool::new(false));
    for signal in [
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGHUP,
    ] {
        signal_hook::flag::register(signal, interrupted.clone())
            .map_err(io("cannot install the signal handler"))?;
    }

    let run: String = format!("{:04x}", rand::random::<u16>());
    let state = RunState {
        version: state::VERSION,
        run: run.clone(),
        pid: std::process::id(),
        mode: options.mode,
        topology: options.topology.display().to_string(),
        namespaces: Vec::new(),
        nodes: plan(&topology, &run, &run_dir, options.mode)?,
        partitions: Vec::new(),
    };
    state::save(&run_dir, &state)?;
    let mut cluster = Cluster {
        cluster_key: run_dir.join("cluster.key"),
        run_dir,
        topology,
        state,
        exe,
        meshd,
        bootstrap_bin,
        join_addr: None,
        children: BTreeMap::new(),
        log_start: BTreeMap::new(),
        router: None,
        interrupted,
        down: false,
    };
    // From here on, any error drops `cluster`, which shuts everything down.
    let (tx, rx) = crossbeam_channel::bounded(16);
    control::serve(&cluster.run_dir, tx)?;
    cluster.start()?;
    print_table(&cluster.state);
    println!(
        "netsim is up: run {}, {} mode, logs in {}/logs",
        cluster.state.run,
        match cluster.state.mode {
            Mode::Netns => "netns",
            Mode::Loopback => "loopback",
        },
        cluster.run_dir.display()
    );
    println!(
        "try: netsim exec {} -- meshctl peers     stop: Ctrl-C or netsim down",
        cluster.topology.nodes[0].name
    );
    cluster.run(&rx);
    cluster.shutdown();
    Ok(())
}

/// Names, addresses, ports and directories of every process, before anything starts.
fn plan(
    topology: &Topology,
    run: &str,
    run_dir: &Path,
    mode: Mode,
) -> Result<Vec<NodeRecord>, Error> {
    let mut ports = PortPicker::default();
    let mut records = Vec::new();
    let mut add = |name: String,
                   role: Role,
                   region: usize,
                   zone: String,
                   slot: usize,
                   standby: bool|
     -> Result<(), Error> {
        let (namespace, address, listen_port, api) = match mode {
            Mode::Netns => (
                Some(format!("netsim-{run}-{name}")),
                router::address(region, slot).to_string(),
                QUIC_PORT,
                NETNS_API.to_string(),
            ),
            Mode::Loopback => (
                None,
                "127.0.0.1".to_string(),
                ports.udp()?,
                format!("127.0.0.1:{}", ports.tcp()?),
            ),
        };
        records.push(NodeRecord {
            listen: format!("/ip4/{address}/udp/{listen_port}/quic-v1"),
            data_dir: run_dir.join("nodes").join(&name),
            log: run_dir.join("logs").join(format!("{name}.log")),
            region: topology.regions[region].name.clone(),
            name,
            role,
            zone,
            namespace,
            address,
            api,
            peer_id: None,
            pid: None,
            state: if standby {
                ProcessState::Standby
            } else {
                ProcessState::Starting
            },
        });
        Ok(())
    };
    if let Some(b) = &topology.bootstrap {
        add(
            "bootstrap".to_string(),
            Role::Bootstrap,
            b.region,
            b.zone.clone(),
            254,
            false,
        )?;
    }
    for n in &topology.nodes {
        add(
            n.name.clone(),
            Role::Node,
            n.region,
            n.zone.clone(),
            n.index_in_region,
            n.standby,
        )?;
    }
    Ok(records)
}

/// Free loopback ports, found by binding port 0. The port is released before the node binds
/// it; no other process on this machine is expected to grab it in between.
#[derive(Default)]
struct PortPicker {
    taken: std::collections::HashSet<u16>,
}

impl PortPicker {
    fn udp(&mut self) -> Result<u16, Error> {
        self.pick(|| std::net::UdpSocket::bind("127.0.0.1:0")?.local_addr())
    }

    fn tcp(&mut self) -> Result<u16, Error> {
        self.pick(|| std::net::TcpListener::bind("127.0.0.1:0")?.local_addr())
    }

    fn pick(
        &mut self,
        bind: impl Fn() -> std::io::Result<std::net::SocketAddr>,
    ) -> Result<u16, Error> {
        for _ in 0..100 {
            let port = bind()
                .map_err(io("cannot find a free loopback port"))?
                .port();
            if self.taken.insert(port) {
                return Ok(port);
            }
        }
        Err(Error::Io {
            what: "cannot find a free loopback port".into(),
            source: std::io::Error::other("every port offered was taken"),
        })
    }
}

impl Cluster {
    fn start(&mut self) -> Result<(), Error> {
        if self.state.mode == Mode::Netns {
            self.build_network()?;
        }
        let out = Command::new(&self.meshd)
            .arg("init")
            .arg("--cluster-key-file")
            .arg(&self.cluster_key)
            .output()
            .map_err(io(format!("cannot run {}", self.meshd.display())))?;
        if !out.status.success() {
            return Err(Error::StartFailed {
                name: "meshd init".into(),
                reason: String::from_utf8_lossy(&out.stderr).trim().to_string(),
                log: "(none)".into(),
            });
        }
        let names: Vec<(String, Role)> = self
            .state
            .nodes
            .iter()
            .filter(|n| n.state != ProcessState::Standby)
            .map(|n| (n.name.clone(), n.role))
            .collect();
        // The bootstrap peer first (or, without one, the first node), then the rest at once;
        // standby nodes wait for `netsim restart`.
        let (first, rest) = names.split_first().ok_or_else(|| Error::UnknownNode {
            name: "(any)".into(),
            known: "none".into(),
        })?;
        self.spawn(&first.0)?;
        let line = self.wait_started(&first.0)?;
        let record = self.record(&first.0)?.clone();
        self.join_addr = Some(match first.1 {
            Role::Bootstrap => line,
            Role::Node => format!(
                "{}/p2p/{}",
                record.listen,
                record.peer_id.unwrap_or_default()
            ),
        });
        for (name, _) in rest {
            self.spawn(name)?;
        }
        for (name, _) in rest {
            self.wait_started(name)?;
        }
        state::save(&self.run_dir, &self.state)?;
        Ok(())
    }

    /// Namespaces and TUNs for every process, and the router between them.
    fn build_network(&mut self) -> Result<(), Error> {
        let mut endpoints = Vec::new();
        for i in 0..self.state.nodes.len() {
            let record = &self.state.nodes[i];
            let Some(ns) = record.namespace.clone() else {
                continue;
            };
            let addr = record.address.parse().map_err(|_| Error::Io {
                what: format!("bad address {} for {}", record.address, record.name),
                source: std::io::Error::other("not IPv4"),
            })?;
            let region = self.topology.region_index(&record.region).unwrap_or(0);
            // Record first, then create: a crash in between leaves a name to clean, not a leak.
            self.state.namespaces.push(ns.clone());
            state::save(&self.run_dir, &self.state)?;
            netns::create(&ns)?;
            endpoints.push(Endpoint {
                device: netns::create_tun(&ns, addr)?,
                addr,
                region,
            });
        }
        let n = self.topology.regions.len();
        let links = (0..n)
            .map(|a| {
                (0..n)
                    .map(|b| Model::from_params(self.topology.link(a, b)))
                    .collect()
            })
            .collect();
        self.router = Some(Router::start(endpoints, links)?);
        Ok(())
    }

    fn record(&self, name: &str) -> Result<&NodeRecord, Error> {
        self.state.node(name).ok_or_else(|| Error::UnknownNode {
            name: name.to_string(),
            known: self.state.names(),
        })
    }

    fn spawn(&mut self, name: &str) -> Result<(), Error> {
        let record = self.record(name)?.clone();
        let key = self.cluster_key.display().to_string();
        let data_dir = record.data_dir.display().to_string();
        // Both binaries take these; meshd also gets its API address and the peer to join.
        let mut args = vec![
            "--data-dir",
            &data_dir,
            "--listen",
            &record.listen,
            "--zone",
            &record.zone,
            "--cluster-key-file",
            &key,
        ];
        let program: &Path = match record.role {
            Role::Bootstrap => &self.bootstrap_bin,
            Role::Node => {
                args.extend(["--api-addr", record.api.as_str()]);
                if let Some(join) = &self.join_addr {
                    args.extend(["--bootstrap", join.as_str()]);
                }
                &self.meshd
            }
        };
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&record.log)
            .map_err(io(format!("cannot open {}", record.log.display())))?;
        let log_err = log
            .try_clone()
            .map_err(io("cannot duplicate the log file"))?;
        let offset = log.metadata().map(|m| m.len()).unwrap_or(0);
        self.log_start.insert(name.to_string(), offset);
        let mut command = Command::new(&self.exe);
        if record.role == Role::Node {
            // The topology's `[env]`: meshd reads MESH_* variables as config overrides.
            command.envs(&self.topology.env);
        }
        command
            .arg("__enter")
            .arg("--parent")
            .arg(std::process::id().to_string());
        if let Some(ns) = &record.namespace {
            command.arg("--netns").arg(ns);
        }
        command
            .arg("--")
            .arg(program)
            .args(&args)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            // Its own process group: a Ctrl-C in the terminal reaches netsim only, which then
            // stops the children in order.
            .process_group(0);
        let child = command
            .spawn()
            .map_err(io(format!("cannot start {name}")))?;
        let pid = child.id();
        self.children.insert(name.to_string(), child);
        if let Some(r) = self.state.node_mut(name) {
            r.pid = Some(pid);
            r.state = ProcessState::Starting;
        }
        state::save(&self.run_dir, &self.state)?;
        Ok(())
    }

    /// Waits for `name`'s start line in its log and records its peer id; returns, for the
    /// bootstrap peer, the address nodes join through.
    fn wait_started(&mut self, name: &str) -> Result<String, Error> {
        let record = self.record(name)?.clone();
        let needle = match record.role {
            Role::Bootstrap => "--bootstrap ",
            Role::Node => "meshd started",
        };
        let failed = |reason: String| Error::StartFailed {
            name: name.to_string(),
            reason,
            log: record.log.display().to_string(),
        };
        let deadline = Instant::now() + START_TIMEOUT;
        let mut seen = self.log_start.get(name).copied().unwrap_or(0);
        let mut pending = String::new();
        loop {
            if self.interrupted.load(Ordering::Relaxed) {
                return Err(Error::Interrupted);
            }
            let mut file = std::fs::File::open(&record.log).map_err(io("cannot read a log"))?;
            file.seek(SeekFrom::Start(seen))
                .map_err(io("cannot read a log"))?;
            let mut chunk = String::new();
            let read = file.read_to_string(&mut chunk).unwrap_or(0);
            seen += read as u64;
            pending.push_str(&chunk);
            while let Some(end) = pending.find('\n') {
                let line = strip_ansi(&pending[..end]);
                pending.drain(..=end);
                if !line.contains(needle) {
                    continue;
                }
                let result = match record.role {
                    Role::Bootstrap => bootstrap_addr(&line).map(str::to_string),
                    Role::Node => field(&line, "peer").map(str::to_string),
                };
                let Some(value) = result else { continue };
                let peer = match record.role {
                    Role::Bootstrap => value.rsplit("/p2p/").next().map(str::to_string),
                    Role::Node => Some(value.clone()),
                };
                if let Some(r) = self.state.node_mut(name) {
                    r.peer_id = peer;
                    r.state = ProcessState::Running;
                }
                return Ok(value);
            }
            if let Some(child) = self.children.get_mut(name)
                && let Ok(Some(status)) = child.try_wait()
            {
                self.children.remove(name);
                if let Some(r) = self.state.node_mut(name) {
                    r.state = ProcessState::Exited;
                }
                return Err(failed(format!("it exited ({status})")));
            }
            if Instant::now() > deadline {
                return Err(failed(format!(
                    "no start line within {}s",
                    START_TIMEOUT.as_secs()
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn run(&mut self, requests: &crossbeam_channel::Receiver<Incoming>) {
        let started = Instant::now();
        let mut events = self.topology.events.clone().into_iter().peekable();
        loop {
            if self.interrupted.load(Ordering::Relaxed) {
                println!("stopping (signal)");
                return;
            }
            while let Some(event) = events.next_if(|e| started.elapsed() >= e.at) {
                let outcome = self.apply(&event.action);
                println!(
                    "event at {}: {}",
                    humantime::format_duration(event.at),
                    outcome.message
                );
            }
            match requests.recv_timeout(Duration::from_millis(200)) {
                Ok(incoming) => {
                    if incoming.request == Request::Down {
                        println!("stopping (netsim down)");
                        self.shutdown();
                        incoming.reply(&Response::ok("netsim is down"));
                        return;
                    }
                    let response = self.handle(&incoming.request);
                    incoming.reply(&response);
                }
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return,
            }
            self.reap();
        }
    }

    fn handle(&mut self, request: &Request) -> Response {
        let response = match request {
            Request::Status => {
                let mut r = Response::ok("up");
                r.state = Some(self.state.clone());
                r.router = self.router.as_ref().map(Router::stats);
                return r;
            }
            Request::Kill { node } => self.apply(&Action::Kill { node: node.clone() }),
            Request::Restart { node } => self.apply(&Action::Restart { node: node.clone() }),
            Request::Partition { regions, from } => {
                match (self.region_indices(regions), self.region_indices(from)) {
                    (Ok(regions), Ok(from)) => self.apply(&Action::Partition { regions, from }),
                    (Err(e), _) | (_, Err(e)) => Response::error(e),
                }
            }
            Request::Heal => self.apply(&Action::Heal),
            Request::Down => Response::ok("stopping"),
        };
        println!("{}", response.message);
        response
    }

    fn region_indices(&self, names: &[String]) -> Result<Vec<usize>, String> {
        names
            .iter()
            .map(|n| {
                self.topology.region_index(n.trim()).ok_or_else(|| {
                    let known: Vec<&str> = self
                        .topology
                        .regions
                        .iter()
                        .map(|r| r.name.as_str())
                        .collect();
                    format!("no region named {n:?}; regions are {}", known.join(", "))
                })
            })
            .collect()
    }

    fn apply(&mut self, action: &Action) -> Response {
        match action {
            Action::Kill { node } => match self.kill(node) {
                Ok(()) => Response::ok(format!("killed {node}")),
                Err(e) => Response::error(e.to_string()),
            },
            Action::Restart { node } => {
                let standby = self
                    .state
                    .node(node)
                    .is_some_and(|n| n.state == ProcessState::Standby);
                let restarted = self.kill(node).and_then(|()| {
                    self.spawn(node)?;
                    self.wait_started(node)?;
                    state::save(&self.run_dir, &self.state)?;
                    Ok(())
                });
                match restarted {
                    Ok(()) if standby => Response::ok(format!("started standby node {node}")),
                    Ok(()) => Response::ok(format!("restarted {node}")),
                    Err(e) => Response::error(format!("restart of {node} failed: {e}")),
                }
            }
            Action::Partition { regions, from } => {
                let Some(router) = &self.router else {
                    return Response::error(
                        "loopback mode has no router, so no partitions: run as root without --loopback",
                    );
                };
                router.control(Control::Partition {
                    regions: regions.clone(),
                    from: from.clone(),
                });
                let names = |ix: &[usize]| -> Vec<String> {
                    ix.iter()
                        .map(|&i| self.topology.regions[i].name.clone())
                        .collect()
                };
                let (a, b) = (names(regions), names(from));
                let message = format!("partitioned {} from {}", a.join(","), b.join(","));
                self.state.partitions.push((a, b));
                let _ = state::save(&self.run_dir, &self.state);
                Response::ok(message)
            }
            Action::Heal => {
                let Some(router) = &self.router else {
                    return Response::error("loopback mode has no router, so nothing to heal");
                };
                router.control(Control::Heal);
                self.state.partitions.clear();
                let _ = state::save(&self.run_dir, &self.state);
                Response::ok("healed all partitions")
            }
        }
    }

    /// Kills `node` as a crash would (SIGKILL); a node that is not running is left as it is.
    fn kill(&mut self, node: &str) -> Result<(), Error> {
        self.record(node)?;
        if let Some(mut child) = self.children.remove(node) {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(r) = self.state.node_mut(node) {
            r.state = ProcessState::Killed;
            r.pid = None;
        }
        state::save(&self.run_dir, &self.state)?;
        Ok(())
    }

    /// Notices children that exited on their own.
    fn reap(&mut self) {
        let mut exited = Vec::new();
        for (name, child) in &mut self.children {
            if let Ok(Some(status)) = child.try_wait() {
                exited.push((name.clone(), status));
            }
        }
        for (name, status) in exited {
            self.children.remove(&name);
            if let Some(r) = self.state.node_mut(&name) {
                r.state = ProcessState::Exited;
                r.pid = None;
                println!("{name} exited ({status}); its log is {}", r.log.display());
            }
        }
        if !self.children.is_empty()
            || self
                .state
                .nodes
                .iter()
                .any(|n| n.state == ProcessState::Exited)
        {
            let _ = state::save(&self.run_dir, &self.state);
        }
    }

    /// Stops everything this run created. Safe to call twice.
    fn shutdown(&mut self) {
        if self.down {
            return;
        }
        self.down = true;
        for child in self.children.values() {
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
        }
        let deadline = Instant::now() + STOP_GRACE;
        while Instant::now() < deadline
            && self
                .children
                .values_mut()
                .any(|c| matches!(c.try_wait(), Ok(None)))
        {
            std::thread::sleep(Duration::from_millis(50));
        }
        for (_, mut child) in std::mem::take(&mut self.children) {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(router) = self.router.take() {
            router.stop();
        }
        for ns in &self.state.namespaces {
            if let Err(e) = netns::delete(ns) {
                eprintln!("netsim: {e}");
            }
        }
        let _ = std::fs::remove_file(state::socket_path(&self.run_dir));
        let _ = std::fs::remove_file(state::state_path(&self.run_dir));
        println!(
            "netsim is down; logs and data stay in {}",
            self.run_dir.display()
        );
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// A node's address with its QUIC port, as `address:port`: on loopback every node shares
/// 127.0.0.1, so the port is what tells them apart.
fn address_with_port(n: &NodeRecord) -> String {
    let port = n
        .listen
        .split('/')
        .skip_while(|part| *part != "udp" && *part != "tcp")
        .nth(1);
    match port {
        Some(port) => format!("{}:{port}", n.address),
        None => n.address.clone(),
    }
}

/// The node table, one line per process.
pub fn table(state: &RunState) -> String {
    let rows: Vec<[String; 6]> = state
        .nodes
        .iter()
        .map(|n| {
            let api = match (n.role, &n.namespace) {
                (Role::Bootstrap, _) => "-".to_string(),
                (Role::Node, Some(_)) => format!("http://{} (in its namespace)", n.api),
                (Role::Node, None) => format!("http://{}", n.api),
            };
            [
                n.name.clone(),
                n.zone.clone(),
                address_with_port(n),
                format!("{:?}", n.state).to_lowercase(),
                n.peer_id.clone().unwrap_or_else(|| "-".to_string()),
                api,
            ]
        })
        .collect();
    let header = ["NAME", "ZONE", "ADDRESS", "STATE", "PEER ID", "API"];
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: [&str; 6]| {
        let mut out = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$} ", w = widths[i]));
            }
        }
        out.push('\n');
        out
    };
    let mut out = line(header);
    for row in &rows {
        out.push_str(&line(row.each_ref().map(String::as_str)));
    }
    out
}

/// Prints the node table.
pub fn print_table(state: &RunState) {
    print!("{}", table(state));
}

/// `netsim exec NODE -- COMMAND...`: replaces this process with `COMMAND` inside the node's
/// namespace. `meshctl` gets the node's `--api` and `--data-dir`; every command gets
/// `MESH_API` and `NETSIM_NODE`. Returns only on failure.
pub fn exec(
    run_dir: &Path,
    node: &str,
    command: &[OsString],
    bin_dir: Option<&Path>,
) -> anyhow::Error {
    let state = match state::load(run_dir) {
        Ok(s) => s,
        Err(e) => return e.into(),
    };
    let Some(record) = state.node(node) else {
        return Error::UnknownNode {
            name: node.to_string(),
            known: state.names(),
        }
        .into();
    };
    let Some((program, rest)) = command.split_first() else {
        return anyhow::anyhow!("no command given: netsim exec {node} -- meshctl status");
    };
    let api_url = format!("http://{}", record.api);
    let mut args: Vec<OsString> = Vec::new();
    let mut program = PathBuf::from(program);
    if program.file_name().is_some_and(|f| f == "meshctl") {
        if program.components().count() == 1 {
            match find_binary("meshctl", bin_dir) {
                Ok(p) => program = p,
                Err(e) => return e.into(),
            }
        }
        args.extend([
            "--api".into(),
            api_url.clone().into(),
            "--data-dir".into(),
            record.data_dir.clone().into_os_string(),
        ]);
    }
    args.extend(rest.iter().cloned());
    if let Some(ns) = &record.namespace
        && let Err(e) = netns::enter(ns)
    {
        return e.into();
    }
    let e = Command::new(&program)
        .args(&args)
        .env("MESH_API", &api_url)
        .env("NETSIM_NODE", node)
        .exec();
    anyhow::anyhow!("cannot run {}: {e}", program.display())
}

/// `netsim down`: asks the `up` process to stop; if it is gone, removes what it left.
pub fn down(run_dir: &Path) -> Result<String, Error> {
    match control::request(run_dir, &Request::Down) {
        Ok(response) => Ok(response.message),
        Err(control::Error::Connect { .. }) => {
            let state = match state::load(run_dir) {
                Ok(s) => s,
                Err(state::Error::NoRun { .. }) => {
                    return Ok(format!(
                        "no netsim run in {}; nothing to stop",
                        run_dir.display()
                    ));
                }
                Err(e) => return Err(e.into()),
            };
            if state::owner_alive(&state) {
                // Alive but not answering: ask it to stop the way Ctrl-C does.
                let _ = kill(Pid::from_raw(state.pid as i32), Signal::SIGTERM);
                return Ok(format!(
                    "sent SIGTERM to netsim (pid {}), which did not answer on its socket",
                    state.pid
                ));
            }
            let removed = state::clean_leftovers(run_dir, &state);
            Ok(format!(
                "run {} had crashed; removed {}",
                state.run,
                if removed.is_empty() {
                    "nothing".to_string()
                } else {
                    removed.join(", ")
                }
            ))
        }
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_start_lines() {
        let line = "\u{1b}[2m2026-11-21T11:00:46.888719Z\u{1b}[0m \u{1b}[32m INFO\u{1b}[0m \u{1b}[2mmesh_node\u{1b}[0m\u{1b}[2m:\u{1b}[0m meshd started \u{1b}[3mpeer\u{1b}[0m\u{1b}[2m=\u{1b}[0m12D3KooWMPZ \u{1b}[3mapi\u{1b}[0m\u{1b}[2m=\u{1b}[0m127.0.0.1:31011";
        let clean = strip_ansi(line);
        assert!(
            clean.contains("meshd started peer=12D3KooWMPZ api="),
            "{clean}"
        );
        assert_eq!(field(&clean, "peer"), Some("12D3KooWMPZ"));
        let b = "INFO mesh_bootstrap: mesh-bootstrap started; join with --bootstrap /ip4/10.77.1.254/udp/4001/quic-v1/p2p/12D3X bootstrap=...";
        assert_eq!(
            bootstrap_addr(b),
            Some("/ip4/10.77.1.254/udp/4001/quic-v1/p2p/12D3X")
        );
    }

    #[test]
    fn table_shows_loopback_ports() {
        let dir = topology::shipped("bench-throughput.toml");
        let t = topology::load(&dir).expect("topology");
        let nodes = plan(&t, "ab12", Path::new("/tmp/r"), Mode::Loopback).expect("plan");
        let state = RunState {
            version: state::VERSION,
            run: "ab12".into(),
            pid: 1,
            mode: Mode::Loopback,
            topology: "t.toml".into(),
            namespaces: Vec::new(),
            nodes,
            partitions: Vec::new(),
        };
        let text = table(&state);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 1 + state.nodes.len(), "{text}");
        for (line, n) in lines[1..].iter().zip(&state.nodes) {
            let port = n.listen.split('/').nth(4).expect("udp port");
            assert!(
                line.contains(&format!("127.0.0.1:{port} ")),
                "{line:?} lacks port {port}"
            );
        }
        // The standby reader is planned but not started.
        let reader = lines.last().expect("rows");
        assert!(
            reader.starts_with("local-bench-4 ") && reader.contains(" standby "),
            "{reader}"
        );
        // Columns line up: every row has ADDRESS where the header has it.
        let column = lines[0].find("ADDRESS").expect("header");
        for line in &lines[1..] {
            assert_eq!(line[column..].find("127.0.0.1:"), Some(0), "{line}");
        }
    }

    #[test]
    fn plan_gives_distinct_addresses_and_ports() {
        let dir = topology::shipped("three-clouds.toml");
        let t = topology::load(&dir).expect("topology");
        let netns = plan(&t, "ab12", Path::new("/tmp/r"), Mode::Netns).expect("plan");
        assert_eq!(netns.len(), 7);
        assert_eq!(netns[0].role, Role::Bootstrap);
        assert_eq!(netns[0].address, "10.77.1.254");
        assert_eq!(netns[1].address, "10.77.1.1");
        assert_eq!(netns[3].address, "10.77.2.1");
        assert_eq!(
            netns[1].namespace.as_deref(),
            Some("netsim-ab12-aws-us-east-1-1")
        );
        let loopback = plan(&t, "ab12", Path::new("/tmp/r"), Mode::Loopback).expect("plan");
        let mut seen = std::collections::HashSet::new();
        for r in &loopback {
            assert!(seen.insert(r.listen.clone()), "{}", r.listen);
            assert!(seen.insert(r.api.clone()), "{}", r.api);
        }
    }
}
