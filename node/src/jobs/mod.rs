//! Jobs: distributed processing of stored objects.
//!
//! This module owns what a node does with a job's work: [`processors`] turns one input chunk
//! into records and runs a job's record pipeline over them (the map side, optionally
//! shuffling into reduce partitions by key) and the reduce side of a shuffle; [`exec`] runs a
//! command that the node's own config registers (`exec:NAME`), with the task's input on stdin
//! and its output from stdout. Both are pure of the mesh: they take bytes and return bytes,
//! per-stage statistics and rejected records.

pub mod exec;
pub mod processors;
