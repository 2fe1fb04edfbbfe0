//! meshctl: the operator's client of a meshd node's control API (HTTP + JSON, types from
//! `mesh_proto::api`). This crate owns the command line and the client side of the API, and
//! nothing of the node.
//!
//! Data flow: `args` parses the command line (ids and policies with proto's parsers);
//! `commands` runs one subcommand through `client`, which resolves the token, talks HTTP and
//! turns failures into `error::Error`; `put` streams a file as the request body, `get` streams
//! the object back through `verify` (BLAKE3 of every chunk against the manifest) before any byte
//! reaches the output, which `outfile` writes to disk on a thread of its own; `output` formats
//! results. This file maps errors to exit codes.

mod args;
mod client;
mod commands;
mod error;
mod outfile;
mod output;
mod verify;

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;

use crate::error::{Error, exit};

fn main() -> ExitCode {
    let cli = match args::Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => {
            let rendered = err.render().to_string();
            if err.use_stderr() && rendered.starts_with("error: ") {
                // The prefix makes clap's usage errors look like meshctl's own.
                eprint!("meshctl: {rendered}");
            } else {
                // Help and version (on stdout), or help for a missing subcommand (on stderr).
                let _ = err.print();
            }
            return ExitCode::from(u8::try_from(err.exit_code()).unwrap_or(exit::USAGE));
        }
    };
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // meshctl's own errors carry their causes in their text; anything else (the
            // runtime failing to start) gets its chain printed.
            let (message, code) = match err.downcast_ref::<Error>() {
                Some(err) => (err.to_string(), err.exit_code()),
                None => (format!("{err:#}"), exit::ERROR),
            };
            eprintln!("meshctl: error: {message}");
            ExitCode::from(code)
        }
    }
}

fn run(cli: args::Cli) -> anyhow::Result<()> {
    // One thread is plenty for one transfer; blocking file IO goes to tokio's blocking pool.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(commands::run(cli))?;
    Ok(())
}
