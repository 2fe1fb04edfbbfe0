//! mesh-proto: the vocabulary every mesh component shares, with no IO and no async runtime.
//!
//! - [`id`]: content addresses. A [`ChunkId`] is the BLAKE3-256 of a chunk's bytes; an
//!   [`ObjectId`] is the BLAKE3-256 of an object's canonical [`Manifest`] encoding.
//! - [`policy`]: how an object is stored ([`Redundancy`], `rep:N` / `ec:K+M`) and how its bytes
//!   are cut into chunks ([`ChunkerSpec`]).
//! - [`manifest`]: the versioned, canonically encoded description of an object.
//! - [`wire`]: what nodes say to each other: framed chunk, control and membership messages,
//!   gossiped load reports and placement records, each versioned and bounded.
//! - [`job`]: job specs and their canonical [`JobId`], the job protocol's messages (claim,
//!   renew, finish) and the job report.
//! - [`api`]: request and response types of the meshd control API, so that `meshd` and `meshctl`
//!   cannot drift apart.
//!
//! Data flows one way: the node chunks a byte stream, names each chunk by its [`ChunkId`],
//! records the list in a [`Manifest`], and names the object by the manifest's hash. Every
//! decoder here is bounded and rejects unknown versions and trailing bytes.

pub mod api;
pub mod id;
pub mod job;
pub mod manifest;
pub mod policy;
pub mod wire;

pub use id::{ChunkId, IdParseError, JobId, ObjectId};
pub use manifest::{ChunkRef, Manifest, ManifestError};
pub use policy::{ChunkerSpec, PolicyError, RecordFormat, Redundancy};

/// The version of this mesh build, reported in status and (later) over identify.
pub const MESH_VERSION: &str = env!("CARGO_PKG_VERSION");
