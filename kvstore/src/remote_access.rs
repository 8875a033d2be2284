//! Read-only etcd access for remote clusters.
//!
//! A remote cluster reads this cluster's etcd as user `remote-<its name>`,
//! authenticated by a client certificate whose CN is that user name (etcd
//! `--client-cert-auth`). The user holds one role, [`REMOTE_ROLE`], which may
//! only read the public prefixes ([`READABLE_PREFIXES`]): never the
//! apiserver's internal records, never write.
//!
//! [`enable_auth`] prepares an etcd for this: a `root` user (required by etcd
//! before auth can be enabled), the apiserver's own user with read-write on
//! `clustermesh/`, then auth on. All steps are idempotent.

use clustermesh_api::{ClusterName, keys::ROOT};
use etcd_client::{Client, Permission, UserAddOptions};

/// The role every remote reader holds.
pub const REMOTE_ROLE: &str = "clustermesh-remote-read";
/// The role of the apiserver itself.
pub const APISERVER_ROLE: &str = "clustermesh-apiserver";

/// What remote clusters may read.
pub const READABLE_PREFIXES: [&str; 4] = [
    "clustermesh/state/",
    "clustermesh/cluster-config/",
    "clustermesh/synced/",
    "clustermesh/heartbeat/",
];

#[derive(Debug, thiserror::Error)]
#[error("etcd {op}: {source}")]
pub struct Error {
    pub op: &'static str,
    #[source]
    pub source: etcd_client::Error,
}

fn err(op: &'static str) -> impl FnOnce(etcd_client::Error) -> Error {
    move |source| Error { op, source }
}

fn exists(e: &etcd_client::Error) -> bool {
    e.to_string().contains("already exists")
}

/// The etcd user name of a remote cluster's reader (the CN of its
/// client certificate).
pub fn remote_user(remote: &ClusterName) -> String {
    format!("remote-{remote}")
}

async fn ensure_role(client: &mut Client, role: &str, perms: Vec<Permission>) -> Result<(), Error> {
    if let Err(e) = client.role_add(role).await
        && !exists(&e)
    {
        return Err(err("role add")(e));
    }
    for p in perms {
        client
            .role_grant_permission(role, p)
            .await
            .map_err(err("role grant"))?;
    }
    Ok(())
}

async fn ensure_user(client: &mut Client, user: &str, role: &str) -> Result<(), Error> {
    if let Err(e) = client
        .user_add(user, "", Some(UserAddOptions::new().with_no_pwd()))
        .await
        && !exists(&e)
    {
        return Err(err("user add")(e));
    }
    client
        .user_grant_role(user, role)
        .await
        .map_err(err("user grant role"))?;
    Ok(())
}

/// Creates (or refreshes) the read-only user of `remote`; returns its name.
pub async fn grant_remote_reader(
    client: &mut Client,
    remote: &ClusterName,
) -> Result<String, Error> {
    let perms = READABLE_PREFIXES
        .iter()
        .map(|p| Permission::read(*p).with_prefix())
        .collect();
    ensure_role(client, REMOTE_ROLE, perms).await?;
    let user = remote_user(remote);
    ensure_user(client, &user, REMOTE_ROLE).await?;
    Ok(user)
}

/// Removes the reader of `remote` (its connections fail from then on).
pub async fn revoke_remote_reader(client: &mut Client, remote: &ClusterName) -> Result<(), Error> {
    match client.user_delete(remote_user(remote)).await {
        Ok(_) => Ok(()),
        Err(e) if e.to_string().contains("not found") => Ok(()),
        Err(e) => Err(err("user delete")(e)),
    }
}

/// Prepares etcd auth: `root` (root role), `apiserver_user` with read-write
/// on `clustermesh/`, then enables auth. Connect as a client whose
/// certificate is `root` or before auth is on.
pub async fn enable_auth(client: &mut Client, apiserver_user: &str) -> Result<(), Error> {
    if let Err(e) = client
        .user_add("root", "", Some(UserAddOptions::new().with_no_pwd()))
        .await
        && !exists(&e)
    {
        return Err(err("user add root")(e));
    }
    client
        .user_grant_role("root", "root")
        .await
        .map_err(err("grant root"))?;
    ensure_role(
        client,
        APISERVER_ROLE,
        vec![Permission::read_write(ROOT).with_prefix()],
    )
    .await?;
    ensure_user(client, apiserver_user, APISERVER_ROLE).await?;
    client.auth_enable().await.map_err(err("auth enable"))?;
    Ok(())
}
