//! One module per subcommand; each takes a [`Client`] and the parsed arguments and prints its
//! result (text, or JSON with `--json`).

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
