//! Node configuration: typed, validated once at start.
//!
//! Layers, each overriding the one before: built-in defaults, the TOML file (`--config`),
//! environment variables `MESH_<KEY>` (nested keys joined by `__`, e.g.
//! `MESH_STORE__BLOB_FILES=false`), then command-line flags. Unknown keys are errors, and every
//! error names the key (and the file line or the variable) and the bad value.

use std::collections::BTreeMap;
use std::fmt::Display;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use mesh_proto::{ChunkerSpec, Redundancy};
use serde::{Deserialize, Serialize};

/// Environment variables with the `MESH_` prefix that are not config keys: `meshctl`'s own,
/// the config path itself and the log filter.
const NOT_CONFIG_KEYS: &[&str] = &["MESH_API", "MESH_API_TOKEN", "MESH_CONFIG", "MESH_LOG"];

/// Everything a node needs to start.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Holds the store, `identity.key` and `api.token`.
    pub data_dir: PathBuf,
    /// Address of the control API.
    pub api_addr: SocketAddr,
    /// `text` or `json`.
    pub log_format: LogFormat,
    /// Policy of puts that name none.
    pub redundancy: Redundancy,
    /// Chunker of puts that name none: `cdc` or `fixed:SIZE`.
    #[serde(with = "as_string")]
    pub chunker: ChunkerSpec,
    pub store: crate::store::Config,
    pub api: ApiConfig,
    pub net: NetConfig,
    pub durability: DurabilityConfig,
    pub jobs: JobsConfig,
    /// Commands that `exec:NAME` jobs may run on this node, by NAME. A node runs no command
    /// that is not listed here, whatever a job spec asks.
    pub processors: BTreeMap<String, ExecConfig>,
}

/// Networking: where to listen, how to join, and the mesh's timing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NetConfig {
    /// QUIC listen addresses (multiaddrs).
    pub listen: Vec<String>,
    /// Addresses other nodes should dial, when they differ from the listen addresses
    /// (NAT, cloud public IPs).
    pub external_addrs: Vec<String>,
    /// Tell peers the direct listen addresses. Turn off behind NAT, where they are private:
    /// peers then learn only `external_addrs`, addresses AutoNAT confirms, and relay circuits.
    pub advertise_listen_addrs: bool,
    /// Peers to join through, each ending in `/p2p/<peer id>`.
    pub bootstrap: Vec<String>,
    /// Failure zone, `cloud/region/az` (e.g. `aws/us-east-1/a`); nearer zones share a prefix.
    pub zone: String,
    /// File holding the cluster key (64 hex characters); none = open mesh.
    pub cluster_key_file: Option<PathBuf>,
    /// A peer not heard from for this long is suspect (gets no new data).
    #[serde(with = "humantime_serde")]
    pub suspect_after: Duration,
    /// A peer not heard from for this long is dead (its data is repaired).
    #[serde(with = "humantime_serde")]
    pub dead_after: Duration,
    /// How often the load report is gossiped.
    #[serde(with = "humantime_serde")]
    pub load_interval: Duration,
    /// How often peers are pinged for RTT.
    #[serde(with = "humantime_serde")]
    pub ping_interval: Duration,
    /// Timeout of one chunk or control request.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    pub max_connections: u32,
    /// Concurrent streams per connection and protocol; more are refused.
    pub max_streams_per_peer: usize,
    /// Chunks of one put in flight at once.
    pub write_window: usize,
    /// A chunk fetch slower than this is also asked of the next holder.
    #[serde(with = "humantime_serde")]
    pub hedge_after: Duration,
    /// Chunks fetched ahead from other nodes on a get of an object this node does not hold
    /// whole (round trips, not disk, bound a remote read).
    pub fetch_window: usize,
    /// Nodes with less free disk than this receive no new chunks.
    pub min_free_space: bytesize::ByteSize,
}

impl Default for NetConfig {
    fn default() -> Self {
        Self {
            listen: vec!["/ip4/0.0.0.0/udp/4001/quic-v1".into()],
            external_addrs: Vec::new(),
            advertise_listen_addrs: true,
            bootstrap: Vec::new(),
            zone: String::new(),
            cluster_key_file: None,
            suspect_after: Duration::from_secs(15),
            dead_after: Duration::from_secs(60),
            load_interval: Duration::from_secs(5),
            ping_interval: Duration::from_secs(5),
            request_timeout: Duration::from_secs(30),
            max_connections: 1024,
            max_streams_per_peer: 64,
            write_window: 8,
            hedge_after: Duration::from_millis(250),
            fetch_window: 16,
            min_free_space: bytesize::ByteSize::gib(1),
        }
    }
}

impl NetConfig {
    /// The typed network settings, with errors naming the key at fault.
    pub fn resolve(&self, role: crate::net::Role) -> Result<crate::net::Config, ConfigError> {
        let parse = |key: &'static str, list: &[String]| {
            list.iter()
                .map(|s| {
                    s.parse::<libp2p::Multiaddr>()
                        .map_err(|e| ConfigError::Invalid {
                            key,
                            message: format!("{s:?} is not a multiaddr: {e}"),
                        })
                })
                .collect::<Result<Vec<_>, _>>()
        };
        let listen = parse("net.listen", &self.listen)?;
        if listen.is_empty() {
            return Err(ConfigError::Invalid {
                key: "net.listen",
                message: "needs at least one address".into(),
            });
        }
        if let Some(bad) = listen
            .iter()
            .find(|a| crate::net::is_circuit(a) && crate::net::circuit_relay(a).is_none())
        {
            return Err(ConfigError::Invalid {
                key: "net.listen",
                message: format!(
                    "{bad} is not a relay circuit to listen through: write <relay address>/p2p/<relay peer id>/p2p-circuit, e.g. a --bootstrap address followed by /p2p-circuit"
                ),
            });
        }
        let bootstrap = parse("net.bootstrap", &self.bootstrap)?;
        if let Some(bad) = bootstrap.iter().find(|a| crate::net::peer_of(a).is_none()) {
            return Err(ConfigError::Invalid {
                key: "net.bootstrap",
                message: format!(
                    "{bad} has no peer id: append /p2p/<peer id> (mesh-bootstrap prints the full address at start)"
                ),
            });
        }
        if self.zone.len() > mesh_proto::wire::MAX_ZONE_LEN {
            return Err(ConfigError::Invalid {
                key: "net.zone",
                message: "is too long".into(),
            });
        }
        if self.suspect_after >= self.dead_after {
            return Err(ConfigError::Invalid {
                key: "net.suspect_after",
                message: "must be shorter than net.dead_after".into(),
            });
        }
        let cluster_key = match &self.cluster_key_file {
            None => None,
            Some(path) => Some(crate::identity::read_cluster_key(path).map_err(|message| {
                ConfigError::Invalid {
                    key: "net.cluster_key_file",
                    message,
                }
            })?),
        };
        Ok(crate::net::Config {
            listen,
            external_addrs: parse("net.external_addrs", &self.external_addrs)?,
            advertise_listen_addrs: self.advertise_listen_addrs,
            bootstrap,
            zone: self.zone.clone(),
            role,
            cluster_key,
            suspect_after: self.suspect_after,
            dead_after: self.dead_after,
            load_interval: self.load_interval,
            ping_interval: self.ping_interval,
            request_timeout: self.request_timeout,
            max_connections: self.max_connections.max(1),
            max_streams_per_peer: self.max_streams_per_peer.max(1),
            relay_server: None,
        })
    }
}

/// Repair, scrub and garbage collection: how fast they may go and how long deleted data
/// lingers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DurabilityConfig {
    /// Bytes per second repair may send (copies and rebuilt shards); 0 = unthrottled.
    pub repair_rate: bytesize::ByteSize,
    /// Bytes per second the scrubber re-hashes; 0 = scrubbing off.
    pub scrub_rate: bytesize::ByteSize,
    /// A scrub pass starts this long after the previous one started.
    #[serde(with = "humantime_serde")]
    pub scrub_interval: Duration,
    /// Chunks no live object references are deleted this long after their last reference
    /// went away.
    #[serde(with = "humantime_serde")]
    pub gc_grace: Duration,
    /// How long a node keeps a deleted object's tombstone record (and how long the deleting
    /// node keeps trying to reach a holder with it). While it is kept, a late copy of the
    /// object's older record cannot bring the object back; a holder that was away for longer
    /// may. Keep it longer than any holder may be down and come back with its data.
    #[serde(with = "humantime_serde")]
    pub tombstone_retention: Duration,
}

impl Default for DurabilityConfig {
    fn default() -> Self {
        Self {
            repair_rate: bytesize::ByteSize::mib(64),
            scrub_rate: bytesize::ByteSize::mib(4),
            scrub_interval: Duration::from_secs(24 * 3600),
            gc_grace: Duration::from_secs(3600),
            tombstone_retention: Duration::from_secs(24 * 3600),
        }
    }
}

/// How much job work this node takes on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JobsConfig {
    /// Tasks run at once; defaults to the number of CPU cores.
    pub task_slots: usize,
    /// A node claims no second task while the machine's CPU load (busy fraction, 0 to 1)
    /// without its own use is above this: the ceiling keeps work off a machine busy with
    /// something else; `task_slots` bounds the node's own.
    pub max_load: f32,
}

impl Default for JobsConfig {
    fn default() -> Self {
        Self {
            task_slots: std::thread::available_parallelism()
                .map(std::num::NonZeroUsize::get)
                .unwrap_or(1),
            max_load: 0.9,
        }
    }
}

/// A command that `exec:NAME` runs: `[processors.NAME]` in the config file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecConfig {
    /// Program and arguments, run without a shell; the task's input goes to its stdin and its
    /// stdout is the task's output.
    pub command: Vec<String>,
    /// The command is killed when it runs longer than this.
    #[serde(with = "humantime_serde", default = "ExecConfig::default_timeout")]
    pub timeout: Duration,
    /// Output beyond this size fails the task (and the command is killed).
    #[serde(default = "ExecConfig::default_max_output")]
    pub max_output: bytesize::ByteSize,
}

impl ExecConfig {
    fn default_timeout() -> Duration {
        Duration::from_secs(60)
    }

    fn default_max_output() -> bytesize::ByteSize {
        bytesize::ByteSize::mib(256)
    }

    /// An entry with the default timeout and output limit.
    pub fn new(command: Vec<String>) -> Self {
        Self {
            command,
            timeout: Self::default_timeout(),
            max_output: Self::default_max_output(),
        }
    }

    /// Checks the entry registered as `name`; the message names what is wrong.
    fn validate(&self, name: &str) -> Result<(), String> {
        if !crate::jobs::exec::is_valid_name(name) {
            return Err(format!(
                "{name:?} is not a valid processor name: use 1 to {} characters of A-Z, a-z, 0-9, _ and -",
                crate::jobs::exec::MAX_NAME_LEN
            ));
        }
        match self.command.first() {
            None => return Err(format!("{name}.command must name a program")),
            Some(program) if program.is_empty() => {
                return Err(format!("{name}.command starts with an empty program name"));
            }
            Some(_) => {}
        }
        if self.timeout.is_zero() {
            return Err(format!("{name}.timeout must be longer than 0s"));
        }
        if self.max_output.as_u64() == 0 {
            return Err(format!("{name}.max_output must be larger than 0"));
        }
        Ok(())
    }
}

/// Control-API limits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    /// Uploads served at once; more wait.
    pub max_concurrent_uploads: usize,
    /// Chunks read ahead of the client on a download.
    pub read_ahead_chunks: usize,
    /// How long shutdown waits for requests in flight before it aborts them.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            max_concurrent_uploads: 32,
            read_ahead_chunks: 4,
            shutdown_grace: Duration::from_secs(30),
        }
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            other => Err(format!(
                "unknown log format {other:?}: expected text or json"
            )),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("./mesh-data"),
            api_addr: SocketAddr::from(([127, 0, 0, 1], 5080)),
            log_format: LogFormat::Text,
            redundancy: Redundancy::DEFAULT,
            chunker: ChunkerSpec::DEFAULT_CDC,
            store: crate::store::Config::default(),
            api: ApiConfig::default(),
            durability: DurabilityConfig::default(),
            net: NetConfig::default(),
            jobs: JobsConfig::default(),
            processors: BTreeMap::new(),
        }
    }
}

/// A configuration that cannot be used, with the key and value at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("invalid environment variable {var}={value:?}: {message}")]
    Env {
        var: String,
        value: String,
        message: String,
    },
    #[error("invalid value for {key}: {message}")]
    Invalid { key: &'static str, message: String },
}

impl Config {
    /// A config for in-process tests: the given data directory, the API on an OS-assigned
    /// port, small memtables so that many nodes fit in one process.
    pub fn for_tests(data_dir: PathBuf) -> Self {
        let mut config = Self {
            data_dir,
            api_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            ..Self::default()
        };
        config.store.write_buffer_size = bytesize::ByteSize::mib(8);
        config.store.block_cache_size = bytesize::ByteSize::mib(8);
        config.api.shutdown_grace = Duration::from_secs(5);
        config.net.listen = vec!["/ip4/127.0.0.1/udp/0/quic-v1".into()];
        config.net.min_free_space = bytesize::ByteSize::mib(16);
        // A lone test node stores its objects itself.
        config.redundancy = Redundancy::Replicas(1);
        config
    }

    /// Defaults, then the file at `path` (if any), then `MESH_*` variables from `env`.
    pub fn load(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut config = match path {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_owned(),
                    source,
                })?;
                toml::from_str(&text).map_err(|e| ConfigError::File {
                    path: path.to_owned(),
                    message: e.to_string(),
                })?
            }
            None => Self::default(),
        };
        let mut vars: Vec<(String, String)> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with("MESH_") && !NOT_CONFIG_KEYS.contains(&k.as_str()))
            .collect();
        vars.sort();
        for (var, value) in vars {
            config = config.with_env_override(&var, &value)?;
        }
        Ok(config)
    }

    fn with_env_override(&self, var: &str, value: &str) -> Result<Self, ConfigError> {
        let err = |message: String| ConfigError::Env {
            var: var.to_owned(),
            value: value.to_owned(),
            message,
        };
        let path: Vec<String> = var["MESH_".len()..]
            .split("__")
            .map(str::to_ascii_lowercase)
            .collect();
        let mut table = toml::Table::try_from(self).map_err(|e| err(e.to_string()))?;
        // A value is TOML if it parses as one (numbers, booleans), otherwise a plain string.
        let parsed = toml::from_str::<toml::Table>(&format!("v = {value}"))
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or_else(|| toml::Value::String(value.to_owned()));
        let (last, parents) = path.split_last().ok_or_else(|| err("empty key".into()))?;
        let mut node = &mut table;
        for key in parents {
            node = node
                .get_mut(key)
                .and_then(toml::Value::as_table_mut)
                .ok_or_else(|| err(format!("{key:?} is not a config section")))?;
        }
        if !node.contains_key(last) {
            return Err(err(format!("{last:?} is not a config key")));
        }
        // Strings such as sizes and policies stay strings even when they look numeric.
        let value = match (&node[last], parsed) {
            (toml::Value::String(_), toml::Value::Integer(i)) => toml::Value::String(i.to_string()),
            (_, v) => v,
        };
        node.insert(last.clone(), value);
        toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| err(e.message().to_owned()))
    }

    /// Checks what serde cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.data_dir.as_os_str().is_empty() {
            return Err(ConfigError::Invalid {
                key: "data_dir",
                message: "must not be empty".into(),
            });
        }
        if let ChunkerSpec::Records { .. } = self.chunker {
            return Err(ConfigError::Invalid {
                key: "chunker",
                message: "record chunking is chosen per put (--records), not as the default".into(),
            });
        }
        if self.api.max_concurrent_uploads == 0 {
            return Err(ConfigError::Invalid {
                key: "api.max_concurrent_uploads",
                message: "must be at least 1".into(),
            });
        }
        if !(1..=64).contains(&self.api.read_ahead_chunks) {
            return Err(ConfigError::Invalid {
                key: "api.read_ahead_chunks",
                message: "must be 1 to 64".into(),
            });
        }
        let blob = self.store.min_blob_size.as_u64();
        if blob > u64::from(mesh_proto::policy::MAX_CHUNK_LEN) {
            return Err(ConfigError::Invalid {
                key: "store.min_blob_size",
                message: format!(
                    "{} is larger than the largest chunk",
                    self.store.min_blob_size
                ),
            });
        }
        if self.store.min_file_size.as_u64() < 4096 {
            return Err(ConfigError::Invalid {
                key: "store.min_file_size",
                message: format!(
                    "{} is below 4 KiB; small chunks belong in RocksDB, not in files of their own",
                    self.store.min_file_size
                ),
            });
        }
        if self.net.fetch_window == 0 || self.net.fetch_window > 64 {
            return Err(ConfigError::Invalid {
                key: "net.fetch_window",
                message: "must be 1 to 64".into(),
            });
        }
        if self.net.write_window == 0 || self.net.write_window > 64 {
            return Err(ConfigError::Invalid {
                key: "net.write_window",
                message: "must be 1 to 64".into(),
            });
        }
        self.net.resolve(crate::net::Role::Storage)?;
        if self.store.write_buffer_size.as_u64() < 1 << 20 {
            return Err(ConfigError::Invalid {
                key: "store.write_buffer_size",
                message: "must be at least 1 MiB".into(),
            });
        }
        if !(1..=1024).contains(&self.jobs.task_slots) {
            return Err(ConfigError::Invalid {
                key: "jobs.task_slots",
                message: format!("{} is not 1 to 1024", self.jobs.task_slots),
            });
        }
        if !(self.jobs.max_load > 0.0 && self.jobs.max_load <= 1.0) {
            return Err(ConfigError::Invalid {
                key: "jobs.max_load",
                message: format!(
                    "{} is not a CPU load above 0 and at most 1 (1 = always claim)",
                    self.jobs.max_load
                ),
            });
        }
        for (name, exec) in &self.processors {
            exec.validate(name)
                .map_err(|message| ConfigError::Invalid {
                    key: "processors",
                    message,
                })?;
        }
        Ok(())
    }
}

/// Serde through `Display` / `FromStr`, for types operators write as strings.
mod as_string {
    use super::*;
    use serde::{Deserializer, Serializer, de::Error};

    pub fn serialize<T: Display, S: Serializer>(value: &T, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(value)
    }

    pub fn deserialize<'de, T, D>(d: D) -> Result<T, D::Error>
    where
        T: FromStr,
        T::Err: Display,
        D: Deserializer<'de>,
    {
        let s = String::deserialize(d)?;
        s.parse().map_err(D::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_str(text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meshd.toml");
        std::fs::write(&path, text).unwrap();
        Config::load(
            Some(&path),
            env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
        )
    }

    #[test]
    fn file_then_env_override_defaults() {
        let config = load_str(
            "data_dir = \"/srv/mesh\"\nredundancy = \"rep:2\"\nchunker = \"fixed:1MiB\"\n[store]\nmin_blob_size = \"128KiB\"\n",
            &[("MESH_API_ADDR", "127.0.0.1:7000"), ("MESH_STORE__BLOB_FILES", "false"), ("MESH_API_TOKEN", "x")],
        )
        .unwrap();
        assert_eq!(config.data_dir, PathBuf::from("/srv/mesh"));
        assert_eq!(config.redundancy, Redundancy::Replicas(2));
        assert_eq!(config.chunker, ChunkerSpec::Fixed { size: 1 << 20 });
        assert_eq!(config.store.min_blob_size, bytesize::ByteSize::kib(128));
        assert!(!config.store.blob_files);
        assert_eq!(config.api_addr, "127.0.0.1:7000".parse().unwrap());
        config.validate().unwrap();
    }

    #[test]
    fn errors_name_the_key_and_value() {
        let err = load_str("colour = \"blue\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("colour"), "{err}");
        let err = load_str("redundancy = \"rep:99\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("rep:99") && err.contains("line 1"), "{err}");
        let err = load_str("[store]\nmin_blob_size = \"big\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("min_blob_size") || err.contains("big"),
            "{err}"
        );
        let err = load_str("[store]\nmin_file_size = \"1KiB\"\n", &[])
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(err.contains("store.min_file_size"), "{err}");
        let err = load_str("", &[("MESH_REDUNDANCY", "ec:0+1")])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("MESH_REDUNDANCY") && err.contains("ec:0+1"),
            "{err}"
        );
        let err = load_str("", &[("MESH_NOPE", "1")]).unwrap_err().to_string();
        assert!(
            err.contains("MESH_NOPE") && err.contains("not a config key"),
            "{err}"
        );
        let err = load_str("", &[("MESH_API__SHUTDOWN_GRACE", "soon")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("MESH_API__SHUTDOWN_GRACE"), "{err}");
        let err = load_str("[api]\nmax_concurrent_uploads = 0\n", &[])
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(err.contains("api.max_concurrent_uploads"), "{err}");
    }

    #[test]
    fn jobs_and_registered_commands() {
        let config = load_str(
            "[jobs]\ntask_slots = 3\nmax_load = 0.5\n\n[processors.word-count_2]\ncommand = [\"/usr/bin/python3\", \"wc.py\"]\ntimeout = \"5s\"\nmax_output = \"1 MiB\"\n\n[processors.cat]\ncommand = [\"/bin/cat\"]\n",
            &[("MESH_JOBS__TASK_SLOTS", "5")],
        )
        .unwrap();
        config.validate().unwrap();
        assert_eq!(config.jobs.task_slots, 5);
        assert_eq!(config.jobs.max_load, 0.5);
        let wc = &config.processors["word-count_2"];
        assert_eq!(wc.command, ["/usr/bin/python3", "wc.py"]);
        assert_eq!(wc.timeout, Duration::from_secs(5));
        assert_eq!(wc.max_output, bytesize::ByteSize::mib(1));
        assert_eq!(
            config.processors["cat"],
            ExecConfig::new(vec!["/bin/cat".into()])
        );
        assert!(Config::default().jobs.task_slots >= 1);

        let invalid = |text: &str| {
            load_str(text, &[])
                .unwrap()
                .validate()
                .unwrap_err()
                .to_string()
        };
        let err = invalid("[processors.\"a b\"]\ncommand = [\"x\"]\n");
        assert!(
            err.contains("processors") && err.contains("\"a b\""),
            "{err}"
        );
        let err = invalid("[processors.x]\ncommand = []\n");
        assert!(err.contains("x.command"), "{err}");
        let err = invalid("[processors.x]\ncommand = [\"sh\"]\ntimeout = \"0s\"\n");
        assert!(err.contains("x.timeout"), "{err}");
        let err = invalid("[jobs]\ntask_slots = 0\n");
        assert!(err.contains("jobs.task_slots"), "{err}");
        let err = invalid("[jobs]\nmax_load = 1.5\n");
        assert!(err.contains("jobs.max_load"), "{err}");
        let err = load_str("[processors.x]\ncommand = [\"sh\"]\nshell = true\n", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("shell"), "{err}");
        let err = load_str("[processors.x]\ntimeout = \"1s\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("command"), "{err}");
    }

    #[test]
    fn relay_circuits_are_listen_addresses() {
        let relay = libp2p::PeerId::random();
        let circuit = format!("/ip4/203.0.113.7/udp/4001/quic-v1/p2p/{relay}/p2p-circuit");
        let text = format!(
            "[net]\nlisten = [\"/ip4/0.0.0.0/udp/4001/quic-v1\", \"{circuit}\"]\nadvertise_listen_addrs = false\n"
        );
        let config = load_str(&text, &[]).unwrap();
        config.validate().unwrap();
        let net = config.net.resolve(crate::net::Role::Storage).unwrap();
        assert!(!net.advertise_listen_addrs);
        assert_eq!(net.listen[1].to_string(), circuit);
        // A circuit that names no relay peer is refused, naming the key.
        let err = load_str(
            "[net]\nlisten = [\"/ip4/203.0.113.7/udp/4001/quic-v1/p2p-circuit\"]\n",
            &[],
        )
        .unwrap()
        .validate()
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("net.listen") && err.contains("p2p-circuit"),
            "{err}"
        );
    }

    #[test]
    fn the_example_file_documents_the_defaults() {
        // CARGO_MANIFEST_DIR at run time: the compiled-in one is stale in a reused build.
        let dir = std::env::var_os("CARGO_MANIFEST_DIR")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into());
        let path = dir.join("../meshd.example.toml");
        assert_eq!(Config::load(Some(&path), []).unwrap(), Config::default());
    }

    #[test]
    fn a_missing_file_is_a_clear_error() {
        let err = Config::load(Some(Path::new("/nonexistent/meshd.toml")), [])
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent/meshd.toml"), "{err}");
    }
}
