//! The command line (a fixed contract: command and flag names must not change). Policies and
//! ids are parsed here with proto's parsers, so a typo fails before any byte is sent, with
//! proto's own explanation.

use std::path::PathBuf;

use clap::builder::{PossibleValuesParser, TypedValueParser};
use clap::{Arg, ArgAction, ArgMatches, Args, FromArgMatches, Parser, Subcommand};
use mesh_proto::job::OnFailure;
use mesh_proto::{ChunkerSpec, JobId, ObjectId, RecordFormat, Redundancy};

const EXIT_CODES: &str = "\
Exit codes:
  0  success
  1  error (including a put that did not reach its write quorum); also a job
     that `job wait` or `job submit --wait` saw end failed or cancelled
  2  usage error (bad arguments, or an invalid job spec)
  3  object not found, or job not found
  4  cannot reach meshd
  5  the API token was refused";

/// meshctl: operate a mesh storage node through its control API.
#[derive(Debug, Parser)]
#[command(name = "meshctl", version, after_help = EXIT_CODES)]
pub struct Cli {
    /// Base URL of meshd's control API.
    #[arg(
        long,
        global = true,
        env = "MESH_API",
        default_value = "http://127.0.0.1:5080",
        value_name = "URL"
    )]
    pub api: String,

    /// The node's data directory; its api.token is used when no token is given.
    #[arg(long, global = true, default_value = "./mesh-data", value_name = "DIR")]
    pub data_dir: PathBuf,

    /// Bearer token of the control API (default: read from <DIR>/api.token).
    #[arg(
        long,
        global = true,
        env = "MESH_API_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    pub token: Option<String>,

    /// Print machine-readable JSON instead of text.
    #[arg(long, global = true)]
    pub json: bool,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Store a file (or stdin) in the mesh and print its object id.
    Put(PutArgs),
    /// Fetch an object, verifying every chunk against its manifest before writing it.
    Get(GetArgs),
    /// List stored objects.
    Ls,
    /// Show an object's chunks and where they are held.
    Stat {
        /// Object id (64 hex characters).
        id: ObjectId,
    },
    /// Delete an object.
    Rm {
        /// Object id (64 hex characters).
        id: ObjectId,
    },
    /// Show the node's status: identity, addresses, storage and mesh peers.
    Status,
    /// List the mesh peers this node knows, nearest (lowest RTT) first.
    Peers,
    /// Show the repair state: objects below target, the backlog this node repairs, progress.
    Repair,
    /// Show the scrubber's progress (it re-hashes stored chunks and replaces corrupt ones).
    Scrub {
        /// Start a pass now (unless one is running) and return.
        #[arg(long)]
        now: bool,
    },
    /// Run processing jobs over stored objects: submit, follow, inspect, cancel, forget.
    Job {
        #[command(subcommand)]
        command: JobCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum JobCommand {
    /// Submit a job and print its id; with --wait, wait for it and print its output object id.
    #[command(after_help = SUBMIT_HELP)]
    Submit(SubmitArgs),
    /// Show a job's report: state, tasks, where they ran, time per stage and the bottleneck.
    Status {
        /// Job id (64 hex characters, or a unique prefix of at least 4).
        id: JobRef,
    },
    /// List the jobs this node coordinates.
    Ls,
    /// Cancel a running job.
    Cancel {
        /// Job id (64 hex characters, or a unique prefix of at least 4).
        id: JobRef,
    },
    /// Wait for a job to end and print its output object id (exit 1 if it failed or was
    /// cancelled).
    Wait {
        /// Job id (64 hex characters, or a unique prefix of at least 4).
        id: JobRef,
    },
    /// Forget an ended job: its report goes, its output object stays.
    Rm {
        /// Job id (64 hex characters, or a unique prefix of at least 4).
        id: JobRef,
    },
}

const SUBMIT_HELP: &str = "\
Each --param belongs to the --processor before it; several --processor make a job of
several stages, applied in order. --param KEY=@FILE reads the value from FILE (a JSON
Schema, a mapping spec); KEY=@@TEXT passes @TEXT literally.

A --spec file (.json or .toml) holds a job as the API takes it (processor and params, or
stages; inputs; output; max_attempts; lease; partitions; on_failure). Flags override it:
--input adds inputs, --processor replaces its processor and params, --param without a
--processor adds to its params. A spec with `stages` takes no --processor or --param.

Examples:
  meshctl job submit --processor validate --param schema=@schema.json --input ID
  meshctl job submit --processor validate --param schema=@s.json \\
      --processor dedup --param key=id --param latest=ts --input ID1 --input ID2 --wait
  meshctl job submit --spec job.toml --input ID --on-failure partial";

/// A job named by its full id, or by a prefix that `meshctl job ls` resolves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobRef {
    Id(JobId),
    /// Lowercase hex, 4 to 63 characters.
    Prefix(String),
}

/// Shortest id prefix accepted, so that a stray short word does not match by chance.
pub const MIN_JOB_PREFIX: usize = 4;

impl std::str::FromStr for JobRef {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.len() == 64 {
            return s.parse().map(Self::Id).map_err(|e| e.to_string());
        }
        if let Some((position, found)) = s.chars().enumerate().find(|(_, c)| !c.is_ascii_hexdigit())
        {
            return Err(format!(
                "a job id is hex, found {found:?} at position {position}"
            ));
        }
        if s.len() < MIN_JOB_PREFIX || s.len() > 64 {
            return Err(format!(
                "a job id is 64 hex characters (or a unique prefix of at least \
                 {MIN_JOB_PREFIX}), got {} characters",
                s.len()
            ));
        }
        Ok(Self::Prefix(s.to_ascii_lowercase()))
    }
}

#[derive(Debug, Args)]
pub struct SubmitArgs {
    #[command(flatten)]
    pub stages: StageFlags,

    /// An input object; repeat for several (processed in the order given).
    #[arg(long = "input", value_name = "ID")]
    pub inputs: Vec<ObjectId>,

    /// A job spec file (.json or .toml) that the other flags amend.
    #[arg(long, value_name = "FILE")]
    pub spec: Option<PathBuf>,

    /// Redundancy of the output object: rep:N or ec:K+M (default: the node's).
    #[arg(long, value_name = "POLICY")]
    pub output: Option<Redundancy>,

    /// Attempts per task before it goes to the dead-letter list (default 3).
    #[arg(long, value_name = "N")]
    pub max_attempts: Option<u32>,

    /// How long a worker holds a task without renewing, e.g. 30s (default 30s).
    #[arg(long, value_name = "DURATION", value_parser = parse_lease)]
    pub lease: Option<String>,

    /// Reduce partitions, for processors that shuffle by key (default 8).
    #[arg(long, value_name = "N")]
    pub partitions: Option<u32>,

    /// When a task uses up its attempts: fail the job, or finish it as partial with the
    /// output of the tasks that succeeded.
    #[arg(
        long,
        value_name = "POLICY",
        value_parser = PossibleValuesParser::new(["fail", "partial"]).map(|s| {
            if s == "partial" { OnFailure::Partial } else { OnFailure::Fail }
        })
    )]
    pub on_failure: Option<OnFailure>,

    /// Wait for the job to end and print its output object id instead of the job id.
    #[arg(long)]
    pub wait: bool,
}

fn parse_lease(text: &str) -> Result<String, String> {
    humantime::parse_duration(text)
        .map(|_| text.to_owned())
        .map_err(|e| format!("{e} (expected a duration such as 30s or 2m)"))
}

/// `--processor` and `--param` in command-line order, which derive cannot keep: each
/// `--param` belongs to the `--processor` before it. The values are kept as typed; the job
/// command reads `@FILE` values and splits `KEY=VALUE`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StageFlags {
    /// Each `--processor` with the `--param`s that follow it.
    pub stages: Vec<StageFlag>,
    /// `--param`s before any `--processor` (they amend a spec file's processor).
    pub leading_params: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageFlag {
    pub processor: String,
    pub params: Vec<String>,
}

const PROCESSOR: &str = "processor";
const PARAM: &str = "param";

impl StageFlags {
    fn from_matches(matches: &ArgMatches) -> Self {
        let mut flags: Vec<(usize, bool, String)> = Vec::new();
        for (id, is_processor) in [(PROCESSOR, true), (PARAM, false)] {
            let values = matches.get_many::<String>(id).into_iter().flatten();
            let indices = matches.indices_of(id).into_iter().flatten();
            flags.extend(
                indices
                    .zip(values)
                    .map(|(index, value)| (index, is_processor, value.clone())),
            );
        }
        flags.sort_by_key(|(index, _, _)| *index);
        let mut out = Self::default();
        for (_, is_processor, value) in flags {
            if is_processor {
                out.stages.push(StageFlag {
                    processor: value,
                    params: Vec::new(),
                });
            } else {
                match out.stages.last_mut() {
                    Some(stage) => stage.params.push(value),
                    None => out.leading_params.push(value),
                }
            }
        }
        out
    }
}

impl FromArgMatches for StageFlags {
    fn from_arg_matches(matches: &ArgMatches) -> Result<Self, clap::Error> {
        Ok(Self::from_matches(matches))
    }

    fn update_from_arg_matches(&mut self, matches: &ArgMatches) -> Result<(), clap::Error> {
        *self = Self::from_matches(matches);
        Ok(())
    }
}

impl Args for StageFlags {
    fn augment_args(cmd: clap::Command) -> clap::Command {
        cmd.arg(
            Arg::new(PROCESSOR)
                .long(PROCESSOR)
                .value_name("NAME")
                .action(ArgAction::Append)
                .help(
                    "A processor: validate, map, filter, dedup or exec:NAME; repeat for a \
                     pipeline of stages",
                ),
        )
        .arg(
            Arg::new(PARAM)
                .long(PARAM)
                .value_name("KEY=VALUE")
                .action(ArgAction::Append)
                .help(
                    "A parameter of the --processor before it; KEY=@FILE reads the value from \
                     FILE",
                ),
        )
    }

    fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
        Self::augment_args(cmd)
    }
}

#[derive(Debug, Args)]
pub struct PutArgs {
    /// The file to store, or - for stdin.
    #[arg(value_name = "FILE|-")]
    pub file: PathBuf,

    /// Object name (default: the file's base name; none for stdin).
    #[arg(long)]
    pub name: Option<String>,

    /// rep:N (N copies) or ec:K+M (K data + M parity shards); default: the node's.
    #[arg(long, value_name = "POLICY")]
    pub redundancy: Option<Redundancy>,

    /// cdc (content-defined, the default) or fixed:SIZE (e.g. fixed:1MiB).
    #[arg(long, value_name = "CHUNKER")]
    pub chunker: Option<ChunkerSpec>,

    /// Never split a record: line-delimited jsonl or csv.
    #[arg(long, value_name = "FORMAT")]
    pub records: Option<RecordFormat>,

    /// Holders that must store each chunk before the put succeeds, from 1 to the policy's
    /// width (default: the node's, a majority of rep:N's copies or K+1 of ec:K+M's shards).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u8).range(1..))]
    pub quorum: Option<u8>,
}

#[derive(Debug, Args)]
pub struct GetArgs {
    /// Object id (64 hex characters).
    pub id: ObjectId,

    /// Where to write: a file, or - for stdout (default: the object's name in the current
    /// directory).
    #[arg(short, long, value_name = "FILE|-")]
    pub output: Option<PathBuf>,

    /// Overwrite the output file if it exists.
    #[arg(long)]
    pub force: bool,
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn the_default_api_is_protos_default_address() {
        let cli = Cli::try_parse_from(["meshctl", "status"]).unwrap();
        if std::env::var_os("MESH_API").is_none() {
            assert_eq!(
                cli.api,
                format!("http://{}", mesh_proto::api::DEFAULT_API_ADDR)
            );
        }
    }

    #[test]
    fn bad_policies_fail_with_protos_message() {
        let err =
            Cli::try_parse_from(["meshctl", "put", "f", "--redundancy", "raid5"]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        assert!(err.to_string().contains("expected rep:N"), "{err}");
        let err =
            Cli::try_parse_from(["meshctl", "put", "f", "--chunker", "fixed:10"]).unwrap_err();
        assert!(err.to_string().contains("fixed chunk size"), "{err}");
        let err = Cli::try_parse_from(["meshctl", "get", "abc"]).unwrap_err();
        assert!(err.to_string().contains("64 hex characters"), "{err}");
    }

    fn submit(args: &[&str]) -> SubmitArgs {
        let cli = Cli::try_parse_from(["meshctl", "job", "submit"].iter().chain(args)).unwrap();
        match cli.command {
            Command::Job {
                command: JobCommand::Submit(args),
            } => args,
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn each_param_belongs_to_the_processor_before_it() {
        let args = submit(&[
            "--param",
            "early=1",
            "--processor",
            "validate",
            "--input",
            &ObjectId::of(b"a").to_string(),
            "--param",
            "schema=@s.json",
            "--processor=dedup",
            "--param=key=id",
            "--param",
            "latest=ts",
            "--processor",
            "filter",
        ]);
        assert_eq!(args.stages.leading_params, ["early=1"]);
        let stage = |processor: &str, params: &[&str]| StageFlag {
            processor: processor.into(),
            params: params.iter().map(|p| (*p).to_owned()).collect(),
        };
        assert_eq!(
            args.stages.stages,
            [
                stage("validate", &["schema=@s.json"]),
                stage("dedup", &["key=id", "latest=ts"]),
                stage("filter", &[]),
            ]
        );
        assert_eq!(args.inputs, [ObjectId::of(b"a")]);
        assert_eq!(submit(&[]).stages, StageFlags::default());
    }

    #[test]
    fn submit_flags_parse_and_check_early() {
        let args = submit(&[
            "--on-failure",
            "partial",
            "--lease",
            "1m",
            "--output",
            "ec:4+2",
            "--wait",
        ]);
        assert_eq!(args.on_failure, Some(OnFailure::Partial));
        assert_eq!(args.lease.as_deref(), Some("1m"));
        assert_eq!(args.output, Some(Redundancy::erasure(4, 2).unwrap()));
        assert!(args.wait);
        let err =
            Cli::try_parse_from(["meshctl", "job", "submit", "--on-failure", "retry"]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        assert!(err.to_string().contains("partial"), "{err}");
        let err = Cli::try_parse_from(["meshctl", "job", "submit", "--lease", "soon"]).unwrap_err();
        assert!(err.to_string().contains("--lease"), "{err}");
    }

    #[test]
    fn a_job_is_named_by_its_id_or_a_prefix() {
        let id = mesh_proto::JobId::of(b"j");
        assert_eq!(id.to_string().parse(), Ok(JobRef::Id(id)));
        assert_eq!("ABcd12".parse(), Ok(JobRef::Prefix("abcd12".into())));
        assert!("abc".parse::<JobRef>().unwrap_err().contains("at least 4"));
        assert!("abcz".parse::<JobRef>().unwrap_err().contains("'z'"));
        let err = Cli::try_parse_from(["meshctl", "job", "status", "xyz!"]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
    }

    #[test]
    fn the_exit_codes_keep_their_documented_lines() {
        // cli/tests/meshctl.rs checks these lines in `meshctl --help`.
        for line in [
            "1  error (including a put that did not reach its write quorum)",
            "3  object not found",
        ] {
            assert!(EXIT_CODES.contains(line), "{line} missing");
        }
    }

    #[test]
    fn a_quorum_must_be_at_least_one() {
        let err = Cli::try_parse_from(["meshctl", "put", "f", "--quorum", "0"]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        assert!(err.to_string().contains("--quorum"), "{err}");
        assert!(Cli::try_parse_from(["meshctl", "put", "f", "--quorum", "x"]).is_err());
        let cli = Cli::try_parse_from(["meshctl", "put", "f", "--quorum", "2"]).unwrap();
        match cli.command {
            Command::Put(args) => assert_eq!(args.quorum, Some(2)),
            other => panic!("parsed as {other:?}"),
        }
        let cli = Cli::try_parse_from(["meshctl", "put", "f"]).unwrap();
        match cli.command {
            Command::Put(args) => assert_eq!(args.quorum, None),
            other => panic!("parsed as {other:?}"),
        }
    }
}
