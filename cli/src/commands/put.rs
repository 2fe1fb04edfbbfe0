//! `meshctl put`: streams a file or stdin as the body of `POST /v1/objects`. The bytes pass
//! through a fixed-size read buffer on their way to the socket; the file is never held in
//! memory, whatever its size.

use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;
use mesh_proto::Redundancy;
use mesh_proto::api::PutQuery;
use tokio_util::io::ReaderStream;

use crate::args::PutArgs;
use crate::client::Client;
use crate::error::Error;
use crate::output;

/// Bytes read from the input per body frame.
const READ_BUF: usize = 256 * 1024;

pub async fn run(client: &Client, args: PutArgs, json: bool) -> Result<(), Error> {
    let from_stdin = args.file.as_os_str() == "-";
    let name = match args.name {
        Some(name) => Some(name),
        None if from_stdin => None,
        None => base_name(&args.file),
    };
    let query = PutQuery {
        name,
        redundancy: args.redundancy,
        chunker: args.chunker.map(|spec| spec.to_string()),
        records: args.records,
        quorum: args.quorum,
    };
    check_quorum(args.quorum, args.redundancy)?;

    let (input, size, source) = if from_stdin {
        (stdin_frames()?, None, PathBuf::from("standard input"))
    } else {
        let (file, size) = open_input(&args.file).await?;
        (
            ReaderStream::with_capacity(file, READ_BUF).boxed(),
            size,
            args.file.clone(),
        )
    };

    // Asked before streaming: stdin cannot be replayed, and a stopped node or a refused token
    // should be reported up front rather than after (or as a broken pipe during) an upload.
    client.status().await?;

    // The body stream can only hand reqwest an opaque error; the original is kept here so that
    // a failing disk or pipe is reported as a local read error naming the input.
    let read_error: Arc<Mutex<Option<io::Error>>> = Arc::default();
    let bar = output::transfer_bar("put", size);
    let body = {
        let read_error = Arc::clone(&read_error);
        let bar = bar.clone();
        input.map(move |frame| match frame {
            Ok(bytes) => {
                bar.inc(bytes.len() as u64);
                Ok(bytes)
            }
            Err(err) => {
                let summary = io::Error::new(err.kind(), "reading the input failed");
                if let Ok(mut slot) = read_error.lock() {
                    *slot = Some(err);
                }
                Err(summary)
            }
        })
    };
    let result = client.put(&query, reqwest::Body::wrap_stream(body)).await;
    bar.finish_and_clear();
    let response = match result {
        Ok(response) => response,
        Err(err) => {
            let local = read_error.lock().ok().and_then(|mut slot| slot.take());
            return Err(match local {
                Some(io_err) => Error::local_io("reading", source, io_err),
                None => err,
            });
        }
    };

    if json {
        output::print_json(&response)
    } else {
        output::print(&format!("{}\n", response.id))
    }
}

/// Opens the input and returns its size when it is a regular file (a FIFO or a device has
/// none).
async fn open_input(path: &Path) -> Result<(tokio::fs::File, Option<u64>), Error> {
    let file = tokio::fs::File::open(path)
        .await
        .map_err(|e| Error::local_io("reading", path, e))?;
    let meta = file
        .metadata()
        .await
        .map_err(|e| Error::local_io("reading", path, e))?;
    if meta.is_dir() {
        return Err(Error::IsDirectory {
            path: path.to_owned(),
        });
    }
    Ok((file, meta.is_file().then_some(meta.len())))
}

/// Standard input as a stream of frames of up to [`READ_BUF`] bytes. A plain thread does the
/// blocking reads and hands frames over a short bounded channel; it is detached, so that a read
/// still blocked on a terminal or an idle pipe cannot hold up the exit after an error.
fn stdin_frames() -> Result<BoxStream<'static, io::Result<Bytes>>, Error> {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<io::Result<Bytes>>(4);
    std::thread::Builder::new()
        .name("stdin".into())
        .spawn(move || {
            let mut stdin = io::stdin().lock();
            loop {
                match read_frame(&mut stdin) {
                    // Dropping the sender ends the stream.
                    Ok(bytes) if bytes.is_empty() => break,
                    Ok(bytes) => {
                        if tx.blocking_send(Ok(bytes)).is_err() {
                            break;
                        }
                    }
                    Err(err) => {
                        let _ = tx.blocking_send(Err(err));
                        break;
                    }
                }
            }
        })
        .map_err(|e| Error::local_io("reading", "standard input", e))?;
    Ok(futures::stream::poll_fn(move |cx| rx.poll_recv(cx)).boxed())
}

/// Reads until the frame is full or the input ends; an empty frame means the end.
fn read_frame(input: &mut impl Read) -> io::Result<Bytes> {
    let mut buf = vec![0u8; READ_BUF];
    let mut filled = 0;
    while filled < buf.len() {
        match input.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf.truncate(filled);
    Ok(Bytes::from(buf))
}

/// A quorum of at least one is clap's to check; one larger than an explicit policy's width is
/// caught here, before any byte is read. With the node's default policy, the node checks.
fn check_quorum(quorum: Option<u8>, redundancy: Option<Redundancy>) -> Result<(), Error> {
    match (quorum, redundancy) {
        (Some(0), _) => Err(Error::Usage("--quorum must be at least 1".into())),
        (Some(quorum), Some(policy)) if usize::from(quorum) > policy.width() => {
            Err(Error::Usage(format!(
                "--quorum {quorum} is more than the {} holders {policy} places each chunk on",
                policy.width()
            )))
        }
        (Some(quorum), Some(policy @ Redundancy::Erasure { data, .. })) if quorum <= data => {
            Err(Error::Usage(format!(
                "--quorum {quorum} is too low for {policy}: a chunk needs {data} shards to be \
                 readable, and the quorum keeps at least one more ({})",
                policy.default_write_quorum()
            )))
        }
        _ => Ok(()),
    }
}

fn base_name(path: &Path) -> Option<String> {
    path.file_name()
        .map(|name| name.to_string_lossy().into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_name_is_the_base_name() {
        assert_eq!(
            base_name(Path::new("/data/train.jsonl")).as_deref(),
            Some("train.jsonl")
        );
        assert_eq!(base_name(Path::new("x.bin")).as_deref(), Some("x.bin"));
        assert_eq!(base_name(Path::new("/")), None);
        assert_eq!(base_name(Path::new("..")), None);
    }

    #[test]
    fn a_quorum_fits_the_policy() {
        let rep2 = Some(Redundancy::Replicas(2));
        assert!(check_quorum(None, rep2).is_ok());
        assert!(check_quorum(Some(2), rep2).is_ok());
        assert!(
            check_quorum(Some(9), None).is_ok(),
            "the node checks its default"
        );
        let err = check_quorum(Some(3), rep2).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        assert!(err.to_string().contains("--quorum 3"), "{err}");
        assert_eq!(check_quorum(Some(0), None).unwrap_err().exit_code(), 2);
        let ec = Some(Redundancy::Erasure { data: 4, parity: 2 });
        assert!(check_quorum(Some(6), ec).is_ok());
        assert!(check_quorum(Some(7), ec).is_err());
        assert!(check_quorum(Some(5), ec).is_ok());
        assert!(
            check_quorum(Some(4), ec)
                .unwrap_err()
                .to_string()
                .contains("too low")
        );
    }

    #[test]
    fn frames_are_filled_before_they_are_sent() {
        // A reader that hands out 1000 bytes per call, like a pipe.
        struct Trickle(usize);
        impl Read for Trickle {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                let n = buf.len().min(1000).min(self.0);
                self.0 -= n;
                buf[..n].fill(7);
                Ok(n)
            }
        }
        let mut input = Trickle(READ_BUF + 10);
        assert_eq!(read_frame(&mut input).unwrap().len(), READ_BUF);
        assert_eq!(read_frame(&mut input).unwrap().len(), 10);
        assert!(read_frame(&mut input).unwrap().is_empty());
    }
}
