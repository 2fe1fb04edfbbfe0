//! `meshctl get`: fetches the manifest (checked against the requested id), then streams the
//! object and lets only verified chunks through to the output (see `verify`).
//!
//! A file output is written to a temporary file next to the destination, synced, and renamed
//! into place only after every byte verified; on any failure (including Ctrl-C) the temporary
//! file is removed, so a destination is either untouched or complete.

use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use futures::StreamExt;
use indicatif::ProgressBar;
use mesh_proto::{Manifest, ObjectId};
use serde::Serialize;
use tempfile::TempPath;

use crate::args::GetArgs;
use crate::client::Client;
use crate::error::Error;
use crate::outfile::OutFile;
use crate::output;
use crate::verify::Verifier;

/// Longest file name most file systems accept, in bytes.
const MAX_FILE_NAME: usize = 255;

/// What `get --json` prints after writing a file.
#[derive(Debug, Serialize)]
struct Report<'a> {
    id: ObjectId,
    path: &'a Path,
    size: u64,
    chunks: usize,
    /// From the start of the command (manifest lookup included) to the first byte of data.
    first_byte_ms: f64,
    /// From the start of the command until the file was complete and synced.
    seconds: f64,
}

pub async fn run(client: &Client, args: GetArgs, json: bool) -> Result<(), Error> {
    let started = Instant::now();
    let GetArgs { id, output, force } = args;
    // An explicit destination is checked before any download, so a mistake costs nothing.
    let requested = match output {
        Some(path) if path.as_os_str() == "-" => Some(Target::Stdout),
        Some(path) => {
            check_destination(&path, force)?;
            Some(Target::File(path))
        }
        None => None,
    };

    let manifest = client.manifest(&id).await?;
    let target = match requested {
        Some(target) => target,
        None => {
            let path = PathBuf::from(local_file_name(manifest.name.as_deref(), &id));
            check_destination(&path, force)?;
            Target::File(path)
        }
    };

    let mut sink = Sink::open(&target, manifest.size)?;
    let response = client.download(&id).await?;
    if let Some(len) = response.content_length()
        && len != manifest.size
    {
        return Err(Error::BadResponse(format!(
            "meshd announced {len} bytes for {id}, whose manifest says {}",
            manifest.size
        )));
    }
    let bar = output::transfer_bar("get", Some(manifest.size));
    let mut first_byte = None;
    let copied = copy_verified(client, response, &manifest, &mut sink, &bar, &mut || {
        first_byte.get_or_insert_with(|| started.elapsed());
    })
    .await;
    bar.finish_and_clear();
    let size = copied?;
    sink.commit(force).await?;
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;

    match target {
        Target::Stdout => Ok(()),
        Target::File(path) if json => output::print_json(&Report {
            id,
            path: &path,
            size,
            chunks: manifest.chunks.len(),
            first_byte_ms: ms(first_byte.unwrap_or_else(|| started.elapsed())),
            seconds: started.elapsed().as_secs_f64(),
        }),
        Target::File(path) => output::print(&format!("{}\n", path.display())),
    }
}

/// Streams the object into `sink`, releasing only verified chunks; returns the size. Calls
/// `on_data` for every frame received.
async fn copy_verified(
    client: &Client,
    response: reqwest::Response,
    manifest: &Manifest,
    sink: &mut Sink,
    bar: &ProgressBar,
    on_data: &mut dyn FnMut(),
) -> Result<u64, Error> {
    let mut verifier = Verifier::new(manifest);
    let mut stream = response.bytes_stream();
    let interrupt = tokio::signal::ctrl_c();
    tokio::pin!(interrupt);
    loop {
        let frame = tokio::select! {
            biased;
            // Returning drops the sink, which removes the temporary file.
            Ok(()) = &mut interrupt => return Err(Error::Interrupted),
            frame = stream.next() => frame,
        };
        let Some(frame) = frame else { break };
        let frame = frame.map_err(|e| client.transport_error(e))?;
        on_data();
        bar.inc(frame.len() as u64);
        let mut data = &frame[..];
        while !data.is_empty() {
            let used = verifier.take(data)?;
            data = &data[used..];
            sink.write_verified(&mut verifier).await?;
        }
    }
    Ok(verifier.finish()?)
}

#[derive(Debug)]
enum Target {
    Stdout,
    File(PathBuf),
}

/// Where verified bytes go.
#[derive(Debug)]
enum Sink {
    /// Written synchronously: the single-threaded runtime has nothing else to do meanwhile,
    /// and a slow reader of the pipe should slow the download down anyway.
    Stdout(std::io::Stdout),
    /// Written by a thread of its own (see `outfile`). `temp` deletes the temporary file when
    /// dropped, unless it was renamed into place.
    File {
        file: OutFile,
        temp: TempPath,
        dest: PathBuf,
    },
}

impl Sink {
    /// `size` is the object's: large outputs are written with direct IO.
    fn open(target: &Target, size: u64) -> Result<Self, Error> {
        let dest = match target {
            Target::Stdout => return Ok(Self::Stdout(std::io::stdout())),
            Target::File(dest) => dest,
        };
        let mut builder = tempfile::Builder::new();
        // The suffix matches the repository's ignore rules for leftovers of a killed process.
        builder.prefix(".meshctl-").suffix(".mesh-tmp");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            // tempfile's default is 0600; a downloaded file should get the usual 0666 & umask.
            builder.permissions(std::fs::Permissions::from_mode(0o666));
        }
        let (file, temp) = builder
            .tempfile_in(parent_dir(dest))
            .map_err(|e| Error::local_io("writing", dest, e))?
            .into_parts();
        let file = OutFile::start(file, size).map_err(|e| Error::local_io("writing", dest, e))?;
        Ok(Self::File {
            file,
            temp,
            dest: dest.clone(),
        })
    }

    /// Writes the chunk the verifier just completed, if it did.
    async fn write_verified(&mut self, verifier: &mut Verifier<'_>) -> Result<(), Error> {
        match self {
            Self::Stdout(out) => match verifier.verified_chunk() {
                Some(chunk) => out
                    .write_all(chunk)
                    .map_err(|e| Error::local_io("writing", "standard output", e)),
                None => Ok(()),
            },
            Self::File { file, dest, .. } => {
                let Some(chunk) = verifier.take_verified() else {
                    return Ok(());
                };
                if let Some(spare) = file.spare() {
                    verifier.recycle(spare);
                }
                file.write(chunk)
                    .await
                    .map_err(|e| Error::local_io("writing", &*dest, e))
            }
        }
    }

    /// Makes the output final: flushes stdout, or syncs the temporary file and renames it
    /// over the destination (refusing to replace a file that appeared meanwhile unless
    /// `force`).
    async fn commit(self, force: bool) -> Result<(), Error> {
        let (file, temp, dest) = match self {
            Self::Stdout(mut out) => {
                return out
                    .flush()
                    .map_err(|e| Error::local_io("writing", "standard output", e));
            }
            Self::File { file, temp, dest } => (file, temp, dest),
        };
        file.finish()
            .await
            .map_err(|e| Error::local_io("writing", &dest, e))?;
        let renamed = if force {
            temp.persist(&dest)
        } else {
            temp.persist_noclobber(&dest)
        };
        renamed.map_err(|e| match e.error.kind() {
            io::ErrorKind::AlreadyExists if !force => Error::FileExists { path: dest.clone() },
            _ => Error::local_io("writing", &dest, e.error),
        })?;
        sync_dir(parent_dir(&dest)).map_err(|e| Error::local_io("writing", &dest, e))
    }
}

/// Refuses a destination that is a directory, or that exists when `force` is not given.
fn check_destination(path: &Path, force: bool) -> Result<(), Error> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => Err(Error::IsDirectory {
            path: path.to_owned(),
        }),
        Ok(_) if !force => Err(Error::FileExists {
            path: path.to_owned(),
        }),
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::local_io("writing", path, e)),
    }
}

fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    }
}

/// A rename is durable only once the directory holding it is synced.
fn sync_dir(dir: &Path) -> io::Result<()> {
    #[cfg(unix)]
    std::fs::File::open(dir)?.sync_all()?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// The file name to write an object to when no `-o` is given: the base name of the manifest's
/// name, or the id when the name is missing or could escape the current directory or confuse
/// a terminal.
fn local_file_name(name: Option<&str>, id: &ObjectId) -> String {
    name.and_then(|name| name.rsplit(['/', '\\']).next())
        .filter(|base| {
            !base.is_empty()
                && *base != "."
                && *base != ".."
                && base.len() <= MAX_FILE_NAME
                && !base.chars().any(char::is_control)
        })
        .map_or_else(|| id.to_string(), str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_from_manifests_stay_in_the_current_directory() {
        let id = ObjectId::of(b"x");
        let hex = id.to_string();
        assert_eq!(local_file_name(Some("train.jsonl"), &id), "train.jsonl");
        assert_eq!(local_file_name(Some("../../etc/passwd"), &id), "passwd");
        assert_eq!(local_file_name(Some("/abs/path/x.bin"), &id), "x.bin");
        assert_eq!(local_file_name(Some("..\\win\\y.csv"), &id), "y.csv");
        assert_eq!(local_file_name(Some(".hidden"), &id), ".hidden");
        for unsafe_name in ["", ".", "..", "dir/", "a/..", "evil\u{1b}[2J", "new\nline"] {
            assert_eq!(
                local_file_name(Some(unsafe_name), &id),
                hex,
                "{unsafe_name:?}"
            );
        }
        assert_eq!(local_file_name(Some(&"n".repeat(300)), &id), hex);
        assert_eq!(local_file_name(None, &id), hex);
    }

    #[test]
    fn destinations_are_checked_before_downloading() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("exists");
        std::fs::write(&file, b"old").unwrap();

        let err = check_destination(&file, false).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("{} exists; pass --force to overwrite it", file.display())
        );
        assert!(check_destination(&file, true).is_ok());
        assert!(check_destination(&dir.path().join("new"), false).is_ok());
        assert!(matches!(
            check_destination(dir.path(), true),
            Err(Error::IsDirectory { .. })
        ));
        let under_file = file.join("out.bin");
        let err = check_destination(&under_file, true)
            .unwrap_err()
            .to_string();
        assert!(err.contains(&under_file.display().to_string()), "{err}");
    }

    #[test]
    fn the_parent_of_a_bare_name_is_the_current_directory() {
        assert_eq!(parent_dir(Path::new("x.bin")), Path::new("."));
        assert_eq!(parent_dir(Path::new("/a/x.bin")), Path::new("/a"));
    }
}
