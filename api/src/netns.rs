//! Entering network namespaces: the one place in the product that calls
//! `setns(2)`. The node agent (attaching programs, routes, the WireGuard
//! device's process), the CNI plugin (the pod's side of its veth) and the
//! test kit all go through here.
//!
//! `setns` changes the namespace of the calling **thread** only. Async
//! runtimes move tasks between threads, so code that needs another
//! namespace runs on a dedicated thread: [`run_in`] spawns one, runs the
//! closure there and joins it, so no thread ever goes back to other work
//! from a foreign namespace. [`enter`] is for threads that live in the
//! namespace for good (the agent's route thread) or return explicitly
//! (the test kit's guard).

use std::{
    fs::File,
    io,
    os::fd::{AsRawFd as _, RawFd},
    path::{Path, PathBuf},
};

/// Where `ip netns add NAME` leaves its namespace.
pub const NETNS_RUN_DIR: &str = "/var/run/netns";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("opening network namespace {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("entering network namespace: {0}")]
    Enter(#[source] io::Error),
    #[error("starting the network namespace thread: {0}")]
    Thread(#[source] io::Error),
    #[error("the network namespace thread panicked")]
    Panicked,
}

/// The path of a named namespace (`ip netns` names).
pub fn path_of(name: &str) -> PathBuf {
    Path::new(NETNS_RUN_DIR).join(name)
}

/// Opens a namespace file (`/var/run/netns/NAME`, `/proc/PID/ns/net`).
pub fn open(path: &Path) -> Result<File, Error> {
    File::open(path).map_err(|source| Error::Open {
        path: path.to_owned(),
        source,
    })
}

/// Opens a named namespace.
pub fn open_named(name: &str) -> Result<File, Error> {
    open(&path_of(name))
}

/// Moves the calling thread into the namespace `fd` refers to.
///
/// Async-signal-safe (one system call, no allocation), so it may also run
/// between `fork` and `exec` (`CommandExt::pre_exec`) with an fd opened
/// before the fork.
pub fn enter_fd(fd: RawFd) -> io::Result<()> {
    // SAFETY: setns takes any fd and fails cleanly on a bad one; it changes
    // only the calling thread's network namespace.
    if unsafe { libc::setns(fd, libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Moves the calling thread into namespace `ns`.
pub fn enter(ns: &File) -> Result<(), Error> {
    enter_fd(ns.as_raw_fd()).map_err(Error::Enter)
}

/// Runs `f` on a new thread inside `ns` (None: the caller's namespace, on
/// the same kind of thread) and returns its result. The thread ends with
/// `f`.
pub fn run_in<T: Send>(ns: Option<&File>, f: impl FnOnce() -> T + Send) -> Result<T, Error> {
    std::thread::scope(|s| {
        let t = std::thread::Builder::new()
            .name("netns".into())
            .spawn_scoped(s, || {
                if let Some(ns) = ns {
                    enter(ns)?;
                }
                Ok(f())
            })
            .map_err(Error::Thread)?;
        t.join().unwrap_or(Err(Error::Panicked))
    })
}

/// [`run_in`] for a named namespace.
pub fn run_in_named<T: Send>(name: Option<&str>, f: impl FnOnce() -> T + Send) -> Result<T, Error> {
    let ns = name.map(open_named).transpose()?;
    run_in(ns.as_ref(), f)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn run_in_own_namespace_returns_the_value() {
        let here = std::fs::read_link("/proc/thread-self/ns/net").ok();
        let there = run_in(None, || std::fs::read_link("/proc/thread-self/ns/net").ok()).unwrap();
        assert_eq!(here, there);
        assert_eq!(run_in(None, || 7).unwrap(), 7);
    }

    #[test]
    fn a_missing_namespace_is_named_in_the_error() {
        let e = run_in_named(Some("clustermesh-no-such-ns"), || ()).unwrap_err();
        assert!(matches!(e, Error::Open { .. }), "{e:?}");
        assert!(e.to_string().contains("clustermesh-no-such-ns"), "{e}");
    }

    #[test]
    fn a_file_that_is_not_a_namespace_is_refused() {
        let f = File::open("/proc/self/status").unwrap();
        let e = run_in(Some(&f), || ()).unwrap_err();
        assert!(matches!(e, Error::Enter(_)), "{e:?}");
    }
}
