//! clustermesh-apiserver: exports one cluster's state into its etcd under the
//! key schema of `clustermesh_api::keys`. Not implemented yet
//! (docs/architecture.md describes where it fits).
