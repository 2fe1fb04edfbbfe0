//! Messages between nodes: the chunk, control and membership protocols, the load report that
//! travels over gossip, and the placement record.
//!
//! Every message is a frame: a version byte, a length-prefixed bincode header and a
//! length-prefixed raw payload. Chunk and manifest bytes travel in the payload, so they are
//! never re-encoded, and the header stays small enough to bound separately. A decoder checks
//! the version first, then both lengths against the limits of its protocol before it reads
//! anything else, and refuses trailing bytes, so a hostile peer can at most make us read the
//! limit and answer with an error.

use serde::{Deserialize, Serialize};

use crate::id::{ChunkId, ObjectId};
use crate::manifest::MAX_MANIFEST_LEN;
use crate::policy::{MAX_CHUNK_LEN, Redundancy};

/// Version of every frame and of the persisted placement record. A node refuses other
/// versions with [`WireError::UnsupportedVersion`].
pub const WIRE_VERSION: u8 = 1;

/// Kademlia protocol name of the mesh (contract).
pub const KAD_PROTOCOL: &str = "/mesh/kad/1.0.0";
/// Chunk transfer: store, fetch, has, and copy (fetch from a named holder and store).
pub const CHUNK_PROTOCOL: &str = "/mesh/chunk/1";
/// Placement records and manifests.
pub const CONTROL_PROTOCOL: &str = "/mesh/control/1";
/// Membership proof (challenge-response on the cluster key).
pub const AUTH_PROTOCOL: &str = "/mesh/auth/1";
/// Identify's protocol version string; a peer with another one is not a mesh peer.
pub const IDENTIFY_PROTOCOL: &str = "/mesh/id/1";
/// Gossipsub topic of load reports.
pub const LOAD_TOPIC: &str = "mesh/load/1";
/// Gossipsub topic of job announcements.
pub const JOB_TOPIC: &str = "mesh/jobs/1";

/// Most chunk ids one `Has` request may carry.
pub const MAX_HAS_IDS: usize = 4096;
/// Most holders one `Copy` request may name.
pub const MAX_COPY_SOURCES: usize = 16;
/// Longest peer id, in bytes (an Ed25519 identity multihash is 38).
pub const MAX_NODE_ID_LEN: usize = 64;
/// Longest load report on the wire (gossipsub caps messages at 64 KiB anyway).
pub const MAX_LOAD_REPORT_LEN: usize = 4096;
/// Most `exec:` processor names one load report carries.
pub const MAX_REPORTED_PROCESSORS: usize = 32;
/// Longest zone path.
pub const MAX_ZONE_LEN: usize = 256;
/// Most distinct holders one placement record may name.
pub const MAX_RECORD_NODES: usize = 4096;

/// Size limits of one protocol's frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub header: usize,
    pub payload: usize,
}

impl Limits {
    /// Chunk protocol: small headers, payloads of at most one chunk.
    pub const CHUNK: Limits = Limits {
        header: 256 * 1024,
        payload: MAX_CHUNK_LEN as usize,
    };
    /// Control protocol: a placement record in the header, a manifest in the payload.
    pub const CONTROL: Limits = Limits {
        header: 64 * 1024 * 1024,
        payload: MAX_MANIFEST_LEN,
    };
    /// Membership proof: a nonce or a proof, nothing else.
    pub const AUTH: Limits = Limits {
        header: 256,
        payload: 0,
    };
}

/// Bytes of a frame in front of the header: version, header length.
pub const FRAME_PREFIX_LEN: usize = 5;

/// Why a frame or record was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("unsupported message version {found} (this node speaks version {WIRE_VERSION})")]
    UnsupportedVersion { found: u8 },
    #[error("{part} of {len} bytes exceeds the limit of {max}")]
    TooLarge {
        part: &'static str,
        len: usize,
        max: usize,
    },
    #[error("truncated message: {0}")]
    Truncated(&'static str),
    #[error("malformed message: {0}")]
    Malformed(String),
    #[error("{extra} trailing bytes after the message")]
    TrailingBytes { extra: usize },
}

fn config() -> impl bincode::config::Config {
    // The limit caps every allocation a decoder makes to the largest header any protocol allows.
    bincode::config::standard().with_limit::<{ 64 * 1024 * 1024 }>()
}

/// Encodes a header with the canonical configuration.
pub fn encode_header<T: Serialize>(header: &T) -> Vec<u8> {
    // Plain data into a Vec cannot fail; an empty header is refused by every decoder.
    bincode::serde::encode_to_vec(header, config()).unwrap_or_default()
}

/// Decodes a header, refusing trailing bytes.
pub fn decode_header<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, WireError> {
    let (value, read): (T, usize) = bincode::serde::decode_from_slice(bytes, config())
        .map_err(|e| WireError::Malformed(e.to_string()))?;
    if read != bytes.len() {
        return Err(WireError::TrailingBytes {
            extra: bytes.len() - read,
        });
    }
    Ok(value)
}

/// Checks a frame's prefix (version, header length) and returns the header length.
pub fn check_prefix(prefix: &[u8; FRAME_PREFIX_LEN], limits: Limits) -> Result<usize, WireError> {
    if prefix[0] != WIRE_VERSION {
        return Err(WireError::UnsupportedVersion { found: prefix[0] });
    }
    let len = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]) as usize;
    if len == 0 {
        return Err(WireError::Truncated("empty header"));
    }
    if len > limits.header {
        return Err(WireError::TooLarge {
            part: "header",
            len,
            max: limits.header,
        });
    }
    Ok(len)
}

/// Checks a payload length against the limits.
pub fn check_payload_len(len: u32, limits: Limits) -> Result<usize, WireError> {
    let len = len as usize;
    if len > limits.payload {
        return Err(WireError::TooLarge {
            part: "payload",
            len,
            max: limits.payload,
        });
    }
    Ok(len)
}

/// Encodes a whole frame into one buffer (tests, fuzzing, small messages).
pub fn encode_frame<T: Serialize>(header: &T, payload: &[u8]) -> Vec<u8> {
    let header = encode_header(header);
    let mut out = Vec::with_capacity(FRAME_PREFIX_LEN + header.len() + 4 + payload.len());
    out.push(WIRE_VERSION);
    out.extend_from_slice(&(header.len() as u32).to_be_bytes());
    out.extend_from_slice(&header);
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// Decodes a whole frame from one buffer, applying the same checks as the stream codec.
pub fn decode_frame<T: for<'de> Deserialize<'de>>(
    bytes: &[u8],
    limits: Limits,
) -> Result<(T, &[u8]), WireError> {
    let prefix: &[u8; FRAME_PREFIX_LEN] = bytes
        .get(..FRAME_PREFIX_LEN)
        .and_then(|p| p.try_into().ok())
        .ok_or(WireError::Truncated("frame prefix"))?;
    let header_len = check_prefix(prefix, limits)?;
    let rest = &bytes[FRAME_PREFIX_LEN..];
    let header = rest
        .get(..header_len)
        .ok_or(WireError::Truncated("header"))?;
    let rest = &rest[header_len..];
    let len_bytes: [u8; 4] = rest
        .get(..4)
        .and_then(|p| p.try_into().ok())
        .ok_or(WireError::Truncated("payload length"))?;
    let payload_len = check_payload_len(u32::from_be_bytes(len_bytes), limits)?;
    let rest = &rest[4..];
    let payload = rest
        .get(..payload_len)
        .ok_or(WireError::Truncated("payload"))?;
    if rest.len() > payload_len {
        return Err(WireError::TrailingBytes {
            extra: rest.len() - payload_len,
        });
    }
    Ok((decode_header(header)?, payload))
}

/// A peer's identity as raw bytes (a libp2p `PeerId`'s multihash); proto knows no libp2p.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct NodeId(#[serde(with = "serde_bytes_vec")] pub Vec<u8>);

mod serde_bytes_vec {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let v: Vec<u8> = Deserialize::deserialize(d)?;
        if v.len() > super::MAX_NODE_ID_LEN {
            return Err(serde::de::Error::custom("node id too long"));
        }
        Ok(v)
    }
}

/// Chunk protocol request. `Store` carries the chunk's bytes as the frame payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChunkRequest {
    Store {
        id: ChunkId,
    },
    Fetch {
        id: ChunkId,
    },
    Has {
        ids: Vec<ChunkId>,
    },
    /// Fetch this chunk from one of `from` (at most [`MAX_COPY_SOURCES`] holders), verify it
    /// and store it; answered like `Store`. Repair and put completion use it for a replica
    /// the sender does not hold itself, so that the bytes cross the network once (holder to
    /// new holder) instead of twice (holder to sender to new holder). No payload.
    Copy {
        id: ChunkId,
        from: Vec<NodeId>,
    },
}

/// Chunk protocol response. `Data` carries the chunk's bytes as the frame payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChunkResponse {
    Stored { new: bool },
    Data,
    NotFound,
    Has { present: Vec<bool> },
    Refused { reason: Refusal, message: String },
}

/// Why a peer refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Refusal {
    /// The requester has not proven membership of the cluster.
    Unauthenticated,
    /// The request is malformed or its bytes do not match its id.
    BadRequest,
    /// The node has no room.
    Full,
    /// Too many requests in flight; retry later.
    Busy,
    /// Storage failed on the node.
    Internal,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Refusal::Unauthenticated => "unauthenticated",
            Refusal::BadRequest => "bad request",
            Refusal::Full => "full",
            Refusal::Busy => "busy",
            Refusal::Internal => "internal error",
        })
    }
}

/// Control protocol request. `PutObject` and `KeepObject` carry the manifest's bytes as the
/// frame payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ControlRequest {
    /// Keep this object's manifest and placement record (the receiver is a holder).
    PutObject { record: PlacementRecord },
    /// Send the manifest and placement record of an object.
    GetObject { id: ObjectId },
    /// Delete this object: `record` is its tombstone, a version that supersedes the live
    /// record, with no part lists (see [`PlacementRecord::validate_tombstone`]). No payload.
    /// The receiver keeps the tombstone and releases its share of the object.
    DeleteObject { record: PlacementRecord },
    /// The job protocol: claiming, renewing and finishing tasks (see [`crate::job`]).
    Job(crate::job::JobRequest),
    /// As `PutObject`, but the holder does not announce the object in the DHT: a job task's
    /// output, which its coordinator finds through the task's result and which becomes part
    /// of the job's composed objects, which are announced. (Last, so that the variants
    /// before it keep their wire tags. A node that predates it refuses it; the writer queues
    /// the delivery, which stays a `KeepObject`, so such a holder gets the record once it is
    /// upgraded, or repair replaces it when the delivery gives up.)
    KeepObject { record: PlacementRecord },
}

/// Control protocol response. `Object` carries the manifest's bytes as the frame payload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ControlResponse {
    Stored,
    Object { record: PlacementRecord },
    NotFound,
    Refused { reason: Refusal, message: String },
    Job(crate::job::JobResponse),
}

/// Membership challenge: prove you know the cluster key by keying a hash of this nonce.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthRequest {
    pub nonce: [u8; 32],
}

/// Membership answer. `None` when the answering node has no cluster key (open mesh).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthResponse {
    pub proof: Option<[u8; 32]>,
}

/// The proof that `prover` knows `key`, for `verifier`'s `nonce`. Binding both peer ids
/// (which QUIC's TLS has authenticated) means a proof cannot be replayed on another
/// connection or relayed by a man in the middle.
pub fn membership_proof(
    key: &[u8; 32],
    nonce: &[u8; 32],
    prover: &NodeId,
    verifier: &NodeId,
) -> [u8; 32] {
    let mut hasher = blake3::Hasher::new_keyed(key);
    hasher.update(b"mesh membership proof v1");
    hasher.update(nonce);
    hasher.update(&(prover.0.len() as u32).to_be_bytes());
    hasher.update(&prover.0);
    hasher.update(&(verifier.0.len() as u32).to_be_bytes());
    hasher.update(&verifier.0);
    *hasher.finalize().as_bytes()
}

/// What a node reports about itself over gossip every few seconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct LoadReport {
    pub zone: String,
    pub version: String,
    /// Milliseconds since the Unix epoch when the report was made.
    pub at_ms: u64,
    /// CPU busy fraction over the last interval, 0..=1 per core summed over cores / cores.
    pub cpu: f32,
    pub mem_used: u64,
    pub mem_total: u64,
    pub disk_free: u64,
    pub disk_used: u64,
    pub chunks: u64,
    pub bytes: u64,
    pub tasks_running: u32,
    pub tasks_queued: u32,
    pub net_rx_bytes_per_sec: u64,
    pub net_tx_bytes_per_sec: u64,
    /// `exec:` processors this node's config registers (jobs needing them ask it).
    pub processors: Vec<String>,
}

impl LoadReport {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![WIRE_VERSION];
        out.extend_from_slice(&encode_header(self));
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        if bytes.len() > MAX_LOAD_REPORT_LEN {
            return Err(WireError::TooLarge {
                part: "load report",
                len: bytes.len(),
                max: MAX_LOAD_REPORT_LEN,
            });
        }
        let (&version, rest) = bytes
            .split_first()
            .ok_or(WireError::Truncated("load report"))?;
        if version != WIRE_VERSION {
            return Err(WireError::UnsupportedVersion { found: version });
        }
        let report: LoadReport = decode_header(rest)?;
        if report.zone.len() > MAX_ZONE_LEN || report.version.len() > MAX_ZONE_LEN {
            return Err(WireError::Malformed("zone or version too long".into()));
        }
        if !report.cpu.is_finite() {
            return Err(WireError::Malformed("cpu is not a number".into()));
        }
        if report.processors.len() > MAX_REPORTED_PROCESSORS
            || report.processors.iter().any(|p| p.len() > 64)
        {
            return Err(WireError::Malformed(
                "too many or too long processor names".into(),
            ));
        }
        Ok(report)
    }
}

/// Where an object's chunks are: the mutable side of an object. A tombstone records a delete
/// and beats every live record; otherwise a higher `version` wins, then the greater `writer`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlacementRecord {
    pub object: ObjectId,
    pub version: u64,
    pub writer: NodeId,
    pub redundancy: Redundancy,
    pub tombstone: bool,
    /// Every distinct holder, once.
    pub nodes: Vec<NodeId>,
    /// For each part, in order, indices into `nodes`. A part is a chunk of the manifest for
    /// `rep:N`, and a shard for `ec:K+M` (see `parts`).
    pub holders: Vec<Vec<u16>>,
    /// `ec:K+M` only: the id of every shard, K+M per chunk in manifest order (shard `s` of
    /// chunk `c` is part `c * (K+M) + s`). Empty for `rep:N`. Shards are a deterministic
    /// function of the chunk, so these ids are checkable by anyone holding the chunk, and a
    /// reader verifies every rebuilt chunk against the manifest.
    pub parts: Vec<ChunkId>,
}

/// The record layout before `parts` existed (wire version 1 without it), still read from
/// stores written by earlier builds.
#[derive(Deserialize)]
struct LegacyRecord {
    object: ObjectId,
    version: u64,
    writer: NodeId,
    redundancy: Redundancy,
    tombstone: bool,
    nodes: Vec<NodeId>,
    holders: Vec<Vec<u16>>,
}

impl PlacementRecord {
    /// True when `self` should replace `other`. A delete is final: an object id names one
    /// manifest, which is never put again, so a tombstone beats any live record, even one a
    /// repair racing the delete wrote with a higher version; tombstones, and live records,
    /// are ordered by version, then writer.
    pub fn supersedes(&self, other: &PlacementRecord) -> bool {
        (self.tombstone, self.version, &self.writer)
            > (other.tombstone, other.version, &other.writer)
    }

    /// The tombstone that deletes the object this record describes: the next version,
    /// written by `writer`, naming the same holders (whom the delete must reach) and no parts.
    pub fn tombstone(&self, writer: NodeId) -> PlacementRecord {
        PlacementRecord {
            object: self.object,
            version: self.version.saturating_add(1),
            writer,
            redundancy: self.redundancy,
            tombstone: true,
            nodes: self.nodes.clone(),
            holders: Vec::new(),
            parts: Vec::new(),
        }
    }

    /// Checks a record sent as a tombstone: flagged as one, no part lists, a bounded holder list.
    pub fn validate_tombstone(&self) -> Result<(), WireError> {
        if !self.tombstone {
            return Err(WireError::Malformed("the record is not a tombstone".into()));
        }
        if !self.holders.is_empty() || !self.parts.is_empty() {
            return Err(WireError::Malformed("a tombstone lists parts".into()));
        }
        self.validate(0)
    }

    /// How many parts the object has: chunks for `rep:N`, shards for `ec:K+M`.
    pub fn part_count(&self) -> usize {
        self.holders.len()
    }

    /// The chunk id of part `index`: the manifest's chunk for `rep:N`, the shard otherwise.
    pub fn part_id(&self, manifest_chunks: &[crate::ChunkRef], index: usize) -> Option<ChunkId> {
        if self.parts.is_empty() {
            manifest_chunks.get(index).map(|c| c.id)
        } else {
            self.parts.get(index).copied()
        }
    }

    /// Live holders each part needs to meet the policy: N for `rep:N`, 1 per shard for
    /// `ec:K+M` (each of the K+M shards on its own holder).
    pub fn holders_wanted(&self) -> usize {
        match self.redundancy {
            Redundancy::Replicas(n) => usize::from(n),
            Redundancy::Erasure { .. } => 1,
        }
    }

    /// Parts with fewer live holders than [`PlacementRecord::holders_wanted`].
    pub fn parts_below_target(&self, alive: impl Fn(&NodeId) -> bool) -> Vec<usize> {
        let wanted = self.holders_wanted();
        (0..self.holders.len())
            .filter(|&i| self.holders_of(i).filter(|n| alive(n)).count() < wanted)
            .collect()
    }

    /// The holders of part `index`.
    pub fn holders_of(&self, index: usize) -> impl Iterator<Item = &NodeId> {
        self.holders
            .get(index)
            .into_iter()
            .flatten()
            .filter_map(|&i| self.nodes.get(usize::from(i)))
    }

    /// Indices of the chunks `node` holds.
    pub fn chunks_held_by(&self, node: &NodeId) -> Vec<usize> {
        let Some(me) = self.nodes.iter().position(|n| n == node) else {
            return Vec::new();
        };
        self.holders
            .iter()
            .enumerate()
            .filter(|(_, h)| h.iter().any(|&i| usize::from(i) == me))
            .map(|(index, _)| index)
            .collect()
    }

    /// Checks internal consistency against the manifest's chunk count.
    pub fn validate(&self, chunk_count: usize) -> Result<(), WireError> {
        if self.nodes.len() > MAX_RECORD_NODES {
            return Err(WireError::TooLarge {
                part: "holder list",
                len: self.nodes.len(),
                max: MAX_RECORD_NODES,
            });
        }
        if !self.tombstone {
            let parts = match self.redundancy {
                Redundancy::Replicas(_) => {
                    if !self.parts.is_empty() {
                        return Err(WireError::Malformed(
                            "a rep:N record lists shard ids".into(),
                        ));
                    }
                    chunk_count
                }
                Redundancy::Erasure { .. } => {
                    let parts = chunk_count.saturating_mul(self.redundancy.width());
                    if self.parts.len() != parts {
                        return Err(WireError::Malformed(format!(
                            "record lists {} shard ids, {chunk_count} chunks of {} need {parts}",
                            self.parts.len(),
                            self.redundancy
                        )));
                    }
                    parts
                }
            };
            if self.holders.len() != parts {
                return Err(WireError::Malformed(format!(
                    "record lists holders for {} parts, the manifest needs {parts}",
                    self.holders.len()
                )));
            }
        }
        for (chunk, holders) in self.holders.iter().enumerate() {
            if holders.len() > usize::from(u8::MAX) {
                return Err(WireError::Malformed(format!(
                    "chunk {chunk} has {} holders",
                    holders.len()
                )));
            }
            for &i in holders {
                if usize::from(i) >= self.nodes.len() {
                    return Err(WireError::Malformed(format!(
                        "chunk {chunk} names holder {i} of {}",
                        self.nodes.len()
                    )));
                }
            }
        }
        Ok(())
    }

    /// The persisted form: version byte, then the bincode header encoding.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![WIRE_VERSION];
        out.extend_from_slice(&encode_header(self));
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        let (&version, rest) = bytes
            .split_first()
            .ok_or(WireError::Truncated("placement record"))?;
        if version != WIRE_VERSION {
            return Err(WireError::UnsupportedVersion { found: version });
        }
        match decode_header(rest) {
            Ok(record) => Ok(record),
            Err(e) => match decode_header::<LegacyRecord>(rest) {
                Ok(old) => Ok(PlacementRecord {
                    object: old.object,
                    version: old.version,
                    writer: old.writer,
                    redundancy: old.redundancy,
                    tombstone: old.tombstone,
                    nodes: old.nodes,
                    holders: old.holders,
                    parts: Vec::new(),
                }),
                Err(_) => Err(e),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn record() -> PlacementRecord {
        PlacementRecord {
            object: ObjectId::of(b"o"),
            version: 3,
            writer: NodeId(vec![1; 38]),
            redundancy: Redundancy::Replicas(3),
            tombstone: false,
            nodes: vec![NodeId(vec![1; 38]), NodeId(vec![2; 38])],
            holders: vec![vec![0, 1], vec![1]],
            parts: Vec::new(),
        }
    }

    #[test]
    fn frames_round_trip_with_their_payload() {
        let request = ChunkRequest::Store {
            id: ChunkId::of(b"x"),
        };
        let frame = encode_frame(&request, b"x");
        let (decoded, payload): (ChunkRequest, &[u8]) =
            decode_frame(&frame, Limits::CHUNK).unwrap();
        assert_eq!(decoded, request);
        assert_eq!(payload, b"x");
        let copy = ChunkRequest::Copy {
            id: ChunkId::of(b"y"),
            from: vec![NodeId(vec![1; 38]), NodeId(vec![2; 38])],
        };
        let frame = encode_frame(&copy, &[]);
        let (decoded, payload): (ChunkRequest, &[u8]) =
            decode_frame(&frame, Limits::CHUNK).unwrap();
        assert_eq!(decoded, copy);
        assert!(payload.is_empty());
    }

    #[test]
    fn frames_refuse_other_versions_oversize_truncation_and_trailing_bytes() {
        let frame = encode_frame(
            &ChunkRequest::Fetch {
                id: ChunkId::of(b"x"),
            },
            &[],
        );
        let mut other = frame.clone();
        other[0] = 9;
        assert_eq!(
            decode_frame::<ChunkRequest>(&other, Limits::CHUNK).unwrap_err(),
            WireError::UnsupportedVersion { found: 9 }
        );
        assert!(matches!(
            decode_frame::<ChunkRequest>(
                &frame,
                Limits {
                    header: 8,
                    payload: 0
                }
            )
            .unwrap_err(),
            WireError::TooLarge { part: "header", .. }
        ));
        for cut in 0..frame.len() {
            assert!(decode_frame::<ChunkRequest>(&frame[..cut], Limits::CHUNK).is_err());
        }
        let mut long = frame.clone();
        long.push(0);
        assert_eq!(
            decode_frame::<ChunkRequest>(&long, Limits::CHUNK).unwrap_err(),
            WireError::TrailingBytes { extra: 1 }
        );
        let mut huge = frame[..frame.len() - 4].to_vec();
        huge.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            decode_frame::<ChunkRequest>(&huge, Limits::CHUNK).unwrap_err(),
            WireError::TooLarge {
                part: "payload",
                ..
            }
        ));
    }

    #[test]
    fn keep_object_is_a_new_tag_after_the_old_ones() {
        let put = encode_frame(&ControlRequest::PutObject { record: record() }, b"m");
        let keep = encode_frame(&ControlRequest::KeepObject { record: record() }, b"m");
        let (decoded, payload): (ControlRequest, &[u8]) =
            decode_frame(&keep, Limits::CONTROL).unwrap();
        assert_eq!(decoded, ControlRequest::KeepObject { record: record() });
        assert_eq!(payload, b"m");
        // The two differ only in their variant tag: PutObject keeps 0, KeepObject is 4, after
        // Job, so nodes that predate it decode everything else as before.
        let differ: Vec<(u8, u8)> = put
            .iter()
            .zip(&keep)
            .filter(|(a, b)| a != b)
            .map(|(a, b)| (*a, *b))
            .collect();
        assert_eq!(differ, vec![(0, 4)]);
        assert_eq!(put.len(), keep.len());
    }

    #[test]
    fn records_round_trip_and_order_by_version_then_writer() {
        let a = record();
        assert_eq!(PlacementRecord::decode(&a.encode()).unwrap(), a);
        a.validate(2).unwrap();
        assert!(a.validate(3).is_err());
        let mut b = a.clone();
        b.version = 4;
        assert!(b.supersedes(&a) && !a.supersedes(&b));
        let mut c = a.clone();
        c.writer = NodeId(vec![9; 38]);
        assert!(c.supersedes(&a) && !a.supersedes(&a));
        assert_eq!(a.chunks_held_by(&NodeId(vec![2; 38])), vec![0, 1]);
        assert_eq!(a.chunks_held_by(&NodeId(vec![1; 38])), vec![0]);
        assert_eq!(
            a.holders_of(1).collect::<Vec<_>>(),
            vec![&NodeId(vec![2; 38])]
        );
        let mut bad = a.clone();
        bad.holders[1] = vec![7];
        assert!(bad.validate(2).is_err());
    }

    #[test]
    fn a_tombstone_supersedes_every_live_record_and_newer_tombstones_supersede_it() {
        let live = record();
        let tombstone = live.tombstone(NodeId(vec![0; 38]));
        assert_eq!(tombstone.version, live.version + 1);
        assert_eq!(tombstone.nodes, live.nodes);
        tombstone.validate_tombstone().unwrap();
        assert!(tombstone.supersedes(&live) && !live.supersedes(&tombstone));
        assert_eq!(
            PlacementRecord::decode(&tombstone.encode()).unwrap(),
            tombstone
        );
        // A repair racing the delete, with a higher version, still loses.
        let repaired = PlacementRecord {
            version: live.version + 5,
            writer: NodeId(vec![9; 38]),
            ..live.clone()
        };
        assert!(tombstone.supersedes(&repaired) && !repaired.supersedes(&tombstone));
        let again = repaired.tombstone(NodeId(vec![0; 38]));
        assert!(again.supersedes(&tombstone) && !tombstone.supersedes(&again));
        assert!(!tombstone.supersedes(&tombstone));
        assert!(live.validate_tombstone().is_err());
        let with_parts = PlacementRecord {
            holders: vec![vec![0]],
            ..tombstone.clone()
        };
        assert!(with_parts.validate_tombstone().is_err());
        let crowded = PlacementRecord {
            nodes: vec![NodeId(vec![1]); MAX_RECORD_NODES + 1],
            ..tombstone
        };
        assert!(crowded.validate_tombstone().is_err());
    }

    #[test]
    fn erasure_records_list_every_shard_and_legacy_records_still_decode() {
        let ec = PlacementRecord {
            redundancy: Redundancy::Erasure { data: 2, parity: 1 },
            holders: vec![vec![0], vec![1], vec![0], vec![1], vec![0], vec![1]],
            parts: (0..6u8).map(|i| ChunkId::of(&[i])).collect(),
            ..record()
        };
        ec.validate(2).unwrap();
        assert_eq!(PlacementRecord::decode(&ec.encode()).unwrap(), ec);
        assert_eq!(ec.part_count(), 6);
        assert_eq!(ec.part_id(&[], 4), Some(ChunkId::of(&[4])));
        let mut short = ec.clone();
        short.parts.pop();
        assert!(short.validate(2).is_err());
        let mut rep_with_parts = record();
        rep_with_parts.parts = vec![ChunkId::of(b"x")];
        assert!(rep_with_parts.validate(2).is_err());

        // A record persisted by a build without `parts`.
        #[derive(Serialize)]
        struct Old {
            object: ObjectId,
            version: u64,
            writer: NodeId,
            redundancy: Redundancy,
            tombstone: bool,
            nodes: Vec<NodeId>,
            holders: Vec<Vec<u16>>,
        }
        let r = record();
        let mut bytes = vec![WIRE_VERSION];
        bytes.extend_from_slice(&encode_header(&Old {
            object: r.object,
            version: r.version,
            writer: r.writer.clone(),
            redundancy: r.redundancy,
            tombstone: r.tombstone,
            nodes: r.nodes.clone(),
            holders: r.holders.clone(),
        }));
        assert_eq!(PlacementRecord::decode(&bytes).unwrap(), r);
        assert!(PlacementRecord::decode(&bytes[..bytes.len() - 1]).is_err());
    }

    #[test]
    fn proofs_bind_key_nonce_and_both_peers() {
        let (p, v) = (NodeId(vec![1]), NodeId(vec![2]));
        let proof = membership_proof(&[7; 32], &[1; 32], &p, &v);
        assert_eq!(proof, membership_proof(&[7; 32], &[1; 32], &p, &v));
        assert_ne!(proof, membership_proof(&[8; 32], &[1; 32], &p, &v));
        assert_ne!(proof, membership_proof(&[7; 32], &[2; 32], &p, &v));
        assert_ne!(proof, membership_proof(&[7; 32], &[1; 32], &v, &p));
    }

    #[test]
    fn load_reports_round_trip_and_refuse_junk() {
        let report = LoadReport {
            zone: "aws/us-east-1/a".into(),
            cpu: 0.5,
            disk_free: 1 << 40,
            ..LoadReport::default()
        };
        assert_eq!(LoadReport::decode(&report.encode()).unwrap(), report);
        assert!(LoadReport::decode(&[]).is_err());
        assert!(LoadReport::decode(&[2, 0]).is_err());
        let mut nan = report.clone();
        nan.cpu = f32::NAN;
        assert!(LoadReport::decode(&nan.encode()).is_err());
    }

    proptest! {
        // No input makes a decoder panic or allocate past its limits.
        #[test]
        fn decoders_survive_random_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_frame::<ChunkRequest>(&bytes, Limits::CHUNK);
            let _ = decode_frame::<ChunkResponse>(&bytes, Limits::CHUNK);
            let _ = decode_frame::<ControlRequest>(&bytes, Limits::CONTROL);
            let _ = decode_frame::<ControlResponse>(&bytes, Limits::CONTROL);
            let _ = decode_frame::<AuthRequest>(&bytes, Limits::AUTH);
            let _ = decode_frame::<AuthResponse>(&bytes, Limits::AUTH);
            let _ = LoadReport::decode(&bytes);
            let _ = PlacementRecord::decode(&bytes);
        }

        // Valid frames with a byte flipped are refused or decode to something, never panic.
        #[test]
        fn decoders_survive_mutated_frames(pos in 0usize..200, byte in any::<u8>()) {
            let mut frame = encode_frame(&ControlRequest::PutObject { record: record() }, b"manifest");
            let i = pos % frame.len();
            frame[i] = byte;
            let _ = decode_frame::<ControlRequest>(&frame, Limits::CONTROL);
        }
    }
}
