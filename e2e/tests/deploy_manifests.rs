//! deploy/ checked against the product, without a Kubernetes cluster and
//! without root:
//!
//! - every YAML document under deploy/kubernetes parses (multi-document
//!   files), has apiVersion, kind and metadata.name, and lives in the
//!   clustermesh-system namespace unless cluster-scoped;
//! - the kustomization lists every manifest (examples/ excepted) and only
//!   files that exist;
//! - workloads: selectors match their template labels; every container
//!   names its program (`command`), runs an image of ours (at this
//!   workspace's version) or etcd's official one, and that image holds the
//!   program; it has resource requests and a memory limit, and a
//!   securityContext that drops all capabilities, refuses privilege
//!   escalation, is not privileged, adds only the agent's documented
//!   capabilities, and runs as non-root unless it adds capabilities or
//!   mounts host paths; volume mounts name volumes of the pod; `$(VAR)` in
//!   args is an env var of the container; ConfigMap keys, Secrets (and
//!   their items), ServiceAccounts and ClusterRoles referred to exist;
//!   Services select a workload and target its named ports;
//! - the apiserver runs with `--kubernetes` and its ClusterRole lets it
//!   get/list/watch Nodes, Services, Namespaces and EndpointSlices;
//! - every `--flag` in container command/args (also inside `sh -c`
//!   scripts and their `"$@"`), in systemd `ExecStart*` lines and in the
//!   `EXTRA_ARGS` of the environment-file examples appears in the `--help`
//!   of the binary it is given to (the built binaries, next to this test);
//!   etcd's flags (and the `ETCD_*` variables of etcd.env.example) are
//!   checked against the installed `etcd --help` when there is one;
//! - the binaries accept those arguments with the values filled in (the
//!   ConfigMap's, the environment-file examples'): each is run with one
//!   deliberately bad value that its own checks refuse only after clap
//!   and everything else passed, so nothing starts;
//! - the CNI configuration the init container writes is accepted by the
//!   plugin's own parser, and its endpoint directory is the agent's.
//!
//! The last tests feed the same checks broken input, so they are known to
//! fail when they should.
#![allow(clippy::unwrap_used)]

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::Command,
};

use serde::Deserialize as _;
use serde_norway::Value;

const NAMESPACE: &str = "clustermesh-system";
const VERSION: &str = env!("CARGO_PKG_VERSION");
/// Capabilities a container may add (the node agent's, agent.yaml says why).
const ALLOWED_CAPS: &[&str] = &["NET_ADMIN", "BPF", "PERFMON", "SYS_ADMIN"];
const CLUSTER_SCOPED: &[&str] = &["Namespace", "ClusterRole", "ClusterRoleBinding"];
const WORKLOADS: &[&str] = &["Deployment", "DaemonSet", "StatefulSet"];
/// etcd's official images.
const ETCD_IMAGES: &[&str] = &[
    "gcr.io/etcd-development/etcd:v3.",
    "quay.io/coreos/etcd:v3.",
];

/// Our images and the programs each holds (deploy/images/).
fn our_images() -> BTreeMap<String, &'static [&'static str]> {
    let reg = "ghcr.io/clustermesh";
    BTreeMap::from([
        (
            format!("{reg}/clustermesh-apiserver:{VERSION}"),
            &["clustermesh-apiserver"][..],
        ),
        (
            format!("{reg}/node-agent:{VERSION}"),
            &["node-agent", "clustermesh-cni", "clustermesh-wg"][..],
        ),
    ])
}

/// The programs of an image, None if it is not one we accept.
fn image_programs(image: &str) -> Option<Vec<&'static str>> {
    if let Some(p) = our_images().get(image) {
        return Some(p.to_vec());
    }
    if ETCD_IMAGES.iter().any(|p| image.starts_with(p)) {
        return Some(vec!["etcd"]);
    }
    None
}

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

// ---------------------------------------------------------------- parsing

#[derive(Debug, Clone)]
struct Doc {
    /// file#index, for messages
    at: String,
    v: Value,
}

fn parse_docs(file: &str, text: &str) -> Result<Vec<Doc>, String> {
    let mut out = Vec::new();
    for (i, de) in serde_norway::Deserializer::from_str(text).enumerate() {
        let v = Value::deserialize(de).map_err(|e| format!("{file}: document {i}: {e}"))?;
        if v.is_null() {
            continue;
        }
        out.push(Doc {
            at: format!("{file}#{i}"),
            v,
        });
    }
    Ok(out)
}

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "yaml" || x == "yml") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

fn get<'a>(v: &'a Value, path: &[&str]) -> Option<&'a Value> {
    path.iter().try_fold(v, |v, k| v.get(*k))
}

fn str_at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    get(v, path).and_then(Value::as_str)
}

fn seq_at<'a>(v: &'a Value, path: &[&str]) -> &'a [Value] {
    get(v, path)
        .and_then(Value::as_sequence)
        .map_or(&[][..], Vec::as_slice)
}

/// A mapping of strings (labels, selectors) as a map.
fn string_map(v: Option<&Value>) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    if let Some(m) = v.and_then(Value::as_mapping) {
        for (k, v) in m {
            if let (Some(k), Some(v)) = (k.as_str(), v.as_str()) {
                out.insert(k.to_owned(), v.to_owned());
            }
        }
    }
    out
}

fn strings(v: &[Value]) -> Vec<String> {
    v.iter()
        .map(|x| match x {
            Value::String(s) => s.clone(),
            Value::Number(n) => n.to_string(),
            Value::Bool(b) => b.to_string(),
            _ => String::new(),
        })
        .collect()
}

fn kind(d: &Doc) -> &str {
    str_at(&d.v, &["kind"]).unwrap_or_default()
}

fn name(d: &Doc) -> &str {
    str_at(&d.v, &["metadata", "name"]).unwrap_or_default()
}

fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 253
        && n.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
        && n.starts_with(|c: char| c.is_ascii_alphanumeric())
        && n.ends_with(|c: char| c.is_ascii_alphanumeric())
}

// ---------------------------------------------------------------- manifests

/// Objects other documents may refer to (ConfigMaps with their keys,
/// Secrets with their keys, ServiceAccounts, ClusterRoles).
#[derive(Default)]
struct Known {
    config_maps: BTreeMap<String, BTreeSet<String>>,
    secrets: BTreeMap<String, BTreeSet<String>>,
    service_accounts: BTreeSet<String>,
    cluster_roles: BTreeSet<String>,
}

impl Known {
    fn from_docs<'a>(docs: impl IntoIterator<Item = &'a Doc>) -> Self {
        let mut k = Known::default();
        for d in docs {
            let keys = |field: &str| -> BTreeSet<String> {
                get(&d.v, &[field])
                    .and_then(Value::as_mapping)
                    .map(|m| {
                        m.keys()
                            .filter_map(|k| k.as_str().map(str::to_owned))
                            .collect()
                    })
                    .unwrap_or_default()
            };
            match kind(d) {
                "ConfigMap" => {
                    k.config_maps.insert(name(d).to_owned(), keys("data"));
                }
                "Secret" => {
                    let mut all = keys("data");
                    all.extend(keys("stringData"));
                    k.secrets.insert(name(d).to_owned(), all);
                }
                "ServiceAccount" => {
                    k.service_accounts.insert(name(d).to_owned());
                }
                "ClusterRole" => {
                    k.cluster_roles.insert(name(d).to_owned());
                }
                _ => {}
            }
        }
        k
    }
}

/// Structural problems of a set of documents; `known` holds what they may
/// refer to (these documents and the examples).
fn check_docs(docs: &[Doc], known: &Known) -> Vec<String> {
    let mut p = Vec::new();
    let mut seen = BTreeSet::new();
    for d in docs {
        let at = &d.at;
        let api = str_at(&d.v, &["apiVersion"]).unwrap_or_default();
        let k = kind(d);
        if api.is_empty() {
            p.push(format!("{at}: no apiVersion"));
        }
        if k.is_empty() {
            p.push(format!("{at}: no kind"));
        }
        if k == "Kustomization" {
            continue;
        }
        let n = name(d);
        if !valid_name(n) {
            p.push(format!("{at}: metadata.name {n:?} is missing or invalid"));
        }
        let ns = str_at(&d.v, &["metadata", "namespace"]);
        if CLUSTER_SCOPED.contains(&k) {
            if ns.is_some() {
                p.push(format!(
                    "{at}: {k} {n} is cluster-scoped but has a namespace"
                ));
            }
        } else if ns != Some(NAMESPACE) {
            p.push(format!(
                "{at}: {k} {n} must be in namespace {NAMESPACE}, not {ns:?}"
            ));
        }
        if !seen.insert((k.to_owned(), n.to_owned())) {
            p.push(format!("{at}: {k} {n} is defined twice"));
        }
        if WORKLOADS.contains(&k) {
            check_workload(d, known, &mut p);
        }
        if k == "ClusterRoleBinding" || k == "RoleBinding" {
            let role = str_at(&d.v, &["roleRef", "name"]).unwrap_or_default();
            if str_at(&d.v, &["roleRef", "kind"]) == Some("ClusterRole")
                && !known.cluster_roles.contains(role)
            {
                p.push(format!("{at}: roleRef ClusterRole {role:?} is not defined"));
            }
            for s in seq_at(&d.v, &["subjects"]) {
                let sn = str_at(s, &["name"]).unwrap_or_default();
                if str_at(s, &["kind"]) == Some("ServiceAccount") {
                    if !known.service_accounts.contains(sn) {
                        p.push(format!(
                            "{at}: subject ServiceAccount {sn:?} is not defined"
                        ));
                    }
                    if str_at(s, &["namespace"]) != Some(NAMESPACE) {
                        p.push(format!(
                            "{at}: subject {sn:?} must name namespace {NAMESPACE}"
                        ));
                    }
                }
            }
        }
    }
    // Services select a workload's pods and target its named ports.
    for d in docs.iter().filter(|d| kind(d) == "Service") {
        let sel = string_map(get(&d.v, &["spec", "selector"]));
        if sel.is_empty() {
            p.push(format!("{}: Service {} has no selector", d.at, name(d)));
            continue;
        }
        let targets: Vec<&Doc> = docs
            .iter()
            .filter(|w| WORKLOADS.contains(&kind(w)))
            .filter(|w| {
                let labels = string_map(get(&w.v, &["spec", "template", "metadata", "labels"]));
                sel.iter().all(|(k, v)| labels.get(k) == Some(v))
            })
            .collect();
        if targets.is_empty() {
            p.push(format!(
                "{}: Service {} selects no workload ({sel:?})",
                d.at,
                name(d)
            ));
            continue;
        }
        let mut named_ports = BTreeSet::new();
        for w in &targets {
            for c in seq_at(&w.v, &["spec", "template", "spec", "containers"]) {
                for port in seq_at(c, &["ports"]) {
                    if let Some(n) = str_at(port, &["name"]) {
                        named_ports.insert(n.to_owned());
                    }
                }
            }
        }
        for port in seq_at(&d.v, &["spec", "ports"]) {
            if let Some(t) = str_at(port, &["targetPort"])
                && !named_ports.contains(t)
            {
                p.push(format!(
                    "{}: Service {} targets port {t:?}, which its pods do not name",
                    d.at,
                    name(d)
                ));
            }
        }
    }
    p
}

fn check_workload(d: &Doc, known: &Known, p: &mut Vec<String>) {
    let at = format!("{} ({} {})", d.at, kind(d), name(d));
    let sel = string_map(get(&d.v, &["spec", "selector", "matchLabels"]));
    let labels = string_map(get(&d.v, &["spec", "template", "metadata", "labels"]));
    if sel.is_empty() {
        p.push(format!("{at}: spec.selector.matchLabels is empty"));
    }
    for (k, v) in &sel {
        if labels.get(k) != Some(v) {
            p.push(format!(
                "{at}: selector {k}={v} does not match the template labels {labels:?}"
            ));
        }
    }
    let Some(pod) = get(&d.v, &["spec", "template", "spec"]) else {
        p.push(format!("{at}: no spec.template.spec"));
        return;
    };
    if let Some(sa) = str_at(pod, &["serviceAccountName"])
        && !known.service_accounts.contains(sa)
    {
        p.push(format!("{at}: ServiceAccount {sa:?} is not defined"));
    }
    let pod_non_root = get(pod, &["securityContext", "runAsNonRoot"]) == Some(&Value::Bool(true));
    let mut volumes = BTreeMap::new();
    for v in seq_at(pod, &["volumes"]) {
        let vn = str_at(v, &["name"]).unwrap_or_default().to_owned();
        if let Some(secret) = str_at(v, &["secret", "secretName"]) {
            match known.secrets.get(secret) {
                None => p.push(format!(
                    "{at}: volume {vn}: Secret {secret:?} is neither defined nor in examples/"
                )),
                Some(keys) => {
                    for item in seq_at(v, &["secret", "items"]) {
                        let key = str_at(item, &["key"]).unwrap_or_default();
                        if !keys.contains(key) {
                            p.push(format!(
                                "{at}: volume {vn}: Secret {secret} has no key {key:?}"
                            ));
                        }
                    }
                }
            }
        }
        volumes.insert(vn, get(v, &["hostPath"]).is_some());
    }
    let containers = seq_at(pod, &["containers"])
        .iter()
        .chain(seq_at(pod, &["initContainers"]));
    let mut any = false;
    for c in containers {
        any = true;
        let cn = str_at(c, &["name"]).unwrap_or_default();
        let at = format!("{at}: container {cn:?}");
        // The image and the program it runs.
        let image = str_at(c, &["image"]).unwrap_or_default();
        let command = strings(seq_at(c, &["command"]));
        match image_programs(image) {
            None => p.push(format!(
                "{at}: image {image:?} is not one of ours ({:?}) nor etcd's official one",
                our_images().keys().collect::<Vec<_>>()
            )),
            Some(progs) => {
                if command.is_empty() {
                    p.push(format!("{at}: no command: name the program it runs"));
                }
                for prog in programs(&command) {
                    if !progs.contains(&prog.as_str()) {
                        p.push(format!(
                            "{at}: runs {prog}, which image {image} does not hold"
                        ));
                    }
                }
            }
        }
        // Resources.
        for (path, what) in [
            (
                &["resources", "requests", "cpu"][..],
                "resources.requests.cpu",
            ),
            (
                &["resources", "requests", "memory"][..],
                "resources.requests.memory",
            ),
            (
                &["resources", "limits", "memory"][..],
                "resources.limits.memory",
            ),
        ] {
            if get(c, path).is_none() {
                p.push(format!("{at}: no {what}"));
            }
        }
        // Security context.
        let Some(sc) = get(c, &["securityContext"]) else {
            p.push(format!("{at}: no securityContext"));
            continue;
        };
        if get(sc, &["privileged"]) == Some(&Value::Bool(true)) {
            p.push(format!(
                "{at}: privileged (add explicit capabilities instead)"
            ));
        }
        if get(sc, &["allowPrivilegeEscalation"]) != Some(&Value::Bool(false)) {
            p.push(format!("{at}: allowPrivilegeEscalation must be false"));
        }
        if !strings(seq_at(sc, &["capabilities", "drop"])).contains(&"ALL".to_owned()) {
            p.push(format!("{at}: capabilities.drop must hold ALL"));
        }
        let added = strings(seq_at(sc, &["capabilities", "add"]));
        for cap in &added {
            if !ALLOWED_CAPS.contains(&cap.as_str()) {
                p.push(format!(
                    "{at}: adds capability {cap}, not one of {ALLOWED_CAPS:?}"
                ));
            }
        }
        if !added.is_empty() && get(pod, &["hostNetwork"]) != Some(&Value::Bool(true)) {
            p.push(format!("{at}: adds capabilities outside a hostNetwork pod"));
        }
        let mut host_paths = false;
        for m in seq_at(c, &["volumeMounts"]) {
            let mn = str_at(m, &["name"]).unwrap_or_default();
            match volumes.get(mn) {
                None => p.push(format!(
                    "{at}: mounts {mn:?}, which is not a volume of the pod"
                )),
                Some(true) => host_paths = true,
                Some(false) => {}
            }
        }
        let non_root = get(sc, &["runAsNonRoot"]) == Some(&Value::Bool(true)) || pod_non_root;
        if added.is_empty() && !host_paths && !non_root {
            p.push(format!(
                "{at}: adds no capability and mounts no host path, so it must run as non-root"
            ));
        }
        // Environment: $(VAR) references and ConfigMap keys.
        let mut env = BTreeSet::new();
        for e in seq_at(c, &["env"]) {
            let en = str_at(e, &["name"]).unwrap_or_default();
            env.insert(en.to_owned());
            if let Some(r) = get(e, &["valueFrom", "configMapKeyRef"]) {
                let cm = str_at(r, &["name"]).unwrap_or_default();
                let key = str_at(r, &["key"]).unwrap_or_default();
                match known.config_maps.get(cm) {
                    None => p.push(format!("{at}: env {en}: ConfigMap {cm:?} is not defined")),
                    Some(keys) if !keys.contains(key) => {
                        p.push(format!("{at}: env {en}: ConfigMap {cm} has no key {key:?}"))
                    }
                    Some(_) => {}
                }
            }
        }
        for word in command.iter().chain(&strings(seq_at(c, &["args"]))) {
            for var in var_refs(word) {
                if !env.contains(&var) {
                    p.push(format!("{at}: $({var}) is not an env var of the container"));
                }
            }
        }
    }
    if !any {
        p.push(format!("{at}: no containers"));
    }
}

/// Kubernetes' `$(VAR)` references in a command or argument.
fn var_refs(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = s;
    while let Some(i) = rest.find("$(") {
        let after = &rest[i + 2..];
        let Some(j) = after.find(')') else { break };
        let var = &after[..j];
        if !var.is_empty() && var.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            out.push(var.to_owned());
        }
        rest = &after[j..];
    }
    out
}

// ---------------------------------------------------------------- flags

/// A `--flag` given to a program, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FlagUse {
    program: String,
    flag: String,
    at: String,
}

fn basename(s: &str) -> &str {
    s.rsplit('/').next().unwrap_or(s)
}

/// `--name` of a word (`--name=value` too), None if it is not a long flag.
fn flag_of(word: &str) -> Option<String> {
    let w = word.trim_matches(|c| c == '"' || c == '\'');
    let body = w.strip_prefix("--")?;
    let body = body.split('=').next().unwrap_or_default();
    let ok = !body.is_empty()
        && body.starts_with(|c: char| c.is_ascii_alphanumeric())
        && body
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    ok.then(|| format!("--{body}"))
}

fn flags_in(words: &[String], program: &str, at: &str) -> Vec<FlagUse> {
    let mut out = Vec::new();
    for w in words {
        if w == "--" {
            break;
        }
        if let Some(flag) = flag_of(w) {
            out.push(FlagUse {
                program: program.to_owned(),
                flag,
                at: at.to_owned(),
            });
        }
    }
    out
}

fn is_shell(prog: &str) -> bool {
    matches!(basename(prog), "sh" | "bash" | "dash")
}

/// Shell commands of a script: (program, words after it, has "$@").
/// Continuation lines are joined; commands are split at newlines, `;`,
/// `&&`, `||` and `|`; `exec` and leading VAR=value are skipped.
fn shell_commands(script: &str) -> Vec<(String, Vec<String>)> {
    let joined = script.replace("\\\n", " ");
    let mut out = Vec::new();
    for line in joined.lines() {
        let line = line.replace("&&", "\n").replace("||", "\n");
        for seg in line.split(['\n', ';', '|']) {
            let mut words = seg.split_whitespace().map(str::to_owned).peekable();
            while words
                .peek()
                .is_some_and(|w| w == "exec" || (w.contains('=') && !w.starts_with('-')))
            {
                words.next();
            }
            let Some(prog) = words.next() else { continue };
            out.push((basename(&prog).to_owned(), words.collect()));
        }
    }
    out
}

/// The programs a container's command runs (the shell's commands for
/// `sh -c`).
fn programs(command: &[String]) -> Vec<String> {
    match command {
        [sh, c, script, ..] if is_shell(sh) && c == "-c" => shell_commands(script)
            .into_iter()
            .map(|(p, _)| p)
            .filter(|p| image_programs_all().contains(&p.as_str()))
            .collect(),
        [prog, ..] => vec![basename(prog).to_owned()],
        [] => vec![],
    }
}

/// Every program of our images and etcd.
fn image_programs_all() -> Vec<&'static str> {
    let mut all: Vec<&str> = our_images()
        .values()
        .flat_map(|p| p.iter().copied())
        .collect();
    all.push("etcd");
    all
}

/// Flags a container gives its programs. With `sh -c SCRIPT NAME ARGS...`
/// the script's commands get their own words, and a command with `"$@"`
/// also gets the container's remaining command words and its args.
fn container_flags(command: &[String], args: &[String], at: &str) -> Vec<FlagUse> {
    let mut out = Vec::new();
    match command {
        [sh, c, script, rest @ ..] if is_shell(sh) && c == "-c" => {
            // rest[0] is $0; "$@" is the rest and then args.
            let positional: Vec<String> = rest.iter().skip(1).chain(args).cloned().collect();
            for (prog, words) in shell_commands(script) {
                out.extend(flags_in(&words, &prog, at));
                if words.iter().any(|w| w.contains("\"$@\"")) {
                    out.extend(flags_in(&positional, &prog, at));
                }
            }
        }
        [prog, rest @ ..] => {
            let words: Vec<String> = rest.iter().chain(args).cloned().collect();
            out.extend(flags_in(&words, basename(prog), at));
        }
        [] => {}
    }
    out
}

fn manifest_flags(docs: &[Doc]) -> Vec<FlagUse> {
    let mut out = Vec::new();
    for d in docs.iter().filter(|d| WORKLOADS.contains(&kind(d))) {
        let pod = get(&d.v, &["spec", "template", "spec"]);
        let containers = pod
            .map(|p| {
                seq_at(p, &["containers"])
                    .iter()
                    .chain(seq_at(p, &["initContainers"]))
            })
            .into_iter()
            .flatten();
        for c in containers {
            let at = format!(
                "{} container {}",
                d.at,
                str_at(c, &["name"]).unwrap_or_default()
            );
            out.extend(container_flags(
                &strings(seq_at(c, &["command"])),
                &strings(seq_at(c, &["args"])),
                &at,
            ));
        }
    }
    out
}

/// Flags of `Exec*=` lines of a systemd unit (continuations joined).
fn unit_flags(file: &str, text: &str) -> Vec<FlagUse> {
    let joined = text.replace("\\\n", " ");
    let mut out = Vec::new();
    for line in joined.lines() {
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        if !key.trim().starts_with("Exec") {
            continue;
        }
        let value = value.trim_start_matches(['-', '@', ':', '+', '!']);
        let words: Vec<String> = value.split_whitespace().map(str::to_owned).collect();
        let Some((prog, rest)) = words.split_first() else {
            continue;
        };
        if is_shell(prog) {
            continue; // ExecStartPre=/bin/sh -c '...': host tools only
        }
        out.extend(flags_in(rest, basename(prog), &format!("{file} {key}")));
    }
    out
}

/// Flags of an environment-file example: `EXTRA_ARGS=` for `program`, and
/// for etcd each `ETCD_FOO_BAR=` as `--foo-bar`.
fn env_file_flags(file: &str, text: &str, program: &str) -> Vec<FlagUse> {
    let mut out = Vec::new();
    for line in text.lines().filter(|l| !l.trim_start().starts_with('#')) {
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        let at = format!("{file} {key}");
        if key == "EXTRA_ARGS" {
            let words: Vec<String> = value.split_whitespace().map(str::to_owned).collect();
            out.extend(flags_in(&words, program, &at));
        } else if program == "etcd"
            && let Some(var) = key.strip_prefix("ETCD_")
        {
            out.push(FlagUse {
                program: "etcd".into(),
                flag: format!("--{}", var.to_ascii_lowercase().replace('_', "-")),
                at,
            });
        }
    }
    out
}

/// Every `--flag` a help text mentions.
fn help_flags(help: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (i, _) in help.match_indices("--") {
        let body: String = help[i + 2..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
            .collect();
        if !body.is_empty() {
            out.insert(format!("--{body}"));
        }
    }
    out
}

/// Uses whose flag the program's help does not list; programs without a
/// help text (not ours, or not installed) are skipped.
fn unknown_flags(uses: &[FlagUse], helps: &BTreeMap<String, BTreeSet<String>>) -> Vec<String> {
    uses.iter()
        .filter_map(|u| {
            let known = helps.get(&u.program)?;
            (!known.contains(&u.flag)).then(|| {
                format!(
                    "{}: {} has no flag {} (see {} --help)",
                    u.at, u.program, u.flag, u.program
                )
            })
        })
        .collect()
}

fn help_of(program: &Path) -> Option<String> {
    let out = Command::new(program).arg("--help").output().ok()?;
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    Some(text)
}

// ---------------------------------------------------------------- the deploy tree

struct Deploy {
    /// deploy/kubernetes without examples/
    manifests: Vec<Doc>,
    examples: Vec<Doc>,
}

fn load() -> Deploy {
    let root = deploy_dir().join("kubernetes");
    let (mut manifests, mut examples) = (Vec::new(), Vec::new());
    for f in yaml_files(&root) {
        let rel = f.strip_prefix(&root).unwrap().display().to_string();
        let text = std::fs::read_to_string(&f).unwrap();
        let docs = parse_docs(&format!("deploy/kubernetes/{rel}"), &text).unwrap();
        assert!(!docs.is_empty(), "{rel} holds no document");
        if rel.starts_with("examples/") {
            examples.extend(docs);
        } else {
            manifests.extend(docs);
        }
    }
    Deploy {
        manifests,
        examples,
    }
}

#[test]
fn manifests_parse_and_are_consistent() {
    let d = load();
    let known = Known::from_docs(d.manifests.iter().chain(&d.examples));
    let mut problems = check_docs(&d.manifests, &known);
    problems.extend(check_docs(&d.examples, &known));
    assert!(
        problems.is_empty(),
        "deploy/kubernetes:\n  {}",
        problems.join("\n  ")
    );
    // What the manifests are for.
    for (k, n) in [
        ("Namespace", NAMESPACE),
        ("Deployment", "clustermesh-apiserver"),
        ("Service", "clustermesh-apiserver"),
        ("ServiceAccount", "clustermesh-apiserver"),
        ("ClusterRole", "clustermesh-apiserver"),
        ("ClusterRoleBinding", "clustermesh-apiserver"),
        ("DaemonSet", "clustermesh-agent"),
        ("ConfigMap", "clustermesh-config"),
    ] {
        assert!(
            d.manifests.iter().any(|x| kind(x) == k && name(x) == n),
            "no {k} {n} in deploy/kubernetes"
        );
    }
    assert!(
        known.secrets.contains_key("clustermesh-remote-clusters"),
        "no example of the remote-clusters Secret"
    );
}

#[test]
fn kustomization_lists_every_manifest() {
    let root = deploy_dir().join("kubernetes");
    let text = std::fs::read_to_string(root.join("kustomization.yaml")).unwrap();
    let k = &parse_docs("kustomization.yaml", &text).unwrap()[0].v;
    let listed: BTreeSet<String> = strings(seq_at(k, &["resources"])).into_iter().collect();
    for r in &listed {
        assert!(
            root.join(r).is_file(),
            "kustomization lists {r}, which does not exist"
        );
    }
    for f in yaml_files(&root) {
        let rel = f.strip_prefix(&root).unwrap().display().to_string();
        if rel == "kustomization.yaml" || rel.starts_with("examples/") {
            continue;
        }
        assert!(
            listed.contains(&rel),
            "kustomization.yaml does not list {rel}"
        );
    }
}

#[test]
fn apiserver_watches_kubernetes_with_the_rbac_it_needs() {
    let d = load();
    let dep = d
        .manifests
        .iter()
        .find(|x| kind(x) == "Deployment" && name(x) == "clustermesh-apiserver")
        .unwrap();
    let pod = get(&dep.v, &["spec", "template", "spec"]).unwrap();
    let apiserver = seq_at(pod, &["containers"])
        .iter()
        .find(|c| programs(&strings(seq_at(c, &["command"]))) == ["clustermesh-apiserver"])
        .expect("a container running clustermesh-apiserver");
    assert!(
        strings(seq_at(apiserver, &["args"])).contains(&"--kubernetes".to_owned()),
        "the apiserver must run with --kubernetes"
    );
    let sa = str_at(pod, &["serviceAccountName"]).unwrap();
    let binding = d
        .manifests
        .iter()
        .find(|x| {
            kind(x) == "ClusterRoleBinding"
                && seq_at(&x.v, &["subjects"])
                    .iter()
                    .any(|s| str_at(s, &["name"]) == Some(sa))
        })
        .expect("a ClusterRoleBinding for the apiserver's ServiceAccount");
    let role_name = str_at(&binding.v, &["roleRef", "name"]).unwrap();
    let role = d
        .manifests
        .iter()
        .find(|x| kind(x) == "ClusterRole" && name(x) == role_name)
        .unwrap();
    for (group, resource) in [
        ("", "nodes"),
        ("", "services"),
        ("", "namespaces"),
        ("discovery.k8s.io", "endpointslices"),
        ("cilium.io", "ciliumnetworkpolicies"),
        ("cilium.io", "ciliumclusterwidenetworkpolicies"),
        ("networking.k8s.io", "networkpolicies"),
    ] {
        for verb in ["get", "list", "watch"] {
            let granted = seq_at(&role.v, &["rules"]).iter().any(|r| {
                strings(seq_at(r, &["apiGroups"]))
                    .iter()
                    .any(|g| g == group)
                    && strings(seq_at(r, &["resources"]))
                        .iter()
                        .any(|x| x == resource)
                    && strings(seq_at(r, &["verbs"])).iter().any(|v| v == verb)
            });
            assert!(
                granted,
                "ClusterRole {role_name} does not grant {verb} on {group}/{resource}"
            );
        }
    }
    // Read only: the apiserver writes nothing into the Kubernetes API.
    for r in seq_at(&role.v, &["rules"]) {
        let verbs = strings(seq_at(r, &["verbs"]));
        assert!(
            verbs
                .iter()
                .all(|v| ["get", "list", "watch"].contains(&v.as_str())),
            "ClusterRole {role_name} grants more than reading: {verbs:?}"
        );
    }
}

/// The flag value a list of words gives (`--flag value` or `--flag=value`).
fn flag_value(words: &[String], flag: &str) -> Option<String> {
    words.iter().enumerate().find_map(|(i, w)| {
        if w == flag {
            words.get(i + 1).cloned()
        } else {
            w.strip_prefix(&format!("{flag}=")).map(str::to_owned)
        }
    })
}

#[test]
fn cni_configuration_is_accepted_by_the_plugin() {
    let d = load();
    let ds = d
        .manifests
        .iter()
        .find(|x| kind(x) == "DaemonSet" && name(x) == "clustermesh-agent")
        .unwrap();
    let pod = get(&ds.v, &["spec", "template", "spec"]).unwrap();
    let init = seq_at(pod, &["initContainers"])
        .iter()
        .find(|c| str_at(c, &["name"]) == Some("install-cni"))
        .expect("an install-cni init container");
    let script = &strings(seq_at(init, &["command"]))[2];
    // The here-document the script writes, with this node's values.
    let conf = script
        .split_once("<<CONF\n")
        .and_then(|(_, rest)| rest.split_once("\nCONF"))
        .map(|(conf, _)| conf)
        .expect("the CNI configuration as a <<CONF here-document");
    let cm = d
        .manifests
        .iter()
        .find(|x| kind(x) == "ConfigMap" && name(x) == "clustermesh-config")
        .unwrap();
    let mtu = str_at(&cm.v, &["data", "pod-mtu"]).unwrap();
    let conf = conf
        .replace("${cidr}", "10.1.3.0/24")
        .replace("${POD_MTU}", mtu);
    let parsed = clustermesh_cni::config::Config::parse(conf.as_bytes())
        .unwrap_or_else(|e| panic!("clustermesh-cni refuses the configuration: {e}\n{conf}"));
    assert_eq!(parsed.mtu.to_string(), mtu);
    let v: serde_json::Value = serde_json::from_str(&conf).unwrap();
    assert_eq!(
        v["type"], "clustermesh-cni",
        "the runtime runs the plugin by this name"
    );
    // The agent reads the endpoint files where the plugin writes them, on
    // a host path.
    let agent = seq_at(pod, &["containers"])
        .iter()
        .find(|c| programs(&strings(seq_at(c, &["command"]))) == ["node-agent"])
        .unwrap();
    let dir = flag_value(&strings(seq_at(agent, &["args"])), "--endpoint-dir").unwrap();
    assert_eq!(Path::new(&dir), parsed.endpoint_dir);
    let host_path_mounted = seq_at(agent, &["volumeMounts"]).iter().any(|m| {
        let mounted = str_at(m, &["mountPath"]).unwrap_or_default();
        let vol = str_at(m, &["name"]).unwrap_or_default();
        Path::new(&dir).starts_with(mounted)
            && seq_at(pod, &["volumes"]).iter().any(|v| {
                str_at(v, &["name"]) == Some(vol)
                    && str_at(v, &["hostPath", "path"]) == Some(mounted)
            })
    });
    assert!(
        host_path_mounted,
        "{dir} is not on a host path of the same name"
    );
    // And the file lands where the runtime looks.
    assert!(script.contains("/host/etc/cni/net.d/10-clustermesh.conf"));
    assert!(script.contains("/host/opt/cni/bin/clustermesh-cni"));
}

#[test]
fn images_hold_the_programs_the_manifests_run() {
    let images = deploy_dir().join("images");
    for (image, progs) in our_images() {
        let short = image
            .rsplit('/')
            .next()
            .and_then(|s| s.split(':').next())
            .unwrap();
        let file = images.join(format!("{short}.Dockerfile"));
        let text =
            std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        for p in progs {
            assert!(
                text.contains(&format!("/usr/local/bin/{p}")),
                "{} does not install /usr/local/bin/{p}",
                file.display()
            );
        }
    }
}

#[test]
fn every_flag_exists_in_its_binary() {
    let d = load();
    let mut uses = manifest_flags(&d.manifests);
    let systemd = deploy_dir().join("systemd");
    for e in std::fs::read_dir(&systemd).unwrap() {
        let path = e.unwrap().path();
        let file = format!(
            "deploy/systemd/{}",
            path.file_name().unwrap().to_string_lossy()
        );
        let text = std::fs::read_to_string(&path).unwrap();
        let fname = path.file_name().unwrap().to_string_lossy().into_owned();
        if fname.ends_with(".service") {
            uses.extend(unit_flags(&file, &text));
        } else if let Some(stem) = fname.strip_suffix(".env.example") {
            let program = match stem {
                "apiserver" => "clustermesh-apiserver",
                "node-agent" => "node-agent",
                "etcd" => "etcd",
                other => panic!("{file}: which program is {other}?"),
            };
            uses.extend(env_file_flags(&file, &text, program));
        }
    }
    // Each of our programs is given flags somewhere; each is checked.
    for p in ["clustermesh-apiserver", "node-agent", "etcd"] {
        assert!(
            uses.iter().any(|u| u.program == p),
            "no flags of {p} found: is the extraction broken?"
        );
    }
    let mut helps = BTreeMap::new();
    for p in [
        "clustermesh-apiserver",
        "node-agent",
        "clustermesh-wg",
        "clustermesh-cni",
    ] {
        let bin = e2e::product::binary(p);
        let help = help_of(&bin).unwrap_or_else(|| panic!("{} --help did not run", bin.display()));
        helps.insert(p.to_owned(), help_flags(&help));
    }
    assert!(
        helps["node-agent"].contains("--clusters-dir"),
        "node-agent --help unreadable"
    );
    match help_of(Path::new("etcd")) {
        Some(h) if help_flags(&h).contains("--listen-client-urls") => {
            helps.insert("etcd".to_owned(), help_flags(&h));
        }
        _ => eprintln!("etcd is not installed: its flags are not checked"),
    }
    let bad = unknown_flags(&uses, &helps);
    assert!(bad.is_empty(), "unknown flags:\n  {}", bad.join("\n  "));
    eprintln!("{} flag uses checked", uses.len());
}

/// A container's args with Kubernetes' `$(VAR)` expansion done: env
/// values, ConfigMap keys, and made-up values for the downward API.
fn resolved_args(c: &Value, config_maps: &[Doc]) -> Vec<String> {
    let mut env = BTreeMap::new();
    for e in seq_at(c, &["env"]) {
        let n = str_at(e, &["name"]).unwrap_or_default().to_owned();
        let v = if let Some(v) = str_at(e, &["value"]) {
            v.to_owned()
        } else if let Some(r) = get(e, &["valueFrom", "configMapKeyRef"]) {
            let cm = config_maps
                .iter()
                .find(|d| kind(d) == "ConfigMap" && Some(name(d)) == str_at(r, &["name"]))
                .unwrap();
            str_at(&cm.v, &["data", str_at(r, &["key"]).unwrap()])
                .unwrap()
                .to_owned()
        } else {
            match str_at(e, &["valueFrom", "fieldRef", "fieldPath"]) {
                Some("spec.nodeName") => "node-1".to_owned(),
                Some("status.hostIP") => "192.0.2.11".to_owned(),
                other => panic!("env {n}: no made-up value for {other:?}"),
            }
        };
        env.insert(n, v);
    }
    strings(seq_at(c, &["args"]))
        .into_iter()
        .map(|mut a| {
            for (k, v) in &env {
                a = a.replace(&format!("$({k})"), v);
            }
            a
        })
        .collect()
}

fn workload_container<'a>(d: &'a Deploy, kind_: &str, program: &str) -> &'a Value {
    d.manifests
        .iter()
        .filter(|x| kind(x) == kind_)
        .flat_map(|x| seq_at(&x.v, &["spec", "template", "spec", "containers"]))
        .find(|c| programs(&strings(seq_at(c, &["command"]))) == [program])
        .unwrap_or_else(|| panic!("no {kind_} container runs {program}"))
}

/// node-agent parses `args` (clap: values, `requires`) and gets as far as
/// its own checks: a failover threshold of 2, added last, is the one
/// error expected; nothing is touched before it.
fn assert_agent_accepts(mut args: Vec<String>, what: &str) {
    args.extend(["--lb-failover-threshold".to_owned(), "2".to_owned()]);
    let out = Command::new(e2e::product::binary("node-agent"))
        .args(&args)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--lb-failover-threshold: 2 must be a fraction"),
        "{what}: node-agent {args:?}:\n{err}"
    );
    // A configuration error, named: exit status 64.
    assert_eq!(out.status.code(), Some(64), "{what}: {err}");
}

/// clustermesh-apiserver parses `args` and validates its configuration
/// (before dialling etcd): the key files it names are made in a temporary
/// directory, `--kubernetes` is left out (it needs a cluster; the flag
/// test covers it), and a heartbeat interval above the lease TTL, added
/// last, is the one error expected.
fn assert_apiserver_accepts(args: Vec<String>, what: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let mut run = Vec::new();
    for a in args {
        if a == "--kubernetes" {
            continue;
        }
        if a.starts_with("/etc/clustermesh/") {
            let p = tmp.path().join(a.trim_start_matches('/'));
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, "").unwrap();
            run.push(p.display().to_string());
        } else {
            run.push(a);
        }
    }
    run.extend(["--heartbeat-interval".to_owned(), "100".to_owned()]);
    let out = Command::new(e2e::product::binary("clustermesh-apiserver"))
        .args(&run)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.code() == Some(64) && err.contains("heartbeat_interval"),
        "{what}: clustermesh-apiserver {run:?} stopped on something else ({:?}):\n{err}",
        out.status.code()
    );
}

/// The binaries accept the manifests' arguments with the ConfigMap's
/// values.
#[test]
fn binaries_accept_the_manifests_arguments() {
    let d = load();
    let agent = workload_container(&d, "DaemonSet", "node-agent");
    // --pod-cidr is added by the container's shell from the init
    // container's file.
    let mut args = vec!["--pod-cidr".to_owned(), "10.1.3.0/24".to_owned()];
    args.extend(resolved_args(agent, &d.manifests));
    assert_agent_accepts(args, "agent.yaml");
    let api = workload_container(&d, "Deployment", "clustermesh-apiserver");
    assert_apiserver_accepts(resolved_args(api, &d.manifests), "apiserver.yaml");
}

/// A unit's `ExecStart=` words (continuations joined).
fn exec_start(text: &str) -> Vec<String> {
    let joined = text.replace("\\\n", " ");
    let line = joined
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("an ExecStart= line");
    line.split_whitespace().map(str::to_owned).collect()
}

/// `KEY=value` lines of an environment file.
fn env_file(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect()
}

/// systemd's expansion: `${VAR}` stays one word, a word that is just
/// `$VAR` is split at whitespace.
fn systemd_expand(words: &[String], env: &BTreeMap<String, String>) -> Vec<String> {
    let mut out = Vec::new();
    for w in words {
        if let Some(var) = w.strip_prefix('$').filter(|v| !v.starts_with('{')) {
            let v = env.get(var).map(String::as_str).unwrap_or_default();
            out.extend(v.split_whitespace().map(str::to_owned));
            continue;
        }
        let mut w = w.clone();
        for (k, v) in env {
            w = w.replace(&format!("${{{k}}}"), v);
        }
        assert!(
            !w.contains("${"),
            "{w}: a variable the environment example lacks"
        );
        out.push(w);
    }
    out
}

/// The systemd units with their environment-file examples.
#[test]
fn binaries_accept_the_systemd_units_arguments() {
    let dir = deploy_dir().join("systemd");
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap();
    let args = |unit: &str, env: &str| {
        let words = exec_start(&read(unit));
        systemd_expand(&words[1..], &env_file(&read(env)))
    };
    assert_agent_accepts(
        args("node-agent.service", "node-agent.env.example"),
        "node-agent.service",
    );
    assert_apiserver_accepts(
        args("clustermesh-apiserver.service", "apiserver.env.example"),
        "clustermesh-apiserver.service",
    );
}

// ---------------------------------------------------------------- the checks fail when they should

fn fake_helps() -> BTreeMap<String, BTreeSet<String>> {
    let help = "Options:\n      --cluster-name <CLUSTER_NAME>  This node's cluster\n      \
                --pod-cidr <POD_CIDR>\n      --kubernetes  watch\n  -h, --help  Print help";
    BTreeMap::from([
        ("node-agent".to_owned(), help_flags(help)),
        ("clustermesh-apiserver".to_owned(), help_flags(help)),
    ])
}

#[test]
fn a_misspelt_flag_is_reported() {
    let helps = fake_helps();
    let s = |v: &[&str]| v.iter().map(|x| (*x).to_owned()).collect::<Vec<_>>();
    // Plain command + args.
    let uses = container_flags(
        &s(&["/usr/local/bin/node-agent"]),
        &s(&["--cluster-name", "c1", "--cluster-nmae=c1"]),
        "plain",
    );
    assert_eq!(
        unknown_flags(&uses, &helps),
        ["plain: node-agent has no flag --cluster-nmae (see node-agent --help)"]
    );
    // sh -c with "$@": flags in the script and in args.
    let uses = container_flags(
        &s(&[
            "/bin/sh",
            "-c",
            "set -eu\nexec /usr/local/bin/node-agent --pod-cidr \"$(cat f)\" --pod-cdir x \"$@\"",
            "node-agent",
        ]),
        &s(&["--cluster-name", "c1", "--custer-name", "c1"]),
        "shell",
    );
    let bad = unknown_flags(&uses, &helps);
    assert_eq!(bad.len(), 2, "{bad:?}");
    assert!(
        bad[0].contains("--pod-cdir") && bad[1].contains("--custer-name"),
        "{bad:?}"
    );
    // A shell's other commands are not ours.
    let uses = container_flags(
        &s(&[
            "sh",
            "-c",
            "curl --cacert x https://y | grep -o z && cp a b",
        ]),
        &[],
        "tools",
    );
    assert!(unknown_flags(&uses, &helps).is_empty());
    // systemd, with continuation lines.
    let unit = "[Service]\nExecStartPre=/bin/sh -c 'mount --bogus'\nExecStart=/usr/local/bin/clustermesh-apiserver \\\n  --kubernetes \\\n  --kubernets\n";
    let bad = unknown_flags(&unit_flags("u.service", unit), &helps);
    assert_eq!(
        bad,
        [
            "u.service ExecStart: clustermesh-apiserver has no flag --kubernets (see clustermesh-apiserver --help)"
        ]
    );
    // An environment file's EXTRA_ARGS.
    let bad = unknown_flags(
        &env_file_flags(
            "a.env",
            "# --nothing\nEXTRA_ARGS=--kubernetes --kube\n",
            "clustermesh-apiserver",
        ),
        &helps,
    );
    assert_eq!(bad.len(), 1, "{bad:?}");
    assert!(bad[0].contains("--kube "), "{bad:?}");
}

#[test]
fn a_broken_manifest_is_reported() {
    let yaml = format!(
        r#"
apiVersion: v1
kind: ConfigMap
metadata: {{name: cfg, namespace: {NAMESPACE}}}
data: {{cluster-name: c1}}
---
apiVersion: apps/v1
kind: Deployment
metadata: {{name: broken, namespace: {NAMESPACE}}}
spec:
  selector: {{matchLabels: {{app: one}}}}
  template:
    metadata: {{labels: {{app: two}}}}
    spec:
      serviceAccountName: nobody
      containers:
        - name: web
          image: nginx:latest
          command: [nginx]
        - name: api
          image: ghcr.io/clustermesh/clustermesh-apiserver:{VERSION}
          command: [/usr/local/bin/node-agent]
          args: [--cluster-name, $(CLUSTER), --cluster-id, $(ID)]
          env:
            - name: CLUSTER
              valueFrom: {{configMapKeyRef: {{name: cfg, key: cluster}}}}
          resources: {{requests: {{cpu: 10m, memory: 10Mi}}, limits: {{memory: 20Mi}}}}
          securityContext:
            privileged: true
            allowPrivilegeEscalation: false
            capabilities: {{drop: [ALL], add: [SYS_MODULE]}}
          volumeMounts: [{{name: missing, mountPath: /x}}]
---
apiVersion: v1
kind: Service
metadata: {{name: broken}}
spec:
  selector: {{app: three}}
  ports: [{{port: 1}}]
---
kind: Secret
metadata: {{name: Bad_Name, namespace: {NAMESPACE}}}
"#
    );
    let docs = parse_docs("broken.yaml", &yaml).unwrap();
    let known = Known::from_docs(&docs);
    let problems = check_docs(&docs, &known).join("\n");
    for expected in [
        "selector app=one does not match the template labels",
        "ServiceAccount \"nobody\" is not defined",
        "image \"nginx:latest\" is not one of ours",
        "container \"web\": no resources.requests.cpu",
        "container \"web\": no securityContext",
        "runs node-agent, which image ghcr.io/clustermesh/clustermesh-apiserver",
        "$(ID) is not an env var of the container",
        "env CLUSTER: ConfigMap cfg has no key \"cluster\"",
        "privileged (add explicit capabilities instead)",
        "adds capability SYS_MODULE",
        "adds capabilities outside a hostNetwork pod",
        "mounts \"missing\", which is not a volume of the pod",
        "Service broken must be in namespace clustermesh-system",
        "Service broken selects no workload",
        "#3: no apiVersion",
        "metadata.name \"Bad_Name\" is missing or invalid",
    ] {
        assert!(
            problems.contains(expected),
            "{expected:?} not reported in:\n{problems}"
        );
    }
    // Not YAML at all.
    assert!(parse_docs("x.yaml", "a: [b\n").is_err());
}
