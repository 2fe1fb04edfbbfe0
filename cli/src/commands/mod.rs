//! One module per subcommand; each takes a [`Client`] and the parsed arguments and prints its
//! result (text, or JSON with `--json`: the node's answer as it came).
//!
//! The commands (`meshctl --help` and `meshctl <command> --help` say more):
//!
//! - `put FILE|-`, `get ID`, `ls`, `stat ID`, `rm ID`: objects ([`put`], [`get`], [`objects`]).
//! - `status`, `peers`, `repair`, `scrub [--now]`: the node and the mesh around it.
//! - `job submit|status|ls|cancel|wait|rm`: processing jobs ([`job`]):
//!   - `job submit --processor NAME [--param KEY=VALUE|KEY=@FILE ...] [--processor NAME
//!     [--param ...] ...] --input ID [--input ID ...] [--spec FILE] [--output POLICY]
//!     [--max-attempts N] [--lease DURATION] [--partitions N] [--on-failure fail|partial]
//!     [--wait]` prints the job id, or with `--wait` the output object id once the job ends.
//!     Each `--param` belongs to the `--processor` before it; several processors are stages.
//!     `--spec` reads a `JobSubmit` from a `.json` or `.toml` file that the flags amend.
//!   - `job wait ID` waits like `submit --wait`: exit 1 with the error and dead letters if the
//!     job failed or was cancelled; a `partial` job prints its output id and warns.
//!   - `job status ID` shows the report (tasks, locality, per-node and per-stage tables, the
//!     bottleneck, dead letters); `job ls` lists jobs; `job cancel ID`; `job rm ID` forgets an
//!     ended job. An ID may be a unique prefix of at least 4 hex characters.

mod get;
mod job;
mod objects;
mod peers;
mod put;
mod repair;
mod scrub;
mod status;

use crate::args::{Cli, Command};
use crate::client::{Client, Token};
use crate::error::Error;

pub async fn run(cli: Cli) -> Result<(), Error> {
    let token = Token::resolve(cli.token.as_deref(), &cli.data_dir)?;
    let client = Client::new(&cli.api, &cli.data_dir, token)?;
    match cli.command {
        Command::Put(args) => put::run(&client, args, cli.json).await,
        Command::Get(args) => get::run(&client, args, cli.json).await,
        Command::Ls => objects::ls(&client, cli.json).await,
        Command::Stat { id } => objects::stat(&client, id, cli.json).await,
        Command::Rm { id } => objects::rm(&client, id, cli.json).await,
        Command::Status => status::run(&client, cli.json).await,
        Command::Peers => peers::run(&client, cli.json).await,
        Command::Repair => repair::run(&client, cli.json).await,
        Command::Scrub { now } => scrub::run(&client, now, cli.json).await,
        Command::Job { command } => job::run(&client, command, cli.json).await,
    }
}
