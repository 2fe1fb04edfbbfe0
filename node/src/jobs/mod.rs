//! Jobs: distributed processing of stored objects, close to the data.
//!
//! - [`coordinator`]: the node a job is submitted to keeps its state in the store, grants
//!   tasks (best locality first) as leases, retries failed attempts with backoff, keeps dead
//!   letters, and composes the tasks' outputs into the job's output object.
//! - [`worker`]: every node learns of jobs over gossip and, with a free task slot and its
//!   load under the ceiling, claims tasks, runs them and reports their outputs.
//! - [`processors`]: turns one input chunk into records and runs a job's record pipeline over
//!   them (the map side, optionally shuffling into reduce partitions by key) and the reduce
//!   side of a shuffle; [`exec`] runs a command that the node's own config registers
//!   (`exec:NAME`), with the task's input on stdin and its output from stdout. Both are pure of
//!   the mesh: they take bytes and return bytes, per-stage statistics and rejected records.
//! - [`shuffle`]: the LZ4 packing, in blocks of lines, of a shuffle output's chunks (sorted
//!   by key, so a reduce task merges them a block at a time), which have one copy, on the
//!   node that ran the map task, and are lost and made again if that node dies.
//! - [`service`]: starts all of this with the node.
//!
//! Data flow: `meshctl job submit` → coordinator (spec checked, one map task per input
//! chunk, reduce tasks per partition) → gossip announcement → workers claim → read the chunk
//! (usually local) → processors → output stored through the normal write path → `Finish`
//! with the output's manifest and record → when all are done, the output object is composed
//! from the task outputs' chunks in input order.

pub mod coordinator;
pub mod exec;
pub mod processors;
pub mod service;
pub mod shuffle;
pub mod worker;
