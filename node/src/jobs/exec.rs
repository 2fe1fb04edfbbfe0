//! `exec:NAME`: runs a command that this node's config registers (`[processors.NAME]`).
//!
//! The command runs without a shell. The task's input is written to its stdin while its stdout
//! is read (so neither side can fill a pipe and wait on the other), stdout is kept up to the
//! configured `max_output`, and stderr only for its last [`STDERR_TAIL`] bytes, which go into
//! the error of a failed run. A command that outlives its `timeout`, writes too much, or whose
//! run is abandoned (the future dropped) is killed.

use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::{ChildStdin, Command};

use crate::config::ExecConfig;

/// Longest name a `[processors.NAME]` entry may have.
pub const MAX_NAME_LEN: usize = 64;

/// Bytes of a command's stderr kept for its error message.
pub const STDERR_TAIL: usize = 4 * 1024;

/// Size of one read from the command's pipes.
const READ_BUF: usize = 64 * 1024;

/// Whether `name` may name a registered command: 1 to [`MAX_NAME_LEN`] characters of
/// `A-Z a-z 0-9 _ -`.
pub fn is_valid_name(name: &str) -> bool {
    (1..=MAX_NAME_LEN).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Why a registered command did not produce an output.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("cannot start {command}: {source}")]
    Spawn {
        command: String,
        source: std::io::Error,
    },
    #[error("{command} exited with code {code}; stderr: {stderr:?}")]
    Exit {
        command: String,
        code: i32,
        stderr: String,
    },
    #[error("{command} was killed by signal {signal}; stderr: {stderr:?}")]
    Signal {
        command: String,
        signal: i32,
        stderr: String,
    },
    #[error("{command} did not finish within its timeout of {} and was killed", humantime::format_duration(*.limit))]
    Timeout { command: String, limit: Duration },
    #[error("{command} wrote more than its max_output of {limit} to stdout and was killed")]
    OutputTooLarge {
        command: String,
        limit: bytesize::ByteSize,
    },
    #[error("cannot exchange data with {command}: {source}")]
    Io {
        command: String,
        source: std::io::Error,
    },
}

/// Why reading or writing the command's pipes stopped early.
enum PipeError {
    TooLarge,
    Io(std::io::Error),
}

/// Runs the command of `config` with `input` on its stdin and returns what it wrote to
/// stdout. Fails when it cannot start, exits unsuccessfully, runs past `config.timeout`, or
/// writes more than `config.max_output`.
pub async fn run(config: &ExecConfig, input: Bytes) -> Result<Vec<u8>, ExecError> {
    let command = format!("{:?}", config.command);
    let Some((program, args)) = config.command.split_first() else {
        return Err(ExecError::Spawn {
            command,
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "empty command"),
        });
    };
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| ExecError::Spawn {
            command: command.clone(),
            source,
        })?;
    let (Some(stdin), Some(stdout), Some(stderr)) =
        (child.stdin.take(), child.stdout.take(), child.stderr.take())
    else {
        return Err(ExecError::Io {
            command,
            source: std::io::Error::other("the command's pipes were not set up"),
        });
    };
    let limit = config.max_output.as_u64();
    let exchange = async {
        // stderr is drained alongside, so a chatty command cannot block on it either. The first
        // error (too much output) stops the others, and the child is killed below.
        let ((), output, stderr) = tokio::try_join!(
            write_input(stdin, input),
            read_limited(stdout, limit),
            async { Ok(read_tail(stderr).await) },
        )?;
        let status = child.wait().await.map_err(PipeError::Io)?;
        Ok::<_, PipeError>((status, output, stderr))
    };
    let outcome = tokio::time::timeout(config.timeout, exchange).await;
    let (status, output, stderr) = match outcome {
        Ok(Ok(done)) => done,
        Ok(Err(e)) => {
            kill(&mut child).await;
            return Err(match e {
                PipeError::TooLarge => ExecError::OutputTooLarge {
                    command,
                    limit: config.max_output,
                },
                PipeError::Io(source) => ExecError::Io { command, source },
            });
        }
        Err(_) => {
            kill(&mut child).await;
            return Err(ExecError::Timeout {
                command,
                limit: config.timeout,
            });
        }
    };
    check_status(command, status, &stderr)?;
    Ok(output)
}

/// Kills the child and reaps it, so no zombie is left behind.
async fn kill(child: &mut tokio::process::Child) {
    if let Err(e) = child.kill().await {
        tracing::debug!(error = %e, "cannot kill an exec processor");
    }
}

fn check_status(command: String, status: ExitStatus, stderr: &[u8]) -> Result<(), ExecError> {
    use std::os::unix::process::ExitStatusExt;
    if status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(stderr).trim_end().to_owned();
    Err(match (status.code(), status.signal()) {
        (Some(code), _) => ExecError::Exit {
            command,
            code,
            stderr,
        },
        (None, Some(signal)) => ExecError::Signal {
            command,
            signal,
            stderr,
        },
        (None, None) => ExecError::Exit {
            command,
            code: -1,
            stderr,
        },
    })
}

/// Writes all of `input`, then closes stdin so the command sees its end. A command that exits
/// without reading all of its input is not an error here (its exit status tells).
async fn write_input(mut stdin: ChildStdin, input: Bytes) -> Result<(), PipeError> {
    match stdin.write_all(&input).await {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
        Err(e) => return Err(PipeError::Io(e)),
    }
    match stdin.shutdown().await {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(PipeError::Io(e)),
        _ => Ok(()),
    }
}

/// Reads to the end, failing as soon as more than `limit` bytes arrived.
async fn read_limited(mut from: impl AsyncRead + Unpin, limit: u64) -> Result<Vec<u8>, PipeError> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; READ_BUF];
    loop {
        let n = from.read(&mut buf).await.map_err(PipeError::Io)?;
        if n == 0 {
            return Ok(out);
        }
        if (out.len() + n) as u64 > limit {
            return Err(PipeError::TooLarge);
        }
        out.extend_from_slice(&buf[..n]);
    }
}

/// Reads to the end and keeps the last [`STDERR_TAIL`] bytes. A read error ends the read: the
/// tail only decorates an error message.
async fn read_tail(mut from: impl AsyncRead + Unpin) -> Vec<u8> {
    let mut tail = Vec::new();
    let mut buf = vec![0u8; READ_BUF];
    while let Ok(n) = from.read(&mut buf).await {
        if n == 0 {
            break;
        }
        tail.extend_from_slice(&buf[..n]);
        if tail.len() > 2 * STDERR_TAIL {
            tail.drain(..tail.len() - STDERR_TAIL);
        }
    }
    if tail.len() > STDERR_TAIL {
        tail.drain(..tail.len() - STDERR_TAIL);
    }
    tail
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(argv: &[&str]) -> ExecConfig {
        ExecConfig::new(argv.iter().map(|s| s.to_string()).collect())
    }

    #[test]
    fn names() {
        assert!(is_valid_name("wordcount"));
        assert!(is_valid_name("A-z_09"));
        assert!(is_valid_name(&"x".repeat(64)));
        assert!(!is_valid_name(""));
        assert!(!is_valid_name(&"x".repeat(65)));
        assert!(!is_valid_name("a b"));
        assert!(!is_valid_name("a/b"));
        assert!(!is_valid_name("é"));
    }

    #[tokio::test]
    async fn cat_echoes_its_input() {
        let out = run(&config(&["/bin/cat"]), Bytes::from_static(b"hello\n"))
            .await
            .unwrap();
        assert_eq!(out, b"hello\n");
        let out = run(&config(&["/bin/cat"]), Bytes::new()).await.unwrap();
        assert!(out.is_empty());
    }

    #[tokio::test]
    async fn arguments_reach_the_program_without_a_shell() {
        let out = run(&config(&["/bin/echo", "a b", "$HOME"]), Bytes::new())
            .await
            .unwrap();
        assert_eq!(out, b"a b $HOME\n");
    }

    #[tokio::test]
    async fn more_than_a_pipe_buffer_both_ways() {
        // 8 MiB in and out: cat blocks writing stdout unless it is read while stdin is written.
        let input: Vec<u8> = (0..8 << 20).map(|i: u32| (i % 251) as u8).collect();
        let out = run(&config(&["/bin/cat"]), Bytes::from(input.clone()))
            .await
            .unwrap();
        assert_eq!(out.len(), input.len());
        assert!(out == input);
    }

    #[tokio::test]
    async fn a_command_that_ignores_its_input_is_fine() {
        let input = Bytes::from(vec![b'x'; 4 << 20]);
        let out = run(&config(&["/bin/echo", "done"]), input).await.unwrap();
        assert_eq!(out, b"done\n");
    }

    #[tokio::test]
    async fn non_zero_exit_reports_code_and_stderr_tail() {
        let err = run(
            &config(&["/bin/sh", "-c", "echo partial; echo boom >&2; exit 3"]),
            Bytes::new(),
        )
        .await
        .unwrap_err();
        match &err {
            ExecError::Exit { code, stderr, .. } => {
                assert_eq!(*code, 3);
                assert_eq!(stderr, "boom");
            }
            other => panic!("unexpected {other:?}"),
        }
        let text = err.to_string();
        assert!(
            text.contains("/bin/sh") && text.contains("code 3"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn stderr_keeps_only_its_tail() {
        let script = "i=0; while [ $i -lt 2000 ]; do echo line$i >&2; i=$((i+1)); done; exit 1";
        let err = run(&config(&["/bin/sh", "-c", script]), Bytes::new())
            .await
            .unwrap_err();
        let ExecError::Exit { stderr, .. } = err else {
            panic!("unexpected {err:?}");
        };
        assert!(stderr.len() <= STDERR_TAIL, "{}", stderr.len());
        assert!(stderr.ends_with("line1999"), "{stderr}");
        assert!(!stderr.contains("line0\n"));
    }

    #[tokio::test]
    async fn a_signal_is_reported() {
        let err = run(&config(&["/bin/sh", "-c", "kill -9 $$"]), Bytes::new())
            .await
            .unwrap_err();
        assert!(
            matches!(err, ExecError::Signal { signal: 9, .. }),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn timeout_kills_the_command() {
        let mut sleep = config(&["/bin/sleep", "30"]);
        sleep.timeout = Duration::from_millis(200);
        let started = std::time::Instant::now();
        let err = run(&sleep, Bytes::new()).await.unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(10));
        assert!(matches!(err, ExecError::Timeout { .. }), "{err:?}");
        assert!(err.to_string().contains("200ms"), "{err}");
    }

    #[tokio::test]
    async fn too_much_output_is_an_error() {
        // `yes` never stops on its own: the limit must end it.
        let mut yes = config(&["/usr/bin/yes"]);
        yes.max_output = bytesize::ByteSize::kib(64);
        let err = run(&yes, Bytes::new()).await.unwrap_err();
        assert!(matches!(err, ExecError::OutputTooLarge { .. }), "{err:?}");
        assert!(err.to_string().contains("max_output"), "{err}");

        let mut cat = config(&["/bin/cat"]);
        cat.max_output = bytesize::ByteSize::b(10);
        assert_eq!(
            run(&cat, Bytes::from_static(b"0123456789")).await.unwrap(),
            b"0123456789"
        );
        assert!(run(&cat, Bytes::from_static(b"0123456789a")).await.is_err());
    }

    #[tokio::test]
    async fn a_missing_program_names_the_command() {
        let err = run(&config(&["/nonexistent/tool", "x"]), Bytes::new())
            .await
            .unwrap_err();
        assert!(matches!(err, ExecError::Spawn { .. }), "{err:?}");
        assert!(err.to_string().contains("/nonexistent/tool"), "{err}");
        let err = run(&config(&[]), Bytes::new()).await.unwrap_err();
        assert!(matches!(err, ExecError::Spawn { .. }), "{err:?}");
    }
}
