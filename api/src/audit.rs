//! The audit trail: an append-only JSON-lines file, one object per posture
//! change, for compliance evidence (PCI, FedRAMP, SOC2). One format for the
//! node agent and the apiserver.
//!
//! Every line carries `ts` (RFC 3339, UTC), the writer's scope (`node` for
//! an agent, `cluster` for an apiserver) and `event`, then the event's
//! fields. The agent's events: `encryption_policy`, `key_rotation_started`
//! / `key_rotation_completed` (fingerprints only), `peer_added` /
//! `peer_removed` / `peer_key_changed` (fingerprints), `plaintext_drops`.
//! The apiserver's: `api_call`, one per posture change or refused call,
//! with the caller's certificate identity (see its `grpc` module). No key
//! material is ever written: keys appear as fingerprints.
//!
//! The file is opened with `O_APPEND` (mode 0640, created if missing) and
//! each line is written with one `write` call, so concurrent writers and a
//! crash never interleave or truncate earlier lines.

use std::{
    io::Write as _,
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::SystemTime,
};

/// Whoever else gets each line ([`Audit::tee`]).
type Tee = Arc<Mutex<Option<Box<dyn Fn(&str) + Send>>>>;

/// A handle to the audit file; cheap to clone.
#[derive(Clone)]
pub struct Audit {
    inner: Arc<Mutex<Option<std::fs::File>>>,
    tee: Tee,
    scope: (&'static str, String),
    pub path: PathBuf,
}

impl std::fmt::Debug for Audit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Audit").field("path", &self.path).finish()
    }
}

pub use crate::time::rfc3339;

impl Audit {
    /// Opens (creating) the audit file; `scope` is written into every line
    /// (e.g. `("node", "node-1")`). A file that cannot be opened is
    /// reported once and events are then logged only.
    pub fn open(path: &Path, scope: (&'static str, &str)) -> Self {
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
            tee: Arc::default(),
            scope: (scope.0, scope.1.to_owned()),
            path: path.to_owned(),
        }
    }

    /// Also hands every line (without its newline) to `f`, for every clone
    /// of this handle (the agent's flow export carries the audit trail in
    /// its stream).
    pub fn tee(&self, f: impl Fn(&str) + Send + 'static) {
        if let Ok(mut g) = self.tee.lock() {
            *g = Some(Box::new(f));
        }
    }

    /// Appends one event with its fields.
    pub fn record(&self, event: &str, fields: serde_json::Value) {
        let mut obj = serde_json::Map::new();
        obj.insert("ts".into(), rfc3339(SystemTime::now()).into());
        obj.insert(self.scope.0.into(), self.scope.1.clone().into());
        obj.insert("event".into(), event.into());
        if let serde_json::Value::Object(m) = fields {
            obj.extend(m);
        }
        let mut line = serde_json::Value::Object(obj).to_string();
        tracing::info!(audit = %line, "audit");
        if let Ok(g) = self.tee.lock()
            && let Some(f) = g.as_ref()
        {
            f(&line);
        }
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
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a/audit.jsonl");
        let a = Audit::open(&path, ("node", "node-1"));
        a.record(
            "peer_added",
            serde_json::json!({"peer": "c2/n", "key": "abcd1234"}),
        );
        let b = Audit::open(&path, ("node", "node-1"));
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
