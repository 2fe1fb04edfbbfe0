//! The command line (a fixed contract: command and flag names must not change). Policies and
//! ids are parsed here with proto's parsers, so a typo fails before any byte is sent, with
//! proto's own explanation.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use mesh_proto::{ChunkerSpec, ObjectId, RecordFormat, Redundancy};

const EXIT_CODES: &str = "\
Exit codes:
  0  success
  1  error (including a put that did not reach its write quorum)
  2  usage error (bad arguments)
  3  object not found
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
