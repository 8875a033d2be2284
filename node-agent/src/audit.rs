//! The encryption audit trail: an append-only JSON-lines file, one object
//! per posture change, for compliance evidence (PCI, FedRAMP, SOC2).
//!
//! Events: `encryption_policy` (mode, scope, strict, strict ingress, node to
//! node), `key_rotation_started` / `key_rotation_completed` (fingerprints
//! only), `peer_added` / `peer_removed` / `peer_key_changed` (fingerprints),
//! `plaintext_drops` (packets refused by strict mode in the last interval,
//! per direction). Every line carries `ts` (RFC 3339, UTC), `node` and
//! `event`. No key material is ever written: keys appear as fingerprints.
//!
//! The file is opened with `O_APPEND` (mode 0640, created if missing) and
//! each line is written with one `write` call, so concurrent writers and a
//! crash never interleave or truncate earlier lines.

use std::{
    io::Write as _,
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{SystemTime, UNIX_EPOCH},
};

/// A handle to the audit file; cheap to clone.
#[derive(Clone)]
pub struct Audit {
    inner: Arc<Mutex<Option<std::fs::File>>>,
    node: String,
    pub path: PathBuf,
}

impl std::fmt::Debug for Audit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Audit").field("path", &self.path).finish()
    }
}

/// Seconds since the epoch as RFC 3339 UTC (civil-from-days, no crate).
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60,
        d.subsec_millis()
    )
}

impl Audit {
    /// Opens (creating) the audit file. A file that cannot be opened is
    /// reported once and events are then logged only.
    pub fn open(path: &Path, node: &str) -> Self {
        let file = path
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| {
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .mode(0o640)
                    .open(path)
            });
        let file = match file {
            Ok(f) => Some(f),
            Err(e) => {
                tracing::error!(path = %path.display(), error = %e, "cannot open the audit log; audit events go to the log only");
                None
            }
        };
        Self {
            inner: Arc::new(Mutex::new(file)),
            node: node.to_owned(),
            path: path.to_owned(),
        }
    }

    /// Appends one event with its fields.
    pub fn record(&self, event: &str, fields: serde_json::Value) {
        let mut obj = serde_json::Map::new();
        obj.insert("ts".into(), rfc3339(SystemTime::now()).into());
        obj.insert("node".into(), self.node.clone().into());
        obj.insert("event".into(), event.into());
        if let serde_json::Value::Object(m) = fields {
            obj.extend(m);
        }
        let mut line = serde_json::Value::Object(obj).to_string();
        tracing::info!(audit = %line, "audit");
        line.push('\n');
        if let Ok(mut g) = self.inner.lock()
            && let Some(f) = g.as_mut()
            && let Err(e) = f.write_all(line.as_bytes())
        {
            tracing::error!(path = %self.path.display(), error = %e, "writing the audit log");
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn dates_and_lines() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = UNIX_EPOCH + std::time::Duration::from_millis(1_795_691_026_467);
        assert_eq!(rfc3339(t), "2026-11-26T11:03:46.467Z");
        let t = UNIX_EPOCH + std::time::Duration::from_secs(951_782_400); // leap day
        assert_eq!(rfc3339(t), "2000-02-29T00:00:00.000Z");

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a/audit.jsonl");
        let a = Audit::open(&path, "node-1");
        a.record(
            "peer_added",
            serde_json::json!({"peer": "c2/n", "key": "abcd1234"}),
        );
        let b = Audit::open(&path, "node-1");
        b.record("plaintext_drops", serde_json::json!({"egress": 3}));
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["event"], "peer_added");
        assert_eq!(lines[0]["node"], "node-1");
        assert_eq!(lines[1]["egress"], 3);
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o640
        );
    }
}
