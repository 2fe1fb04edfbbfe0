//! `meshctl scrub`: the scrubber's progress; `meshctl scrub --now` starts a pass and returns
//! (the pass runs in the node's background at its configured rate).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mesh_proto::api::ScrubStatus;

use crate::client::Client;
use crate::error::Error;
use crate::output::{self, human_bytes};

use super::status::render_rows;

pub async fn run(client: &Client, now: bool, json: bool) -> Result<(), Error> {
    if now {
        let answer = client.scrub_start().await?;
        if json {
            return output::print_json(&answer);
        }
        let head = if answer.started {
            "scrub pass started\n"
        } else {
            "a scrub pass is already running; it goes on\n"
        };
        return output::print(&format!("{head}{}", render(&answer.status, now_ms())));
    }
    let status = client.scrub_status().await?;
    if json {
        output::print_json(&status)
    } else {
        output::print(&render(&status, now_ms()))
    }
}

/// Milliseconds since the Unix epoch, the unit the node reports times in.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// `3m 2s` for a span in milliseconds, to the second.
fn span(ms: u64) -> String {
    humantime::format_duration(Duration::from_secs(ms / 1000)).to_string()
}

fn ago(at_ms: u64, now_ms: u64) -> String {
    format!("{} ago", span(now_ms.saturating_sub(at_ms)))
}

/// `checked` of `stored` with a percentage, when there is something to check.
fn progress(checked: u64, stored: u64) -> String {
    if stored == 0 {
        format!("{checked} chunks")
    } else {
        let percent = (checked as f64 * 100.0 / stored as f64).min(100.0);
        format!("{checked} of {stored} chunks ({percent:.0}%)")
    }
}

/// The few lines `meshctl status` shows: the pass, what it found, and the last finished one.
pub fn summary(status: &ScrubStatus, now_ms: u64) -> String {
    if !status.enabled {
        return "off (durability.scrub_rate = 0)".to_owned();
    }
    let mut lines = Vec::new();
    match &status.pass {
        None => lines.push("no pass yet".to_owned()),
        Some(pass) => {
            let checked = format!(
                "{}, {} checked",
                progress(pass.chunks_checked, status.chunks_stored),
                human_bytes(pass.bytes_checked)
            );
            lines.push(match pass.finished_ms {
                None => format!(
                    "running, started {}: {checked}",
                    ago(pass.started_ms, now_ms)
                ),
                Some(_) => format!(
                    "idle; last pass started {}: {} chunks, {} checked",
                    ago(pass.started_ms, now_ms),
                    pass.chunks_checked,
                    human_bytes(pass.bytes_checked)
                ),
            });
            lines.push(format!(
                "{} corrupt, {} repaired in this pass; {} quarantined",
                pass.corrupt, pass.repaired, status.quarantined
            ));
        }
    }
    lines.push(match status.last_finished_ms {
        Some(at) => format!("last pass finished {}", ago(at, now_ms)),
        None => "no pass finished yet".to_owned(),
    });
    lines.join("\n")
}

/// Everything `meshctl scrub` shows, one aligned row per item.
fn render(status: &ScrubStatus, now_ms: u64) -> String {
    let state = if !status.enabled {
        "off (durability.scrub_rate = 0)".to_owned()
    } else {
        match &status.pass {
            Some(pass) if pass.finished_ms.is_none() => {
                format!("running, started {}", ago(pass.started_ms, now_ms))
            }
            _ => "idle".to_owned(),
        }
    };
    let pass = status.pass.as_ref();
    let checked = pass.map_or_else(
        || "-".to_owned(),
        |p| {
            format!(
                "{}, {}",
                progress(p.chunks_checked, status.chunks_stored),
                human_bytes(p.bytes_checked)
            )
        },
    );
    let found = pass.map_or_else(
        || "-".to_owned(),
        |p| format!("{} corrupt, {} repaired", p.corrupt, p.repaired),
    );
    let quarantined = if status.quarantined == 0 {
        "0 chunks".to_owned()
    } else {
        format!(
            "{} chunks (corrupt here, no good copy found yet; reads use other holders, every pass \
             tries again)",
            status.quarantined
        )
    };
    let next = match status.next_pass_ms {
        None if status.enabled => "after the running one".to_owned(),
        None => "-".to_owned(),
        Some(at) if at <= now_ms => "now".to_owned(),
        Some(at) => format!("in {}", span(at - now_ms)),
    };
    render_rows([
        ("scrub", state),
        ("checked (this pass)", checked),
        ("found (this pass)", found),
        ("quarantined", quarantined),
        (
            "last finished",
            status
                .last_finished_ms
                .map_or_else(|| "never".to_owned(), |at| ago(at, now_ms)),
        ),
        ("next pass", next),
        (
            "rate",
            format!(
                "{}/s, a pass every {}",
                human_bytes(status.rate_bytes_per_sec),
                humantime::format_duration(Duration::from_secs(status.interval_secs))
            ),
        ),
        (
            "since created",
            format!(
                "{} passes, {} corrupt, {} repaired",
                status.passes_completed, status.corrupt_total, status.repaired_total
            ),
        ),
    ])
}

#[cfg(test)]
mod tests {
    use mesh_proto::api::ScrubPass;

    use super::*;

    fn status(pass: Option<ScrubPass>) -> ScrubStatus {
        ScrubStatus {
            enabled: true,
            rate_bytes_per_sec: 4 << 20,
            interval_secs: 86_400,
            pass,
            last_finished_ms: Some(1_000_000),
            next_pass_ms: None,
            chunks_stored: 400,
            quarantined: 0,
            corrupt_total: 3,
            repaired_total: 2,
            passes_completed: 5,
        }
    }

    const NOW: u64 = 1_000_000 + 300_000;

    #[test]
    fn a_running_pass_shows_its_progress_and_findings() {
        let running = status(Some(ScrubPass {
            started_ms: NOW - 62_000,
            finished_ms: None,
            chunks_checked: 120,
            bytes_checked: 120 << 20,
            corrupt: 1,
            repaired: 1,
        }));
        let text = summary(&running, NOW);
        assert_eq!(
            text,
            "running, started 1m 2s ago: 120 of 400 chunks (30%), 120.0 MiB checked\n\
             1 corrupt, 1 repaired in this pass; 0 quarantined\n\
             last pass finished 5m ago"
        );
        let text = render(&running, NOW);
        assert!(
            text.contains("scrub                running, started 1m 2s ago\n"),
            "{text}"
        );
        assert!(
            text.contains("checked (this pass)  120 of 400 chunks (30%), 120.0 MiB\n"),
            "{text}"
        );
        assert!(
            text.contains("found (this pass)    1 corrupt, 1 repaired\n"),
            "{text}"
        );
        assert!(
            text.contains("next pass            after the running one\n"),
            "{text}"
        );
        assert!(
            text.contains("rate                 4.0 MiB/s, a pass every 1day\n"),
            "{text}"
        );
        assert!(
            text.contains("since created        5 passes, 3 corrupt, 2 repaired\n"),
            "{text}"
        );
    }

    #[test]
    fn an_idle_scrubber_says_when_it_runs_next_and_what_stays_bad() {
        let mut idle = status(Some(ScrubPass {
            started_ms: 900_000,
            finished_ms: Some(1_000_000),
            chunks_checked: 400,
            bytes_checked: 400 << 20,
            corrupt: 2,
            repaired: 1,
        }));
        idle.quarantined = 1;
        idle.next_pass_ms = Some(NOW + 3_600_000);
        let text = render(&idle, NOW);
        assert!(text.contains("scrub                idle\n"), "{text}");
        assert!(text.contains("next pass            in 1h\n"), "{text}");
        assert!(
            text.contains("quarantined          1 chunks (corrupt here"),
            "{text}"
        );
        let text = summary(&idle, NOW);
        assert!(text.contains("2 corrupt, 1 repaired in this pass; 1 quarantined"));
        let mut off = status(None);
        off.enabled = false;
        assert_eq!(summary(&off, NOW), "off (durability.scrub_rate = 0)");
        assert!(render(&off, NOW).contains("next pass            -\n"));
    }
}
