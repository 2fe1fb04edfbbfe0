//! Topology files: what a simulated network looks like.
//!
//! A topology is a versioned TOML file (see `topologies/three-clouds.toml`): regions named
//! `cloud/region`, each with a node count, the availability zones its nodes are spread over and
//! the link inside it; a `[[link]]` for every pair of regions; an optional bootstrap peer;
//! scripted `[[event]]`s; and an optional `[env]` of `MESH_*` settings every `meshd` gets. [`parse`] turns the text into a validated [`Topology`] in one step, so
//! nothing downstream ever sees a half-checked value. Every error names the line, column and
//! field it comes from (toml's spans), because a topology is edited by hand.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

/// The topology format this build reads.
pub const VERSION: u32 = 1;

/// meshd settings netsim passes to every node as flags (see `cluster.rs`), so `[env]` cannot.
const SET_BY_NETSIM: &[(&str, &str)] = &[
    ("MESH_DATA_DIR", "--data-dir"),
    ("MESH_API_ADDR", "--api-addr"),
    ("MESH_NET__LISTEN", "--listen"),
    ("MESH_NET__ZONE", "--zone"),
    ("MESH_NET__BOOTSTRAP", "--bootstrap"),
    ("MESH_NET__CLUSTER_KEY_FILE", "--cluster-key-file"),
];

/// The most regions and nodes per region: addresses are `10.77.<region>.<node>`.
pub const MAX_REGIONS: usize = 250;
pub const MAX_NODES_PER_REGION: usize = 250;

/// A validated topology.
#[derive(Debug, Clone, PartialEq)]
pub struct Topology {
    pub name: String,
    pub regions: Vec<Region>,
    /// Storage nodes, grouped by region in file order.
    pub nodes: Vec<Node>,
    pub bootstrap: Option<Bootstrap>,
    /// `links[a][b]`: the link from region `a` to region `b` (symmetric; `links[a][a]` is the
    /// link inside region `a`).
    pub links: Vec<Vec<LinkParams>>,
    /// Sorted by time.
    pub events: Vec<Event>,
    /// `MESH_*` environment variables given to every `meshd` of the run (meshd reads them as
    /// config overrides, e.g. `MESH_NET__DEAD_AFTER`); the bootstrap peer gets none.
    pub env: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Region {
    /// `cloud/region`, e.g. `aws/us-east-1`.
    pub name: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    /// `cloud-region-N`, e.g. `aws-us-east-1-1`.
    pub name: String,
    pub region: usize,
    /// Index of the node inside its region, from 1.
    pub index_in_region: usize,
    /// `cloud/region/az`, what `meshd --zone` gets.
    pub zone: String,
    /// Planned (address, ports, data directory) but not started by `up`; `netsim restart`
    /// starts it. A node that joins after the others, e.g. a reader that holds nothing.
    pub standby: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Bootstrap {
    pub region: usize,
    pub zone: String,
}

/// The properties of one direction of a link. Delay is half the RTT.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinkParams {
    pub rtt: Duration,
    /// Up to this much is added to (or taken from) each packet's one-way delay.
    pub jitter: Duration,
    /// Fraction of packets dropped, 0..=1.
    pub loss: f64,
    /// Bytes per second; `None` is unlimited.
    pub bandwidth: Option<u64>,
}

impl LinkParams {
    pub fn one_way_delay(&self) -> Duration {
        self.rtt / 2
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub at: Duration,
    pub action: Action,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    Kill {
        node: String,
    },
    Restart {
        node: String,
    },
    /// Cut every link between a region of `regions` and a region of `from`.
    Partition {
        regions: Vec<usize>,
        from: Vec<usize>,
    },
    Heal,
}

/// A topology that could not be read or is not valid.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read topology {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{origin}:{line}:{column}: {message}")]
    Invalid {
        origin: String,
        line: usize,
        column: usize,
        message: String,
    },
}

impl Topology {
    pub fn region_index(&self, name: &str) -> Option<usize> {
        self.regions.iter().position(|r| r.name == name)
    }

    pub fn node_index(&self, name: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.name == name)
    }

    pub fn link(&self, from_region: usize, to_region: usize) -> &LinkParams {
        &self.links[from_region][to_region]
    }
}

/// A topology shipped in `netsim/topologies/`, for tests: found through `CARGO_MANIFEST_DIR`
/// as cargo sets it when running them (the compiled-in path is the fallback; it is wrong
/// when the build was reused from a clone in another directory).
pub fn shipped(file: &str) -> PathBuf {
    let compiled = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("topologies");
    let running = std::env::var_os("CARGO_MANIFEST_DIR").map(PathBuf::from);
    // This crate's own tests, or another workspace member's.
    running
        .iter()
        .flat_map(|dir| [dir.join("topologies"), dir.join("../netsim/topologies")])
        .find(|dir| dir.is_dir())
        .unwrap_or(compiled)
        .join(file)
}

/// Reads and validates a topology file.
pub fn load(path: &Path) -> Result<Topology, Error> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
        path: path.display().to_string(),
        source,
    })?;
    parse(&text, &path.display().to_string())
}

/// Parses and validates topology text; `origin` names it in errors (usually the file path).
pub fn parse(text: &str, origin: &str) -> Result<Topology, Error> {
    let raw: RawTopology = toml::from_str(text).map_err(|e| {
        let offset = e.span().map(|s| s.start).unwrap_or(0);
        invalid(text, origin, offset, e.message().trim_end().to_string())
    })?;
    Validator { text, origin }.topology(raw)
}

// ---- raw, as written ---------------------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTopology {
    version: Spanned<u32>,
    name: Option<String>,
    #[serde(default)]
    defaults: RawDefaults,
    bootstrap: Option<Spanned<RawBootstrap>>,
    #[serde(rename = "region", default)]
    regions: Vec<Spanned<RawRegion>>,
    #[serde(rename = "link", default)]
    links: Vec<Spanned<RawLink>>,
    #[serde(rename = "event", default)]
    events: Vec<Spanned<RawEvent>>,
    #[serde(default)]
    env: BTreeMap<Spanned<String>, Spanned<toml::Value>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDefaults {
    /// RTT inside a region that sets none.
    rtt: Option<Spanned<String>>,
    jitter: Option<Spanned<String>>,
    loss: Option<Spanned<f64>>,
    bandwidth: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBootstrap {
    region: Spanned<String>,
    zone: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRegion {
    name: Spanned<String>,
    nodes: Spanned<i64>,
    /// How many of the region's nodes (the last ones) are standby.
    standby: Option<Spanned<i64>>,
    zones: Option<Spanned<Vec<String>>>,
    rtt: Option<Spanned<String>>,
    jitter: Option<Spanned<String>>,
    loss: Option<Spanned<f64>>,
    bandwidth: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLink {
    between: Spanned<Vec<String>>,
    rtt: Spanned<String>,
    jitter: Option<Spanned<String>>,
    loss: Option<Spanned<f64>>,
    bandwidth: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEvent {
    at: Spanned<String>,
    action: Spanned<String>,
    node: Option<Spanned<String>>,
    regions: Option<Spanned<Vec<String>>>,
    from: Option<Spanned<Vec<String>>>,
}

// ---- validation --------------------------------------------------------------------------

fn invalid(text: &str, origin: &str, offset: usize, message: String) -> Error {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let column = offset - before.rfind('\n').map(|i| i + 1).unwrap_or(0) + 1;
    Error::Invalid {
        origin: origin.to_string(),
        line,
        column,
        message,
    }
}

struct Validator<'a> {
    text: &'a str,
    origin: &'a str,
}

impl Validator<'_> {
    fn err<T>(&self, at: &Spanned<T>, message: impl fmt::Display) -> Error {
        invalid(self.text, self.origin, at.span().start, message.to_string())
    }

    fn duration(&self, field: &str, value: &Spanned<String>) -> Result<Duration, Error> {
        humantime::parse_duration(value.get_ref().trim()).map_err(|e| {
            self.err(
                value,
                format_args!(
                    "field `{field}`: {:?} is not a duration ({e}); write e.g. \"30ms\"",
                    value.get_ref()
                ),
            )
        })
    }

    fn loss(&self, value: &Spanned<f64>) -> Result<f64, Error> {
        let loss = *value.get_ref();
        if !(0.0..=1.0).contains(&loss) {
            return Err(self.err(
                value,
                format_args!(
                    "field `loss`: {loss} is not a fraction between 0 and 1 (0.01 drops 1%)"
                ),
            ));
        }
        Ok(loss)
    }

    fn bandwidth(&self, value: &Spanned<String>) -> Result<Option<u64>, Error> {
        parse_bandwidth(value.get_ref())
            .map_err(|e| self.err(value, format_args!("field `bandwidth`: {e}")))
    }

    fn region_ref(
        &self,
        field: &str,
        names: &BTreeMap<String, usize>,
        at: &Spanned<impl Sized>,
        name: &str,
    ) -> Result<usize, Error> {
        names.get(name).copied().ok_or_else(|| {
            let known: Vec<&str> = names.keys().map(String::as_str).collect();
            self.err(
                at,
                format_args!(
                    "field `{field}`: no region named {name:?}; regions are {}",
                    known.join(", ")
                ),
            )
        })
    }

    fn topology(&self, raw: RawTopology) -> Result<Topology, Error> {
        if *raw.version.get_ref() != VERSION {
            return Err(self.err(
                &raw.version,
                format_args!(
                    "field `version`: this netsim reads topology version {VERSION}, the file is version {}",
                    raw.version.get_ref()
                ),
            ));
        }
        let raw_defaults = &raw.defaults;
        let defaults = LinkParams {
            rtt: Duration::ZERO,
            jitter: match &raw_defaults.jitter {
                Some(j) => self.duration("jitter", j)?,
                None => Duration::ZERO,
            },
            loss: match &raw_defaults.loss {
                Some(l) => self.loss(l)?,
                None => 0.0,
            },
            bandwidth: match &raw_defaults.bandwidth {
                Some(b) => self.bandwidth(b)?,
                None => None,
            },
        };
        let default_rtt = match &raw_defaults.rtt {
            Some(r) => Some(self.duration("rtt", r)?),
            None => None,
        };

        if raw.regions.is_empty() {
            return Err(invalid(
                self.text,
                self.origin,
                self.text.len(),
                "no [[region]]: a topology needs at least one".to_string(),
            ));
        }
        if raw.regions.len() > MAX_REGIONS {
            return Err(self.err(
                &raw.regions[MAX_REGIONS],
                format_args!("at most {MAX_REGIONS} regions"),
            ));
        }

        let mut names = BTreeMap::new();
        let mut regions = Vec::new();
        let mut nodes = Vec::new();
        let mut intra = Vec::new();
        for (index, spanned) in raw.regions.iter().enumerate() {
            let region = spanned.get_ref();
            let name = region.name.get_ref().trim().to_string();
            let parts: Vec<&str> = name.split('/').collect();
            if parts.len() != 2 || parts.iter().any(|p| !is_simple_name(p)) {
                return Err(self.err(
                    &region.name,
                    format_args!(
                        "field `name`: {name:?} is not `cloud/region` (letters, digits and '-'), e.g. \"aws/us-east-1\""
                    ),
                ));
            }
            if names.insert(name.clone(), index).is_some() {
                return Err(self.err(
                    &region.name,
                    format_args!("field `name`: region {name:?} appears twice"),
                ));
            }
            let count = *region.nodes.get_ref();
            if !(0..=MAX_NODES_PER_REGION as i64).contains(&count) {
                return Err(self.err(
                    &region.nodes,
                    format_args!(
                        "field `nodes`: {count} is not between 0 and {MAX_NODES_PER_REGION}"
                    ),
                ));
            }
            let standby = match &region.standby {
                None => 0,
                Some(s) if (0..=count).contains(s.get_ref()) => *s.get_ref(),
                Some(s) => {
                    return Err(self.err(
                        s,
                        format_args!(
                            "field `standby`: {} is not between 0 and the region's {count} nodes",
                            s.get_ref()
                        ),
                    ));
                }
            };
            let zones = match &region.zones {
                Some(z) => {
                    if z.get_ref().is_empty() || z.get_ref().iter().any(|a| !is_simple_name(a)) {
                        return Err(self.err(
                            z,
                            "field `zones`: list the availability zones as short names, e.g. [\"a\", \"b\"]",
                        ));
                    }
                    z.get_ref().clone()
                }
                None => vec!["a".to_string()],
            };
            let rtt = match (&region.rtt, default_rtt) {
                (Some(r), _) => self.duration("rtt", r)?,
                (None, Some(r)) => r,
                (None, None) => {
                    return Err(self.err(
                        spanned,
                        format_args!(
                            "region {name:?} has no `rtt` (the RTT inside it) and [defaults] sets none"
                        ),
                    ));
                }
            };
            let anchor = region.jitter.as_ref().unwrap_or(&region.name);
            let params = self.link_params(
                rtt,
                anchor,
                &region.jitter,
                &region.loss,
                &region.bandwidth,
                &defaults,
            )?;
            intra.push(params);
            for i in 0..count as usize {
                let az = &zones[i % zones.len()];
                nodes.push(Node {
                    name: format!("{}-{}", name.replace('/', "-"), i + 1),
                    region: index,
                    index_in_region: i + 1,
                    zone: format!("{name}/{az}"),
                    standby: (i as i64) >= count - standby,
                });
            }
            regions.push(Region { name });
        }
        if nodes.is_empty() {
            return Err(self.err(&raw.regions[0], "no nodes: every region has `nodes = 0`"));
        }
        // Without a bootstrap peer the first node is everyone's; it cannot wait on standby.
        if raw.bootstrap.is_none() && nodes[0].standby {
            let first = &raw.regions[nodes[0].region];
            let at = first.get_ref().standby.as_ref();
            return Err(match at {
                Some(at) => self.err(
                    at,
                    format_args!(
                        "field `standby`: {} is the others' bootstrap peer (there is no [bootstrap]) and must start with them",
                        nodes[0].name
                    ),
                ),
                None => self.err(first, "the first node must not be standby"),
            });
        }

        let n = regions.len();
        let mut links: Vec<Vec<Option<LinkParams>>> = vec![vec![None; n]; n];
        for (i, params) in intra.into_iter().enumerate() {
            links[i][i] = Some(params);
        }
        for spanned in &raw.links {
            let link = spanned.get_ref();
            let between = link.between.get_ref();
            if between.len() != 2 {
                return Err(self.err(
                    &link.between,
                    "field `between`: name exactly two regions, e.g. [\"aws/us-east-1\", \"gcp/us-central1\"]",
                ));
            }
            let a = self.region_ref("between", &names, &link.between, between[0].trim())?;
            let b = self.region_ref("between", &names, &link.between, between[1].trim())?;
            if a == b {
                return Err(self.err(
                    &link.between,
                    "field `between`: a link joins two different regions; set the RTT inside a region with the region's `rtt`",
                ));
            }
            if links[a][b].is_some() {
                return Err(self.err(
                    &link.between,
                    format_args!(
                        "field `between`: the link between {:?} and {:?} is given twice",
                        regions[a].name, regions[b].name
                    ),
                ));
            }
            let rtt = self.duration("rtt", &link.rtt)?;
            let anchor = link.jitter.as_ref().unwrap_or(&link.rtt);
            let params = self.link_params(
                rtt,
                anchor,
                &link.jitter,
                &link.loss,
                &link.bandwidth,
                &defaults,
            )?;
            links[a][b] = Some(params);
            links[b][a] = Some(params);
        }
        let mut full = Vec::with_capacity(n);
        for (a, row) in links.into_iter().enumerate() {
            let mut out = Vec::with_capacity(n);
            for (b, cell) in row.into_iter().enumerate() {
                match cell {
                    Some(p) => out.push(p),
                    None => {
                        return Err(self.err(
                            &raw.regions[a.max(b)],
                            format_args!(
                                "no [[link]] between {:?} and {:?}: every pair of regions needs one, e.g.\n\n[[link]]\nbetween = [{:?}, {:?}]\nrtt = \"30ms\"",
                                regions[a].name, regions[b].name, regions[a].name, regions[b].name
                            ),
                        ));
                    }
                }
            }
            full.push(out);
        }

        let bootstrap = match &raw.bootstrap {
            None => None,
            Some(b) => {
                let b = b.get_ref();
                let region =
                    self.region_ref("region", &names, &b.region, b.region.get_ref().trim())?;
                let az = match &b.zone {
                    Some(z) if is_simple_name(z.get_ref()) => z.get_ref().clone(),
                    Some(z) => {
                        return Err(self.err(
                            z,
                            "field `zone`: an availability zone is a short name such as \"a\"",
                        ));
                    }
                    None => "a".to_string(),
                };
                Some(Bootstrap {
                    zone: format!("{}/{az}", regions[region].name),
                    region,
                })
            }
        };

        let node_names: HashSet<&str> = nodes.iter().map(|n| n.name.as_str()).collect();
        let mut events = Vec::new();
        for spanned in &raw.events {
            let event = spanned.get_ref();
            let at = self.duration("at", &event.at)?;
            let action = event.action.get_ref().trim();
            let node = |what: &str| -> Result<String, Error> {
                let Some(node) = &event.node else {
                    return Err(self.err(spanned, format_args!("a `{what}` event needs `node`")));
                };
                if !node_names.contains(node.get_ref().as_str()) {
                    return Err(self.err(
                        node,
                        format_args!("field `node`: no node named {:?}", node.get_ref()),
                    ));
                }
                Ok(node.get_ref().clone())
            };
            let region_list =
                |field: &str, list: &Option<Spanned<Vec<String>>>| -> Result<Vec<usize>, Error> {
                    let Some(list) = list else {
                        return Err(
                            self.err(spanned, format_args!("a `partition` event needs `{field}`"))
                        );
                    };
                    if list.get_ref().is_empty() {
                        return Err(self.err(
                            list,
                            format_args!("field `{field}`: name at least one region"),
                        ));
                    }
                    list.get_ref()
                        .iter()
                        .map(|r| self.region_ref(field, &names, list, r.trim()))
                        .collect()
                };
            let action = match action {
                "kill" => Action::Kill {
                    node: node("kill")?,
                },
                "restart" => Action::Restart {
                    node: node("restart")?,
                },
                "partition" => {
                    let regions = region_list("regions", &event.regions)?;
                    let from = region_list("from", &event.from)?;
                    if let Some(r) = regions.iter().find(|r| from.contains(r)) {
                        return Err(self.err(
                            spanned,
                            format_args!(
                                "region {:?} is on both sides of the partition",
                                names_of(&names, *r)
                            ),
                        ));
                    }
                    Action::Partition { regions, from }
                }
                "heal" => Action::Heal,
                other => {
                    return Err(self.err(
                        &event.action,
                        format_args!(
                            "field `action`: {other:?} is not one of kill, restart, partition, heal"
                        ),
                    ));
                }
            };
            let extra = match &action {
                Action::Kill { .. } | Action::Restart { .. } => {
                    event.regions.is_some() || event.from.is_some()
                }
                Action::Partition { .. } => event.node.is_some(),
                Action::Heal => {
                    event.node.is_some() || event.regions.is_some() || event.from.is_some()
                }
            };
            if extra {
                return Err(self.err(
                    spanned,
                    format_args!(
                        "a `{action_name}` event takes {fields}",
                        action_name = action.name(),
                        fields = action.fields()
                    ),
                ));
            }
            events.push(Event { at, action });
        }
        events.sort_by_key(|e| e.at);
        let env = self.env(&raw.env)?;

        Ok(Topology {
            name: raw.name.unwrap_or_else(|| "unnamed".to_string()),
            regions,
            nodes,
            bootstrap,
            links: full,
            events,
            env,
        })
    }

    /// The `[env]` table: `MESH_*` names and scalar values, passed as text (meshd parses a
    /// variable's value as TOML, so `0` and `"0"` mean the same). The settings netsim gives
    /// every node as flags are refused, since the flags would silently win.
    fn env(
        &self,
        table: &BTreeMap<Spanned<String>, Spanned<toml::Value>>,
    ) -> Result<BTreeMap<String, String>, Error> {
        let mut env = BTreeMap::new();
        for (key, value) in table {
            let name = key.get_ref();
            let well_formed = name.len() > "MESH_".len()
                && name.starts_with("MESH_")
                && name
                    .chars()
                    .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_');
            if !well_formed {
                return Err(self.err(
                    key,
                    format_args!(
                        "[env]: {name:?} is not a meshd setting; write MESH_ and the config key \
                         in capitals, sections joined by __, e.g. MESH_NET__DEAD_AFTER"
                    ),
                ));
            }
            if let Some(flag) = SET_BY_NETSIM
                .iter()
                .find_map(|(var, flag)| (var == name).then_some(flag))
            {
                return Err(self.err(
                    key,
                    format_args!(
                        "[env]: netsim sets {name} for every node itself (meshd {flag}, which \
                         overrides the environment)"
                    ),
                ));
            }
            let text = match value.get_ref() {
                toml::Value::String(s) => s.clone(),
                toml::Value::Integer(i) => i.to_string(),
                toml::Value::Float(f) => f.to_string(),
                toml::Value::Boolean(b) => b.to_string(),
                other => {
                    return Err(self.err(
                        value,
                        format_args!(
                            "[env]: {name} is a {}; give a string, number or boolean",
                            other.type_str()
                        ),
                    ));
                }
            };
            env.insert(name.clone(), text);
        }
        Ok(env)
    }

    /// A link's parameters: those it sets, else the defaults. `anchor` is where a jitter
    /// larger than the one-way delay is reported.
    fn link_params<T>(
        &self,
        rtt: Duration,
        anchor: &Spanned<T>,
        jitter: &Option<Spanned<String>>,
        loss: &Option<Spanned<f64>>,
        bandwidth: &Option<Spanned<String>>,
        defaults: &LinkParams,
    ) -> Result<LinkParams, Error> {
        let params = LinkParams {
            rtt,
            jitter: match jitter {
                Some(j) => self.duration("jitter", j)?,
                None => defaults.jitter,
            },
            loss: match loss {
                Some(l) => self.loss(l)?,
                None => defaults.loss,
            },
            bandwidth: match bandwidth {
                Some(b) => self.bandwidth(b)?,
                None => defaults.bandwidth,
            },
        };
        if params.jitter > params.one_way_delay() {
            return Err(self.err(
                anchor,
                format_args!(
                    "field `jitter`: {} is more than the one-way delay ({}, half the RTT)",
                    humantime::format_duration(params.jitter),
                    humantime::format_duration(params.one_way_delay())
                ),
            ));
        }
        Ok(params)
    }
}

impl Action {
    fn name(&self) -> &'static str {
        match self {
            Action::Kill { .. } => "kill",
            Action::Restart { .. } => "restart",
            Action::Partition { .. } => "partition",
            Action::Heal => "heal",
        }
    }

    fn fields(&self) -> &'static str {
        match self {
            Action::Kill { .. } | Action::Restart { .. } => "`at` and `node` only",
            Action::Partition { .. } => "`at`, `regions` and `from` only",
            Action::Heal => "`at` only",
        }
    }
}

fn names_of(names: &BTreeMap<String, usize>, index: usize) -> &str {
    names
        .iter()
        .find(|(_, i)| **i == index)
        .map(|(n, _)| n.as_str())
        .unwrap_or("?")
}

fn is_simple_name(s: &str) -> bool {
    !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
}

/// Parses a bandwidth such as `1Gbit/s`, `100 Mbit/s`, `125MB/s`, `10MiB/s` or `unlimited`
/// into bytes per second (`None` for unlimited). Bit units are decimal (network convention).
pub fn parse_bandwidth(text: &str) -> Result<Option<u64>, String> {
    let t = text.trim();
    if t.eq_ignore_ascii_case("unlimited") {
        return Ok(None);
    }
    let t = t
        .strip_suffix("/s")
        .or_else(|| t.strip_suffix("ps"))
        .unwrap_or(t);
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let hint = "write e.g. \"1Gbit/s\", \"100Mbit/s\", \"125MB/s\" or \"unlimited\"";
    let number: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} does not start with a number; {hint}"))?;
    let bytes_per_unit = match unit.trim() {
        "bit" => 1.0 / 8.0,
        "kbit" | "Kbit" | "kb" | "Kb" => 1e3 / 8.0,
        "Mbit" | "Mb" => 1e6 / 8.0,
        "Gbit" | "Gb" => 1e9 / 8.0,
        "B" => 1.0,
        "kB" | "KB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "KiB" => 1024.0,
        "MiB" => 1024.0 * 1024.0,
        "GiB" => 1024.0 * 1024.0 * 1024.0,
        other => return Err(format!("unknown unit {other:?} in {text:?}; {hint}")),
    };
    let bytes = (number * bytes_per_unit).round();
    if !(1.0..=1e13).contains(&bytes) {
        return Err(format!(
            "{text:?} is out of range (at least 8 bit/s, at most 10 TB/s)"
        ));
    }
    Ok(Some(bytes as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMALL: &str = r#"
version = 1
name = "small"

[defaults]
jitter = "0.1ms"

[bootstrap]
region = "aws/us-east-1"

[[region]]
name = "aws/us-east-1"
nodes = 2
zones = ["a", "b"]
rtt = "1ms"

[[region]]
name = "gcp/us-central1"
nodes = 1
rtt = "1ms"
bandwidth = "1Gbit/s"

[[link]]
between = ["aws/us-east-1", "gcp/us-central1"]
rtt = "30ms"
loss = 0.01

[[event]]
at = "20s"
action = "partition"
regions = ["gcp/us-central1"]
from = ["aws/us-east-1"]

[[event]]
at = "10s"
action = "kill"
node = "aws-us-east-1-2"
"#;

    fn error_of(text: &str) -> (usize, String) {
        match parse(text, "t.toml") {
            Err(Error::Invalid { line, message, .. }) => (line, message),
            other => panic!("expected a validation error, got {other:?}"),
        }
    }

    fn line_of(text: &str, needle: &str) -> usize {
        text.lines()
            .position(|l| l.contains(needle))
            .expect("needle")
            + 1
    }

    #[test]
    fn parses_the_small_topology() {
        let t = parse(SMALL, "t.toml").expect("valid");
        assert_eq!(t.regions.len(), 2);
        let names: Vec<&str> = t.nodes.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(
            names,
            ["aws-us-east-1-1", "aws-us-east-1-2", "gcp-us-central1-1"]
        );
        assert_eq!(t.nodes[1].zone, "aws/us-east-1/b");
        assert_eq!(
            t.bootstrap.as_ref().map(|b| b.zone.as_str()),
            Some("aws/us-east-1/a")
        );
        let cross = t.link(0, 1);
        assert_eq!(cross.rtt, Duration::from_millis(30));
        assert_eq!(cross.one_way_delay(), Duration::from_millis(15));
        assert_eq!(cross.jitter, Duration::from_micros(100));
        assert_eq!(cross.loss, 0.01);
        assert_eq!(t.link(1, 0), cross);
        assert_eq!(t.link(1, 1).bandwidth, Some(125_000_000));
        assert_eq!(
            t.events[0].at,
            Duration::from_secs(10),
            "events are sorted by time"
        );
        assert_eq!(
            t.events[1].action,
            Action::Partition {
                regions: vec![1],
                from: vec![0]
            }
        );
    }

    /// Asserts that `text` fails on the line holding `at` (when given) with a message
    /// containing every one of `words`.
    fn assert_invalid(text: &str, at: Option<&str>, words: &[&str]) {
        let (line, message) = error_of(text);
        if let Some(needle) = at {
            assert_eq!(line, line_of(text, needle), "{message}");
        }
        for word in words {
            assert!(message.contains(word), "{word:?} not in {message:?}");
        }
    }

    #[test]
    fn field_errors_name_their_line_and_field() {
        let cases: &[(&str, &str, Option<&str>, &[&str])] = &[
            (
                "rtt = \"30ms\"",
                "rtt = \"30ms\"\nlatency = \"5ms\"",
                Some("latency"),
                &["latency"],
            ),
            (
                "rtt = \"30ms\"",
                "rtt = \"30 parsecs\"",
                Some("parsecs"),
                &["`rtt`"],
            ),
            ("loss = 0.01", "loss = 5.0", Some("loss = 5.0"), &["`loss`"]),
            (
                "rtt = \"30ms\"",
                "rtt = \"30ms\"\njitter = \"20ms\"",
                Some("jitter = \"20ms\""),
                &["`jitter`"],
            ),
            (
                "version = 1",
                "version = 7",
                Some("version = 7"),
                &["version 7"],
            ),
            (
                "action = \"kill\"",
                "action = \"explode\"",
                Some("explode"),
                &["`action`"],
            ),
            ("action = \"kill\"", "action = \"heal\"", None, &["`heal`"]),
            (
                "region = \"aws/us-east-1\"",
                "region = \"aws/eu-west-9\"",
                Some("eu-west-9"),
                &["eu-west-9", "`region`"],
            ),
            (
                "node = \"aws-us-east-1-2\"",
                "node = \"nope\"",
                Some("\"nope\""),
                &["`node`"],
            ),
            (
                "between = [\"aws/us-east-1\", \"gcp/us-central1\"]",
                "between = [\"aws/us-east-1\", \"aws/us-east-1\"]",
                Some("between"),
                &["two different regions"],
            ),
        ];
        for (from, to, at, words) in cases {
            assert!(SMALL.contains(from), "{from}");
            assert_invalid(&SMALL.replacen(from, to, 1), *at, words);
        }
    }

    #[test]
    fn missing_link_is_reported() {
        let start = SMALL.find("[[link]]").expect("link");
        let end = SMALL.find("[[event]]").expect("event");
        let text = format!("{}{}", &SMALL[..start], &SMALL[end..]);
        assert_invalid(&text, None, &["no [[link]] between"]);
    }

    #[test]
    fn toml_syntax_error_has_a_line() {
        let text = SMALL.replace("nodes = 1", "nodes = ");
        let (line, _) = error_of(&text);
        let expected = text.lines().position(|l| l == "nodes = ").expect("line") + 1;
        assert_eq!(line, expected);
    }

    #[test]
    fn bandwidths() {
        assert_eq!(parse_bandwidth("1Gbit/s"), Ok(Some(125_000_000)));
        assert_eq!(parse_bandwidth("100 Mbit/s"), Ok(Some(12_500_000)));
        assert_eq!(parse_bandwidth("125MB/s"), Ok(Some(125_000_000)));
        assert_eq!(parse_bandwidth("1MiB/s"), Ok(Some(1 << 20)));
        assert_eq!(parse_bandwidth("10Gbps"), Ok(Some(1_250_000_000)));
        assert_eq!(parse_bandwidth("unlimited"), Ok(None));
        assert!(parse_bandwidth("fast").is_err());
        assert!(parse_bandwidth("10 furlongs/s").is_err());
        assert!(parse_bandwidth("0bit/s").is_err());
    }

    #[test]
    fn standby_marks_the_last_nodes_of_a_region() {
        let text = SMALL.replacen("nodes = 2", "nodes = 3\nstandby = 1", 1);
        let t = parse(&text, "t.toml").expect("valid");
        let standby: Vec<(&str, bool)> = t
            .nodes
            .iter()
            .map(|n| (n.name.as_str(), n.standby))
            .collect();
        assert_eq!(
            standby,
            [
                ("aws-us-east-1-1", false),
                ("aws-us-east-1-2", false),
                ("aws-us-east-1-3", true),
                ("gcp-us-central1-1", false)
            ]
        );
        assert_invalid(
            &SMALL.replacen("nodes = 2", "nodes = 2\nstandby = 3", 1),
            Some("standby = 3"),
            &["`standby`"],
        );
        // Without a bootstrap peer, the first node is everyone's and cannot wait.
        let start = SMALL.find("[bootstrap]").expect("bootstrap");
        let end = SMALL[start..].find("[[region]]").expect("region") + start;
        let no_bootstrap = format!("{}{}", &SMALL[..start], &SMALL[end..]);
        parse(&no_bootstrap, "t.toml").expect("valid without a bootstrap peer");
        assert_invalid(
            &no_bootstrap.replacen("nodes = 2", "nodes = 2\nstandby = 2", 1),
            Some("standby = 2"),
            &["bootstrap"],
        );
    }

    #[test]
    fn env_is_parsed_and_checked() {
        let t = parse(SMALL, "t.toml").expect("valid");
        assert!(t.env.is_empty(), "no [env], no variables");
        let with_env = format!(
            "{SMALL}\n[env]\nMESH_NET__DEAD_AFTER = \"5s\"\nMESH_DURABILITY__REPAIR_RATE = 0\n\
             MESH_STORE__BLOB_FILES = false\n"
        );
        let t = parse(&with_env, "t.toml").expect("valid");
        let env: Vec<(&str, &str)> = t
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(
            env,
            [
                ("MESH_DURABILITY__REPAIR_RATE", "0"),
                ("MESH_NET__DEAD_AFTER", "5s"),
                ("MESH_STORE__BLOB_FILES", "false"),
            ]
        );
        let cases: &[(&str, &[&str])] = &[
            (
                "mesh_net__dead_after = \"5s\"",
                &["mesh_net__dead_after", "MESH_"],
            ),
            (
                "NET__DEAD_AFTER = \"5s\"",
                &["NET__DEAD_AFTER", "not a meshd setting"],
            ),
            ("MESH_ = 1", &["\"MESH_\""]),
            ("MESH_NET__ZONE = \"x/y/z\"", &["MESH_NET__ZONE", "--zone"]),
            ("MESH_DATA_DIR = \"/tmp/x\"", &["--data-dir"]),
            ("MESH_NET__LISTEN = [\"a\"]", &["--listen"]),
            (
                "MESH_NET__BOOTSTRAP_PEERS = [1, 2]",
                &["MESH_NET__BOOTSTRAP_PEERS", "array"],
            ),
            ("MESH_X = { a = 1 }", &["MESH_X", "table"]),
        ];
        for (line, words) in cases {
            let text = format!("{SMALL}\n[env]\nMESH_LOG = \"debug\"\n{line}\n");
            assert_invalid(&text, Some(line), words);
        }
    }

    #[test]
    fn shipped_topologies_are_valid() {
        let dir = shipped("");
        let three = load(&dir.join("three-clouds.toml")).expect("three-clouds");
        assert_eq!(three.nodes.len(), 6);
        assert_eq!(three.regions.len(), 3);
        assert!(three.bootstrap.is_some());
        let large = load(&dir.join("six-regions.toml")).expect("six-regions");
        assert_eq!(large.regions.len(), 6);
        assert!((20..=28).contains(&large.nodes.len()));
        let throughput = load(&dir.join("bench-throughput.toml")).expect("bench-throughput");
        let standby: Vec<bool> = throughput.nodes.iter().map(|n| n.standby).collect();
        assert_eq!(standby, [false, false, false, true]);
        let ops = load(&dir.join("bench-ops.toml")).expect("bench-ops");
        assert_eq!(ops.nodes.len(), 3);
        let jobs = load(&dir.join("bench-jobs.toml")).expect("bench-jobs");
        assert_eq!(jobs.nodes.len(), 3);
        assert!(jobs.nodes.iter().all(|n| !n.standby));
        let repair = load(&dir.join("bench-repair.toml")).expect("bench-repair");
        assert_eq!(repair.nodes.len(), 5);
        assert_eq!(
            repair.env.get("MESH_NET__DEAD_AFTER").map(String::as_str),
            Some("5s")
        );
        let repair_ec = load(&dir.join("bench-repair-ec.toml")).expect("bench-repair-ec");
        assert_eq!(repair_ec.nodes.len(), 8);
        assert_eq!(repair_ec.env, repair.env);
    }
}
