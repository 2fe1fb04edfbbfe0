//! Record pipelines over line-delimited JSON and CSV: the built-in processors of a job.
//!
//! A job names its stages ([`StageSpec`]); [`Pipeline::parse`] checks them once (every
//! parameter error is found there, naming the stage, processor and parameter) and compiles
//! what can be compiled (a `validate` schema, a `filter` condition). Then, per task:
//!
//! - **map side** ([`Pipeline::run_map`]), one input chunk: parse the chunk into records (a
//!   chunk holds whole records), run the record stages in order — `validate`, `map`, `filter`,
//!   in any order and number — and encode the records that are left. A pipeline that ends in
//!   `dedup` shuffles: instead of one output it writes one buffer per reduce partition, each
//!   record going to the partition of its key's hash as a shuffle line that carries the key
//!   and the timestamp beside the record (`KEY\tTS\tRECORD`). Each partition's lines are
//!   sorted by key.
//! - **reduce side** ([`Pipeline::reducer`], or [`Pipeline::run_reduce`] in memory), one
//!   partition: `dedup` as a merge of the map outputs for that partition, keeping one record
//!   per key. It reads each input a block at a time, splits the shuffle lines and parses
//!   nothing else, except the timestamps of two records with one key.
//!
//! The map side takes a chunk's records a batch at a time ([`MAP_BATCH`]): each stage handles
//! the whole batch before the next starts, so a stage is timed with two clock reads per batch,
//! not per record, and a [`StageStat`] per stage (plus `parse` and `encode`) tells a job report
//! where the time went. A batch's parsed values are dropped before the next batch is parsed,
//! so a task holds one batch of them, not the chunk's.
//!
//! Records that cannot go on are rejects, not task failures: a line that is not a JSON
//! object, a CSV row with the wrong number of fields, a record the schema refuses, a value
//! `map` cannot cast. Each becomes one JSONL line in [`MapOutput::rejects`],
//! `{"line":N,"reason":"...","record":{...}}` (the record as it was read from the input) or,
//! for input that did not parse, `{"line":N,"reason":"...","raw":"<the line>"}`. `line` is the
//! 1-based line of the chunk on which the record starts (for CSV in the first chunk, the
//! header is line 1).
//!
//! Output is always JSONL: one JSON object per line, `\n`-terminated.
//!
//! - A JSONL record that no stage changed (the pipeline has no `map` stage) is written **as it
//!   was read**, without the whitespace around it. Validating, filtering or deduplicating
//!   records does not rewrite them: a number keeps its exact text (serde_json would turn an
//!   integer beyond 64 bits, or a decimal beyond an `f64`'s precision, into a rounded float),
//!   and no time goes into encoding what was already JSON.
//! - Records a `map` stage reshaped, and CSV rows, are written as compact JSON. CSV rows become
//!   objects of strings keyed by the header's column names (an empty field is `""`). Object
//!   keys come out sorted byte-wise: serde_json keeps objects in a `BTreeMap` unless its
//!   `preserve_order` feature is on, which nothing in this workspace enables (a test checks).
//!
//! Everything here is deterministic: the same input gives byte-identical output.
//!
//! An `exec:NAME` pipeline has no records: the task's bytes go to the registered command
//! ([`super::exec::run`]).

mod dedup;
mod filter;
mod input;
mod map;
mod validate;
mod value;

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;
use std::str::FromStr;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use self::dedup::{Dedup, Keys, Merge, MergeError};
pub use self::dedup::{Run, Whole};
use self::filter::Filter;
use self::input::{Record, RecordReader, Rejects, Source, input_bytes};
use self::map::MapFields;
use self::validate::Validate;

const UTF8_BOM: &[u8] = b"\xEF\xBB\xBF";
/// Records a map task parses and takes through its stages at a time (about 200 KiB of
/// 200-byte records).
const MAP_BATCH: usize = 1024;

/// How an input object's records are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// One JSON object per line.
    Jsonl,
    /// RFC 4180 CSV with a header line.
    Csv,
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Format::Jsonl => "jsonl",
            Format::Csv => "csv",
        })
    }
}

impl FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "jsonl" => Ok(Format::Jsonl),
            "csv" => Ok(Format::Csv),
            other => Err(format!(
                "unknown record format {other:?}: expected jsonl or csv"
            )),
        }
    }
}

/// One stage as a job spec names it: a processor name and string parameters.
#[derive(Debug, Clone, Copy)]
pub struct StageSpec<'a> {
    /// `validate`, `map`, `filter`, `dedup` or `exec:NAME`.
    pub processor: &'a str,
    pub params: &'a BTreeMap<String, String>,
}

/// A job's spec that cannot run, naming the stage (1-based), its processor and the parameter
/// at fault.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error(
        "stage {stage}: unknown processor {processor:?}; expected validate, map, filter, dedup or exec:NAME"
    )]
    UnknownProcessor { stage: usize, processor: String },
    #[error("stage {stage} ({processor}): missing parameter {param:?}")]
    MissingParam {
        stage: usize,
        processor: String,
        param: &'static str,
    },
    #[error("stage {stage} ({processor}): unknown parameter {param:?}; {expected}")]
    UnknownParam {
        stage: usize,
        processor: String,
        param: String,
        expected: String,
    },
    #[error("stage {stage} ({processor}): parameter {param:?} {message}")]
    InvalidParam {
        stage: usize,
        processor: String,
        param: &'static str,
        message: String,
    },
    #[error("stage {stage} ({processor}): {message}")]
    Misplaced {
        stage: usize,
        processor: String,
        message: String,
    },
}

/// Why a task failed as a whole (bad records are rejects instead).
#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    #[error("the pipeline runs the command exec:{0}, not records: run it with jobs::exec::run")]
    Exec(String),
    #[error("the pipeline ends in dedup and shuffles: it needs at least 1 reduce partition")]
    NoPartitions,
    #[error("the pipeline does not end in dedup, so it has no reduce side")]
    NoReduce,
    #[error("invalid CSV header: {0}")]
    CsvHeader(String),
    #[error("cannot read the CSV input: {0}")]
    Csv(String),
    #[error("reduce input {input}, line {line}: {message}")]
    ReduceInput {
        /// Index in the inputs given to [`Pipeline::reducer`].
        input: usize,
        line: u64,
        message: String,
    },
    #[error("reduce input {input}: {message}")]
    ReduceRead { input: usize, message: String },
}

/// One input chunk of a map task.
#[derive(Debug, Clone, Copy)]
pub struct ChunkInput<'a> {
    /// Whole records.
    pub data: &'a [u8],
    pub format: Format,
    /// For CSV: the object's raw header line (it is in the first chunk only). When it is none,
    /// the first chunk's first row is read as the header; later chunks need it.
    pub csv_header: Option<&'a [u8]>,
    /// The object's first chunk, whose first CSV row is the header and is skipped.
    pub first_chunk: bool,
}

/// What a map task produced.
#[derive(Debug, Default)]
pub struct MapOutput {
    /// JSONL records, when the pipeline does not shuffle.
    pub output: Vec<u8>,
    /// JSONL reject lines, in line order.
    pub rejects: Vec<u8>,
    /// When the pipeline shuffles: one JSONL buffer per reduce partition.
    pub partitions: Vec<Vec<u8>>,
    /// `parse`, each stage in order, then `encode`.
    pub stats: Vec<StageStat>,
}

/// What a reduce task produced.
#[derive(Debug, Default)]
pub struct ReduceOutput {
    /// JSONL records, sorted by key.
    pub output: Vec<u8>,
    /// `dedup`: lines in, records kept out.
    pub stats: Vec<StageStat>,
}

/// Time and volume of one stage over one task.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageStat {
    /// `parse`, `encode`, or the stage's name from [`Pipeline::stage_names`].
    pub stage: String,
    pub nanos: u64,
    pub records_in: u64,
    pub records_out: u64,
    /// Input bytes of the records that entered the stage (for `parse`, of the whole input).
    pub bytes_in: u64,
}

/// A parsed, validated pipeline: zero or more record stages (validate, map, filter) in order,
/// optionally ending with dedup (which makes the job shuffle into reduce partitions); or a
/// single exec stage (`exec:NAME`), which cannot be combined with others.
///
/// It is `Send + Sync`: one pipeline can serve every task slot of a node.
#[derive(Debug)]
pub struct Pipeline {
    body: Body,
}

#[derive(Debug)]
enum Body {
    Records {
        stages: Vec<Named>,
        dedup: Option<Dedup>,
    },
    Exec(String),
}

#[derive(Debug)]
struct Named {
    name: String,
    stage: Stage,
}

#[derive(Debug)]
enum Stage {
    Validate(Validate),
    Map(MapFields),
    Filter(Filter),
}

/// The parameters of one stage, for checks whose errors name the stage.
struct Params<'a> {
    stage: usize,
    spec: &'a StageSpec<'a>,
}

impl<'a> Params<'a> {
    fn allow(&self, allowed: &[&str]) -> Result<(), SpecError> {
        match self
            .spec
            .params
            .keys()
            .find(|k| !allowed.contains(&k.as_str()))
        {
            None => Ok(()),
            Some(param) => Err(SpecError::UnknownParam {
                stage: self.stage,
                processor: self.spec.processor.to_owned(),
                param: param.clone(),
                expected: match allowed {
                    [] => "it takes none".to_owned(),
                    _ => format!("expected {}", allowed.join(", ")),
                },
            }),
        }
    }

    fn required(&self, param: &'static str) -> Result<&'a str, SpecError> {
        self.spec
            .params
            .get(param)
            .map(String::as_str)
            .ok_or_else(|| SpecError::MissingParam {
                stage: self.stage,
                processor: self.spec.processor.to_owned(),
                param,
            })
    }

    fn optional(&self, param: &str) -> Option<&'a str> {
        self.spec.params.get(param).map(String::as_str)
    }

    fn invalid(&self, param: &'static str) -> impl FnOnce(String) -> SpecError + '_ {
        move |message| SpecError::InvalidParam {
            stage: self.stage,
            processor: self.spec.processor.to_owned(),
            param,
            message,
        }
    }

    fn misplaced(&self, message: &str) -> SpecError {
        SpecError::Misplaced {
            stage: self.stage,
            processor: self.spec.processor.to_owned(),
            message: message.to_owned(),
        }
    }
}

impl Pipeline {
    /// Checks and compiles the stages of a job.
    pub fn parse(stages: &[StageSpec<'_>]) -> Result<Pipeline, SpecError> {
        let mut record_stages = Vec::new();
        let mut dedup = None;
        let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
        for (i, spec) in stages.iter().enumerate() {
            let params = Params { stage: i + 1, spec };
            if let Some(name) = spec.processor.strip_prefix("exec:") {
                if !super::exec::is_valid_name(name) {
                    return Err(params.misplaced(&format!(
                        "{name:?} is not a processor name: use 1 to {} of A-Z, a-z, 0-9, _ and -",
                        super::exec::MAX_NAME_LEN
                    )));
                }
                if stages.len() > 1 {
                    return Err(params
                        .misplaced("an exec stage runs alone: it cannot be combined with others"));
                }
                params.allow(&[])?;
                return Ok(Pipeline {
                    body: Body::Exec(name.to_owned()),
                });
            }
            if dedup.is_some() {
                return Err(SpecError::Misplaced {
                    stage: i,
                    processor: "dedup".into(),
                    message: "dedup must be the last stage".into(),
                });
            }
            let stage = match spec.processor {
                "validate" => {
                    params.allow(&["schema"])?;
                    let schema = params.required("schema")?;
                    Stage::Validate(Validate::new(schema).map_err(params.invalid("schema"))?)
                }
                "map" => {
                    params.allow(&["spec"])?;
                    let text = params.required("spec")?;
                    Stage::Map(MapFields::new(text).map_err(params.invalid("spec"))?)
                }
                "filter" => {
                    params.allow(&["where"])?;
                    let text = params.required("where")?;
                    Stage::Filter(Filter::new(text).map_err(params.invalid("where"))?)
                }
                "dedup" => {
                    params.allow(&["key", "ts"])?;
                    let key = params.required("key")?;
                    dedup = Some(
                        Dedup::new(key, params.optional("ts"))
                            .map_err(|(param, message)| params.invalid(param)(message))?,
                    );
                    continue;
                }
                other => {
                    return Err(SpecError::UnknownProcessor {
                        stage: i + 1,
                        processor: other.to_owned(),
                    });
                }
            };
            let count = seen.entry(spec.processor).or_default();
            *count += 1;
            let name = match *count {
                1 => spec.processor.to_owned(),
                n => format!("{}#{n}", spec.processor),
            };
            record_stages.push(Named { name, stage });
        }
        Ok(Pipeline {
            body: Body::Records {
                stages: record_stages,
                dedup,
            },
        })
    }

    /// Whether the pipeline ends with dedup, so its map tasks feed reduce partitions.
    pub fn shuffles(&self) -> bool {
        matches!(self.body, Body::Records { dedup: Some(_), .. })
    }

    /// `Some(NAME)` for an `exec:NAME` pipeline.
    pub fn exec_name(&self) -> Option<&str> {
        match &self.body {
            Body::Exec(name) => Some(name),
            Body::Records { .. } => None,
        }
    }

    /// The stages' names for reports, in order: the processor's name, with `#2`, `#3`, ...
    /// for its later occurrences (`filter`, `map`, `filter#2`, `dedup`, or `exec:NAME`).
    pub fn stage_names(&self) -> Vec<String> {
        match &self.body {
            Body::Exec(name) => vec![format!("exec:{name}")],
            Body::Records { stages, dedup } => stages
                .iter()
                .map(|s| s.name.clone())
                .chain(dedup.as_ref().map(|_| "dedup".to_owned()))
                .collect(),
        }
    }

    /// Runs the map side over one input chunk. When the pipeline shuffles, the records go to
    /// `partitions` buffers by their key's hash (`partitions` must then be at least 1);
    /// otherwise it is ignored.
    pub fn run_map(&self, input: &ChunkInput<'_>, partitions: u32) -> Result<MapOutput, TaskError> {
        self.run_map_batched(input, partitions, MAP_BATCH)
    }

    /// [`Pipeline::run_map`], `batch` records at a time (at least one).
    fn run_map_batched(
        &self,
        input: &ChunkInput<'_>,
        partitions: u32,
        batch: usize,
    ) -> Result<MapOutput, TaskError> {
        let batch = batch.max(1);
        let (stages, dedup) = match &self.body {
            Body::Records { stages, dedup } => (stages, dedup),
            Body::Exec(name) => return Err(TaskError::Exec(name.clone())),
        };
        if dedup.is_some() && partitions == 0 {
            return Err(TaskError::NoPartitions);
        }
        let mut rejects = Rejects::default();
        // A byte order mark may open an object; it is not part of the first record.
        let data = match input.data.strip_prefix(UTF8_BOM) {
            Some(rest) if input.first_chunk => rest,
            _ => input.data,
        };
        let mut reader =
            RecordReader::new(input.format, data, input.csv_header, input.first_chunk)?;
        // A JSONL record no stage changed is written as it was read (see the module doc).
        let verbatim = input.format == Format::Jsonl
            && !stages.iter().any(|s| matches!(s.stage, Stage::Map(_)));
        // Where such a record's line is in the chunk, without the whitespace around it.
        let as_read = |record: &Record| verbatim.then(|| trimmed(data, &record.span));

        let named = |stage: &str| StageStat {
            stage: stage.into(),
            ..Default::default()
        };
        let mut parse = StageStat {
            bytes_in: input.data.len() as u64,
            ..named("parse")
        };
        let mut stage_stats: Vec<StageStat> = stages.iter().map(|s| named(&s.name)).collect();
        let mut encode = named("encode");
        let mut keyed = named("dedup");
        let mut out = MapOutput::default();
        let mut lines = Keys::default();
        if dedup.is_none() {
            out.output.reserve(input.data.len());
        }
        let mut records: Vec<Record> = Vec::with_capacity(batch.min(MAP_BATCH));
        // A batch at a time: parse, every stage, then encode (or key) the records left and
        // drop their parsed values. Each stage is timed with two clock reads per batch.
        loop {
            let started = Instant::now();
            parse.records_in += reader.fill(&mut records, &mut rejects, batch)?;
            parse.records_out += records.len() as u64;
            parse.nanos += nanos_since(started);
            let source = Source {
                data,
                format: input.format,
                header: reader.header(),
            };
            for (named, stat) in stages.iter().zip(&mut stage_stats) {
                stat.records_in += records.len() as u64;
                stat.bytes_in += input_bytes(&records);
                let started = Instant::now();
                match &named.stage {
                    Stage::Validate(v) => v.run(&mut records, &source, &mut rejects),
                    Stage::Map(m) => m.run(&mut records, &source, &mut rejects),
                    Stage::Filter(f) => f.run(&mut records),
                }
                stat.nanos += nanos_since(started);
                stat.records_out += records.len() as u64;
            }
            let count = records.len() as u64;
            let bytes = input_bytes(&records);
            let started = Instant::now();
            let stat = match dedup {
                None => {
                    for record in &records {
                        match as_read(record).and_then(|r| data.get(r)) {
                            Some(line) => out.output.extend_from_slice(line),
                            None => value::write_json(&mut out.output, &record.value),
                        }
                        out.output.push(b'\n');
                    }
                    &mut encode
                }
                Some(dedup) => {
                    for record in &records {
                        // A tab between a line's tokens would break the shuffle line's
                        // framing: such a line is written as compact JSON instead.
                        let read = as_read(record).filter(|r| {
                            data.get(r.clone())
                                .is_some_and(|l| memchr::memchr(b'\t', l).is_none())
                        });
                        dedup.add(&mut lines, &record.value, read, partitions);
                    }
                    &mut keyed
                }
            };
            records.clear();
            stat.nanos += nanos_since(started);
            stat.records_in += count;
            stat.records_out += count;
            stat.bytes_in += bytes;
            if reader.is_done() {
                break;
            }
        }

        let mut stats = Vec::with_capacity(stages.len() + 3);
        stats.push(parse);
        stats.extend(stage_stats);
        if dedup.is_some() {
            let started = Instant::now();
            // A shuffle line is the record plus its key and timestamp.
            let share =
                (data.len() + lines.bytes.len() + 16 * lines.ends.len()) / partitions as usize;
            out.partitions = (0..partitions).map(|_| Vec::with_capacity(share)).collect();
            // Each partition's lines go out sorted by key (then in input order), so the
            // reduce side can merge its inputs a block at a time.
            for i in lines.order() {
                let partition = lines.partitions.get(i).copied().unwrap_or(0);
                if let Some(buffer) = out.partitions.get_mut(partition as usize) {
                    lines.write_line(i, data, buffer);
                    buffer.push(b'\n');
                }
            }
            encode.nanos += nanos_since(started);
            encode.records_in = keyed.records_out;
            encode.records_out = keyed.records_out;
            encode.bytes_in = keyed.bytes_in;
            stats.push(keyed);
        }
        stats.push(encode);
        out.rejects = rejects.into_bytes();
        out.stats = stats;
        Ok(out)
    }

    /// Runs the reduce side (dedup) over one partition's map outputs, in memory, each sorted
    /// by key as [`Pipeline::run_map`] writes them (the result does not depend on their
    /// order). See [`Pipeline::reducer`], which reads its inputs a block at a time.
    pub fn run_reduce(&self, inputs: &[&[u8]]) -> Result<ReduceOutput, TaskError> {
        let started = Instant::now();
        let mut reducer = self.reducer(inputs.iter().map(|i| Whole::new(i)).collect())?;
        let mut output = Vec::new();
        while reducer.fill(&mut output, usize::MAX)? {}
        let stats = vec![reducer.stat(nanos_since(started))];
        Ok(ReduceOutput { output, stats })
    }

    /// The reduce side (dedup) of one partition as a merge of its map outputs, each sorted by
    /// key: [`Reducer::fill`] hands out the kept records, one per key, in key order, so that a
    /// caller can stream them to storage. It holds one block of each input at a time, not the
    /// partition. The map side wrote shuffle lines (key, timestamp, record: see
    /// [`dedup::Framed`]), so no record is parsed here, only the timestamps of two records with
    /// one key.
    pub fn reducer<R: Run>(&self, inputs: Vec<R>) -> Result<Reducer<R>, TaskError> {
        match &self.body {
            Body::Records { dedup: Some(_), .. } => {}
            Body::Records { dedup: None, .. } => return Err(TaskError::NoReduce),
            Body::Exec(name) => return Err(TaskError::Exec(name.clone())),
        }
        Ok(Reducer {
            merge: Merge::new(inputs).map_err(merge_error)?,
        })
    }
}

/// A reduce task's merge ([`Pipeline::reducer`]).
#[derive(Debug)]
pub struct Reducer<R> {
    merge: Merge<R>,
}

impl<R: Run> Reducer<R> {
    /// Appends kept records, each followed by `\n`, to `out` until it holds `target` bytes or
    /// more; false when every input is used up. An input that cannot be read is
    /// [`TaskError::ReduceRead`]; a bad line in one, [`TaskError::ReduceInput`].
    pub fn fill(&mut self, out: &mut Vec<u8>, target: usize) -> Result<bool, TaskError> {
        self.merge.fill(out, target).map_err(merge_error)
    }

    /// The inputs.
    pub fn inputs(&self) -> &[R] {
        self.merge.runs()
    }

    /// Bytes of the records kept so far, without their newlines.
    pub fn bytes(&self) -> u64 {
        self.merge.bytes
    }

    /// The `dedup` stage so far, taking `nanos`: lines read in, records kept out.
    pub fn stat(&self, nanos: u64) -> StageStat {
        StageStat {
            stage: "dedup".into(),
            nanos,
            records_in: self.merge.lines,
            records_out: self.merge.kept,
            bytes_in: self.merge.bytes,
        }
    }
}

fn merge_error<E: fmt::Display>(e: MergeError<E>) -> TaskError {
    match e {
        MergeError::Read { input, error } => TaskError::ReduceRead {
            input,
            message: error.to_string(),
        },
        MergeError::Line {
            input,
            line,
            message,
        } => TaskError::ReduceInput {
            input,
            line,
            message,
        },
    }
}

/// `span` of `data` without the ASCII whitespace around it.
fn trimmed(data: &[u8], span: &Range<usize>) -> Range<usize> {
    let bytes = data.get(span.clone()).unwrap_or_default();
    let start = span.start + (bytes.len() - bytes.trim_ascii_start().len());
    let end = span.start + bytes.trim_ascii_end().len();
    start..end.max(start)
}

fn nanos_since(started: Instant) -> u64 {
    u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests;
