//! A continuous ping inside a namespace, run in the background while a
//! test disturbs the path, then summarised.

use std::{
    io,
    process::{Child, Command, Stdio},
};

use crate::netns::NetNs;

/// A running `ping -c count -i interval -W 1 dst` in `ns`.
#[derive(Debug)]
pub struct Ping {
    child: Child,
}

/// What ping reported at the end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PingSummary {
    pub sent: u32,
    pub received: u32,
}

impl PingSummary {
    /// Time without answers, at `interval_ms` per ping.
    pub fn gap_ms(&self, interval_ms: u32) -> u32 {
        self.sent.saturating_sub(self.received) * interval_ms
    }
}

impl Ping {
    /// Starts pinging; `count` 0 pings until [`Ping::stop`].
    pub fn start(ns: &NetNs, dst: &str, count: u32, interval: &str) -> io::Result<Self> {
        let mut cmd = Command::new("ip");
        cmd.args([
            "netns",
            "exec",
            ns.name(),
            "ping",
            "-i",
            interval,
            "-W",
            "1",
        ]);
        if count > 0 {
            cmd.args(["-c", &count.to_string()]);
        }
        let child = cmd
            .arg(dst)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        Ok(Self { child })
    }

    /// Waits for the count to be sent and returns the summary.
    pub fn finish(self) -> io::Result<PingSummary> {
        let out = self.child.wait_with_output()?;
        summary(&String::from_utf8_lossy(&out.stdout))
            .ok_or_else(|| io::Error::other("ping printed no summary"))
    }

    /// Ends an open-ended ping.
    pub fn stop(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Parses ping's "N packets transmitted, M received" line.
pub fn summary(text: &str) -> Option<PingSummary> {
    let line = text.lines().find(|l| l.contains("packets transmitted"))?;
    let mut nums = line
        .split(',')
        .map(|p| p.split_whitespace().next().and_then(|n| n.parse().ok()));
    Some(PingSummary {
        sent: nums.next()??,
        received: nums.next()??,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn summaries() {
        let s = summary("x\n400 packets transmitted, 398 received, 0.5% packet loss, time 4s\n")
            .unwrap();
        assert_eq!((s.sent, s.received, s.gap_ms(10)), (400, 398, 20));
        assert!(summary("nothing").is_none());
    }
}
