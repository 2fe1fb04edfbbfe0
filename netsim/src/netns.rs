//! Network namespaces and the TUN device inside each.
//!
//! A namespace is made with `ip netns add` (iproute2 keeps it alive with a bind mount under
//! `/run/netns`, which is also how `ip netns exec` and our own `setns` find it). Its TUN device
//! is created *inside* it, by a short-lived thread that first moves itself into the namespace
//! with `setns`; the file descriptor it returns keeps working from any thread of the router.
//! A TUN device lives only as long as its descriptor, so the router's exit removes every TUN;
//! namespaces outlive the process and are deleted by [`delete`] (from `down`, the Ctrl-C path,
//! or the next `up` reading the state file of a run that crashed).

use std::fs::File;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Command;

use nix::sched::{CloneFlags, setns};
use tun_rs::{DeviceBuilder, SyncDevice};

/// MTU of every TUN. TUN has no link-layer limit, so a large MTU lets bulk transfers use few
/// packets; QUIC still sends ~1200-1500 byte datagrams, which is what packets/s measures.
pub const TUN_MTU: u16 = 65_000;
/// Name of the TUN inside each namespace.
pub const TUN_NAME: &str = "tun0";
/// Prefix length of the emulated network, `10.77.0.0/16`.
pub const PREFIX_LEN: u8 = 16;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("`{command}` failed: {stderr}")]
    Command { command: String, stderr: String },
    #[error("cannot run `ip` ({source}): install iproute2")]
    NoIp {
        #[source]
        source: std::io::Error,
    },
    #[error("cannot enter network namespace {name}: {reason}")]
    Enter { name: String, reason: String },
    #[error(
        "cannot create the TUN device in namespace {name}: {source} (is /dev/net/tun there, and are we root?)"
    )]
    Tun {
        name: String,
        #[source]
        source: std::io::Error,
    },
}

/// Where iproute2 keeps a named namespace.
pub fn path(name: &str) -> PathBuf {
    PathBuf::from("/run/netns").join(name)
}

pub fn exists(name: &str) -> bool {
    path(name).exists()
}

fn ip(args: &[&str]) -> Result<(), Error> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|source| Error::NoIp { source })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(Error::Command {
            command: format!("ip {}", args.join(" ")),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// Creates namespace `name` with its loopback up.
pub fn create(name: &str) -> Result<(), Error> {
    ip(&["netns", "add", name])?;
    ip(&["-n", name, "link", "set", "lo", "up"])
}

/// Deletes namespace `name`; a namespace that is already gone is not an error.
pub fn delete(name: &str) -> Result<(), Error> {
    if !exists(name) {
        return Ok(());
    }
    ip(&["netns", "delete", name])
}

/// Names of all namespaces iproute2 knows.
pub fn list() -> Vec<String> {
    std::fs::read_dir("/run/netns")
        .map(|dir| {
            dir.filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Moves the calling thread into namespace `name`. Only for threads that exist for that
/// purpose (see [`run_in`]), and for a child process just before it `exec`s.
pub fn enter(name: &str) -> Result<(), Error> {
    let file = File::open(path(name)).map_err(|e| Error::Enter {
        name: name.to_string(),
        reason: e.to_string(),
    })?;
    setns(&file, CloneFlags::CLONE_NEWNET).map_err(|e| Error::Enter {
        name: name.to_string(),
        reason: e.to_string(),
    })
}

/// Runs `f` on a new thread inside namespace `name` and returns what it returns. Sockets and
/// devices created by `f` stay in that namespace whichever thread uses them later.
pub fn run_in<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, Error> {
    let owned = name.to_string();
    std::thread::Builder::new()
        .name(format!("netns-{name}"))
        .spawn(move || -> Result<T, Error> {
            enter(&owned)?;
            Ok(f())
        })
        .map_err(|e| Error::Enter {
            name: name.to_string(),
            reason: e.to_string(),
        })?
        .join()
        .map_err(|_| Error::Enter {
            name: name.to_string(),
            reason: "the thread panicked".to_string(),
        })?
}

/// Creates the TUN device inside namespace `name` with address `addr`/16, up, and returns it
/// in non-blocking mode for the router. The device has a virtio-net header on every packet
/// and UDP and TCP segmentation offload, so a sender's GSO batch reaches the router in one
/// read (see [`crate::router`]).
pub fn create_tun(name: &str, addr: Ipv4Addr) -> Result<SyncDevice, Error> {
    let device = run_in(name, move || {
        DeviceBuilder::new()
            .name(TUN_NAME)
            .mtu(TUN_MTU)
            .ipv4(addr, PREFIX_LEN, None)
            .tx_queue_len(10_000)
            .offload(true)
            .enable(true)
            .build_sync()
    })?
    .map_err(|source| Error::Tun {
        name: name.to_string(),
        source,
    })?;
    device.set_nonblocking(true).map_err(|source| Error::Tun {
        name: name.to_string(),
        source,
    })?;
    Ok(device)
}

/// Whether this process may create namespaces and TUN devices.
pub fn have_privileges() -> bool {
    nix::unistd::geteuid().is_root() && std::path::Path::new("/dev/net/tun").exists()
}
