//! The control socket: how `netsim kill|restart|partition|heal|status|down` reach the running
//! `netsim up`.
//!
//! A Unix socket in the run directory; one JSON request per connection, one JSON response
//! back. A listener thread only accepts and parses; the request travels with its connection
//! to the `up` process's main loop, which owns the processes and the router and writes the
//! response itself, so no state is shared between threads.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::Duration;

use crossbeam_channel::Sender;
use serde::{Deserialize, Serialize};

use crate::router::Snapshot;
use crate::state::{self, RunState};

/// Requests larger than this are refused; real ones are a few hundred bytes.
const MAX_REQUEST: u64 = 64 * 1024;
/// How long a client waits for an answer; a restart waits for the node to start.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "lowercase", deny_unknown_fields)]
pub enum Request {
    Status,
    Kill {
        node: String,
    },
    Restart {
        node: String,
    },
    Partition {
        regions: Vec<String>,
        from: Vec<String>,
    },
    Heal,
    Down,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    pub message: String,
    #[serde(default)]
    pub state: Option<RunState>,
    #[serde(default)]
    pub router: Option<Snapshot>,
}

impl Response {
    pub fn ok(message: impl Into<String>) -> Response {
        Response {
            ok: true,
            message: message.into(),
            state: None,
            router: None,
        }
    }

    pub fn error(message: impl Into<String>) -> Response {
        Response {
            ok: false,
            ..Response::ok(message)
        }
    }
}

/// A request and the connection to answer it on.
#[derive(Debug)]
pub struct Incoming {
    pub request: Request,
    pub conn: UnixStream,
}

impl Incoming {
    pub fn reply(mut self, response: &Response) {
        // A client that went away gets no answer; nothing else to do.
        if let Ok(mut line) = serde_json::to_vec(response) {
            line.push(b'\n');
            let _ = self.conn.write_all(&line);
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot bind the control socket {path}: {source}")]
    Bind {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "cannot reach netsim at {path} ({source}): is `netsim up` running with this --run-dir?"
    )]
    Connect {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("netsim at {path} did not answer: {reason}")]
    NoAnswer { path: String, reason: String },
}

/// Binds the socket and starts the listener thread, which passes requests to `to_owner`.
pub fn serve(run_dir: &Path, to_owner: Sender<Incoming>) -> Result<(), Error> {
    let path = state::socket_path(run_dir);
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).map_err(|source| Error::Bind {
        path: path.display().to_string(),
        source,
    })?;
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
                let mut line = String::new();
                let read = BufReader::new((&conn).take(MAX_REQUEST)).read_line(&mut line);
                let request = match read {
                    Ok(_) => serde_json::from_str::<Request>(&line),
                    Err(e) => Err(serde_json::Error::io(e)),
                };
                let incoming = match request {
                    Ok(request) => Incoming { request, conn },
                    Err(e) => {
                        Incoming {
                            request: Request::Status,
                            conn,
                        }
                        .reply(&Response::error(format!("bad request: {e}")));
                        continue;
                    }
                };
                if to_owner.send(incoming).is_err() {
                    return; // the owner is shutting down
                }
            }
        })
        .map_err(|source| Error::Bind {
            path: path.display().to_string(),
            source,
        })?;
    Ok(())
}

/// Sends one request to the `up` process of `run_dir` and returns its answer.
pub fn request(run_dir: &Path, request: &Request) -> Result<Response, Error> {
    let path = state::socket_path(run_dir);
    let shown = path.display().to_string();
    let mut conn = UnixStream::connect(&path).map_err(|source| Error::Connect {
        path: shown.clone(),
        source,
    })?;
    let no_answer = |reason: String| Error::NoAnswer {
        path: shown.clone(),
        reason,
    };
    conn.set_read_timeout(Some(CLIENT_TIMEOUT))
        .map_err(|e| no_answer(e.to_string()))?;
    let mut line = serde_json::to_vec(request).map_err(|e| no_answer(e.to_string()))?;
    line.push(b'\n');
    conn.write_all(&line)
        .map_err(|e| no_answer(e.to_string()))?;
    let mut answer = String::new();
    BufReader::new(&conn)
        .read_line(&mut answer)
        .map_err(|e| no_answer(e.to_string()))?;
    if answer.is_empty() {
        return Err(no_answer("it closed the connection".to_string()));
    }
    serde_json::from_str(&answer).map_err(|e| no_answer(format!("unreadable answer: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_over_the_socket() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (tx, rx) = crossbeam_channel::bounded(4);
        serve(dir.path(), tx).expect("serve");
        let owner = std::thread::spawn(move || {
            let incoming: Incoming = rx.recv().expect("request");
            let answer = format!("got {:?}", incoming.request);
            incoming.reply(&Response::ok(answer));
        });
        let response = request(
            dir.path(),
            &Request::Kill {
                node: "n1".to_string(),
            },
        )
        .expect("answer");
        owner.join().expect("owner");
        assert!(response.ok);
        assert_eq!(response.message, "got Kill { node: \"n1\" }");
    }

    #[test]
    fn no_server_is_a_clear_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = request(dir.path(), &Request::Status).expect_err("nobody listens");
        assert!(err.to_string().contains("is `netsim up` running"), "{err}");
    }
}
