//! Packaging and deployment: deploy/ and the Dockerfile against the code, and the docs against
//! `src/config.rs`. Nothing here needs a cluster or a Docker engine.
//!
//! - `kubectl kustomize` renders deploy/ and its overlays (without kubectl, a built-in subset of
//!   kustomize does, and says so); every object is validated against the Kubernetes schemas
//!   (kubernetes-validate, offline), the custom resources field by field, the NetworkPolicies with
//!   each commented variant in place, and the rendering is checked against the code: probes on the
//!   metrics port, env names `config.rs` reads, values `Config::from_map` accepts, the drain timing,
//!   one image, the `restricted` Pod Security Standard and Guaranteed QoS, who the metrics port
//!   admits, the Vault variant kept alike with its own egress (tests/deploy/check.py does the YAML
//!   side).
//! - The operator docs against deploy/ and the code: the prerequisites name every shipped Secret
//!   the router refuses, profile and custom kind; the namespace list names every file naming it;
//!   figures, error details, log lines, metrics and alerts are real; the configuration snippets
//!   parse and fit each runtime.
//! - hadolint on the Dockerfile; the build context `.dockerignore` leaves loads the workspace with
//!   the lockfile, as the tree does; the binary's libraries exist in the runtime image.
//! - Every variable `config.rs` reads is in README.md's configuration table, and nothing else is.
//!
//! The Python tools live in a venv under target/ (tests/deploy/requirements.txt), made once and
//! reused; a lock keeps two tests from making it at once.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use harbor_router::config::Config;

/// Every variable the router reads: the `ENV_*` constants of src/config.rs, and `X_FILE` for each
/// variable read through `string_or_file`.
fn config_env_names() -> BTreeSet<String> {
    let src = std::fs::read_to_string("src/config.rs").unwrap();
    let mut consts = BTreeMap::new();
    for line in src.lines() {
        let Some(rest) = line.trim().strip_prefix("pub const ENV_") else {
            continue;
        };
        let (name, value) = rest.split_once(": &str = ").unwrap();
        let value = value.trim_end_matches(';').trim_matches('"');
        consts.insert(format!("ENV_{name}"), value.to_string());
    }
    assert!(consts.len() >= 40, "{consts:?}");
    let mut names: BTreeSet<String> = consts.values().cloned().collect();
    let mut rest = src.as_str();
    while let Some(i) = rest.find("string_or_file(") {
        rest = &rest[i + "string_or_file(".len()..];
        let arg = rest.trim_start();
        let end = arg
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap();
        if let Some(v) = consts.get(&arg[..end]) {
            names.insert(format!("{v}_FILE"));
        }
    }
    assert!(names.contains("HARBOR_PASSWORD_FILE") && names.contains("REDIS_PASSWORD_FILE"));
    names
}

/// The venv with tests/deploy/requirements.txt installed; made (again) when the requirements change.
fn venv() -> PathBuf {
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(tmp).unwrap();
    let lock = std::fs::File::create(tmp.join("deploy-venv.lock")).unwrap();
    // SAFETY: flock on a descriptor this function owns; released when `lock` is dropped.
    assert_eq!(unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) }, 0);
    let dir = tmp.join("deploy-venv");
    let requirements = std::fs::read_to_string("tests/deploy/requirements.txt").unwrap();
    let stamp = dir.join("requirements.installed");
    if std::fs::read_to_string(&stamp).ok().as_deref() == Some(requirements.as_str()) {
        return dir;
    }
    let _ = std::fs::remove_dir_all(&dir);
    let ok = Command::new("python3")
        .args(["-m", "venv"])
        .arg(&dir)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        ok,
        "python3 -m venv failed: python3 and python3-venv are needed (scripts/test.sh installs them)"
    );
    let ok = Command::new(dir.join("bin/pip"))
        .args([
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "-r",
            "tests/deploy/requirements.txt",
        ])
        .status()
        .unwrap()
        .success();
    assert!(ok, "pip install -r tests/deploy/requirements.txt failed");
    std::fs::write(&stamp, requirements).unwrap();
    dir
}

/// Runs tests/deploy/check.py (its lines go straight to the test's output) and returns its report.
fn check(name: &str, args: &[&str]) -> serde_json::Value {
    let venv = venv();
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("deploy-{name}.json"));
    let status = Command::new(venv.join("bin/python"))
        .arg("tests/deploy/check.py")
        .arg(name)
        .args(args)
        .arg("--out")
        .arg(&out)
        .status()
        .unwrap();
    assert!(
        status.success(),
        "tests/deploy/check.py {name} found problems (listed above)"
    );
    serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap()
}

/// What the router accepts in the file of `<var>_FILE`: a secret, a user name, or for TLS a
/// certificate and its key (one pair, made once: what cert-manager's Secret holds), the
/// certificate also standing for a CA file.
fn good_file(var: &str) -> String {
    static PAIR: std::sync::OnceLock<(String, String)> = std::sync::OnceLock::new();
    let (cert, key) = PAIR.get_or_init(|| {
        let p =
            rcgen::generate_simple_self_signed(vec!["harbor-router.harbor.svc".into()]).unwrap();
        (p.cert.pem(), p.key_pair.serialize_pem())
    });
    match var {
        "TLS_CERT" | "REDIS_CA" | "HARBOR_CA" => cert.clone(),
        "TLS_KEY" => key.clone(),
        v if v.ends_with("USERNAME") => "robot$harbor-router\n".into(),
        _ => "s3cret\n".into(),
    }
}

/// The router's configuration for the environment a rendering gives its container, with the files
/// the `*_FILE` variables name stood in for by real ones.
fn config_of(what: &str, env: &serde_json::Value) -> Config {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("deploy-env-{}", what.replace(['/', '.'], "-")));
    std::fs::create_dir_all(&dir).unwrap();
    let mut map = HashMap::new();
    for (name, value) in env.as_object().unwrap() {
        let mut value = value.as_str().unwrap().to_string();
        if let Some(var) = name.strip_suffix("_FILE") {
            let file = dir.join(var);
            std::fs::write(&file, good_file(var)).unwrap();
            value = file.to_string_lossy().into_owned();
        }
        map.insert(name.clone(), value);
    }
    Config::from_map(&map)
        .unwrap_or_else(|e| panic!("{what}: the router refuses its environment: {e}"))
}

/// The report of `check.py kube`, made once for every test that reads it (they run in parallel and
/// would otherwise write the same file at once).
fn kube_report() -> &'static serde_json::Value {
    static REPORT: std::sync::OnceLock<serde_json::Value> = std::sync::OnceLock::new();
    REPORT.get_or_init(|| {
        let names: Vec<String> = config_env_names().into_iter().collect();
        check("kube", &["--env-names", &names.join(",")])
    })
}

/// Every Deployment `kubectl apply` can be pointed at: the renderings and the Vault file.
fn every_deployment(report: &serde_json::Value) -> Vec<(String, &serde_json::Value)> {
    let mut all: Vec<(String, &serde_json::Value)> = report["renderings"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v))
        .collect();
    all.push(("deploy/deployment-vault.yaml".into(), &report["vault"]));
    all
}

/// A CIDR's prefix length (`10.0.0.0/8` → 8).
fn prefix_len(cidr: &str) -> u32 {
    cidr.rsplit_once('/').unwrap().1.parse().unwrap()
}

#[test]
fn the_kustomizations_render_validate_and_agree_with_the_code() {
    let report = kube_report();
    let mut checked = Vec::new();
    let renderings = report["renderings"].as_object().unwrap();
    assert_eq!(renderings.len(), 3, "{renderings:?}");
    for (what, r) in every_deployment(report) {
        let config = config_of(&what, &r["env"]);
        assert!(
            config.harbor_credentials.is_some(),
            "{what}: no robot account"
        );
        // The container ports are where the router listens.
        assert_eq!(
            r["ports"]["registry"].as_u64(),
            Some(u64::from(config.listen_addr.port())),
            "{what}: the registry port is not LISTEN_ADDR's"
        );
        assert_eq!(
            r["ports"]["metrics"].as_u64(),
            Some(u64::from(config.metrics_addr.port())),
            "{what}: the metrics port is not METRICS_ADDR's"
        );
        // The kubelet waits out the preStop sleep and the drain before it kills.
        let grace = Duration::from_secs(r["termination_grace_seconds"].as_u64().unwrap());
        let prestop = Duration::from_secs(r["prestop_seconds"].as_u64().unwrap());
        assert!(
            grace > config.shutdown_timeout + prestop,
            "{what}: terminationGracePeriodSeconds {grace:?} is not more than SHUTDOWN_TIMEOUT {:?} + preStop {prestop:?}",
            config.shutdown_timeout
        );
        assert!(config.workers >= 1);
        // Every probe asks the metrics port, where the admin thread answers whatever the data
        // plane's connection limits; liveness and startup /healthz, readiness /readyz.
        for (probe, path) in [
            ("startupProbe", "/healthz"),
            ("livenessProbe", "/healthz"),
            ("readinessProbe", "/readyz"),
        ] {
            let p = &r["probes"][probe];
            assert_eq!(
                p["port"], "metrics",
                "{what}: {probe} is not on `port: metrics`: {p}"
            );
            assert_eq!(p["path"], path, "{what}: {probe}: {p}");
            assert_eq!(
                p["scheme"], "HTTP",
                "{what}: {probe}: the router serves no TLS"
            );
        }
        // The startup probe is short: /healthz does not wait for Harbor.
        let startup = &r["probes"]["startupProbe"];
        let budget = startup["period"].as_u64().unwrap() * startup["failures"].as_u64().unwrap();
        assert!(
            (1..=60).contains(&budget),
            "{what}: the startup probe allows {budget} s; /healthz answers once the process listens"
        );
        // Spreads count only nodes whose taints the pods tolerate.
        let spread = r["spread"].as_array().unwrap();
        assert!(spread.len() >= 2, "{what}: {spread:?}");
        for t in spread {
            assert_eq!(
                t["nodeTaintsPolicy"], "Honor",
                "{what}: the spread over {} counts tainted nodes",
                t["topologyKey"]
            );
        }
        // The one image, from base/kustomization.yaml's `images:` entry.
        assert_eq!(
            r["image"], report["image"],
            "{what}: not the image base/kustomization.yaml names"
        );
        // The namespace enforces `restricted`: every pod must meet it, and stay Guaranteed.
        assert_eq!(
            r["restricted"].as_array().map(Vec::len),
            Some(0),
            "{what}: {}",
            r["restricted"]
        );
        assert_eq!(
            r["guaranteed"], true,
            "{what}: the pod is not in the Guaranteed QoS class"
        );
        checked.push(what);
    }
    // deploy/namespace.yaml: the base's namespace, enforcing the standard every pod was held to.
    let ns = &report["namespace"];
    assert_eq!(ns["name"], renderings["deploy"]["namespace"]);
    assert_eq!(ns["pod_security"]["enforce"], "restricted", "{ns}");

    // The metrics port: Prometheus from the namespace `monitoring`, and the nodes (the kubelet's
    // probes) by an ipBlock that is narrower than the private ranges, which can match pods too.
    for (what, r) in renderings {
        let peers = r["networkpolicy"]["metrics"].as_array().unwrap();
        let mut namespaces = Vec::new();
        let mut blocks = Vec::new();
        for peer in peers {
            let keys: Vec<&String> = peer.as_object().unwrap().keys().collect();
            match keys.as_slice() {
                [k] if *k == "namespaceSelector" => {
                    let sel = &peer["namespaceSelector"];
                    assert!(sel.get("matchLabels").is_none(), "{what}: {sel}");
                    let exprs = sel["matchExpressions"].as_array().unwrap();
                    assert_eq!(exprs.len(), 1, "{what}: {sel}");
                    assert_eq!(
                        exprs[0]["key"], "kubernetes.io/metadata.name",
                        "{what}: {sel}"
                    );
                    assert_eq!(exprs[0]["operator"], "In", "{what}: {sel}");
                    for v in exprs[0]["values"].as_array().unwrap() {
                        namespaces.push(v.as_str().unwrap().to_string());
                    }
                }
                [k] if *k == "ipBlock" => blocks.push(peer["ipBlock"]["cidr"].as_str().unwrap()),
                _ => panic!("{what}: the metrics port admits {peer}"),
            }
        }
        assert_eq!(
            namespaces,
            ["monitoring"],
            "{what}: metrics admitted from {namespaces:?}"
        );
        assert!(
            !blocks.is_empty(),
            "{what}: no ingress rule for the kubelet's probes"
        );
        for cidr in blocks {
            assert!(
                prefix_len(cidr) >= 16,
                "{what}: the probes' rule admits {cidr} to the metrics port"
            );
        }
    }

    // The Vault variant: its own egress to Vault, and an init container that keeps the pod
    // Guaranteed (the injector's resources annotations, requests equal to limits).
    let vault = &report["vault"];
    let ann = &vault["annotations"];
    for r in ["cpu", "mem"] {
        let req = ann[format!("vault.hashicorp.com/agent-requests-{r}")].as_str();
        let lim = ann[format!("vault.hashicorp.com/agent-limits-{r}")].as_str();
        assert!(
            req.is_some(),
            "deploy/deployment-vault.yaml: no agent-requests-{r}"
        );
        assert_eq!(
            req, lim,
            "deploy/deployment-vault.yaml: the init container's {r} request is not its limit: the pod is Burstable"
        );
    }
    let to_vault = vault["vault_egress"]
        .as_array()
        .unwrap()
        .iter()
        .any(|rule| {
            rule["ports"]
                .as_array()
                .is_some_and(|ps| ps.iter().any(|p| p["port"] == 8200))
                && rule["to"].as_array().is_some_and(|t| !t.is_empty())
        });
    assert!(
        to_vault,
        "deploy/deployment-vault.yaml: no egress to Vault on 8200"
    );

    // The commented DNS variants: GKE's Cloud DNS, NodeLocal DNSCache, OpenShift.
    let variants = &report["variants"];
    let egress_to = |name: &str| -> String { variants[name]["rules"].to_string() };
    assert!(egress_to("dns-gke-cloud-dns").contains("\"169.254.169.254/32\""));
    assert!(egress_to("dns-nodelocal").contains("\"169.254.20.10/32\""));
    let openshift = egress_to("dns-openshift");
    assert!(openshift.contains("\"openshift-dns\"") && openshift.contains("5353"));
    for name in ["dns-gke-cloud-dns", "dns-nodelocal", "dns-openshift"] {
        assert_eq!(variants[name]["direction"], "egress", "{name}");
    }
    // The Redis component's settings reach the router.
    let all = config_of(
        "deploy/overlays/all",
        &report["renderings"]["deploy/overlays/all"]["env"],
    );
    assert_eq!(all.redis_sentinels.len(), 3);
    assert!(all.redis_password.is_some());
    println!("deploy: the router accepts the environment of {checked:?}");
}

#[test]
fn the_dockerfile_passes_hadolint_and_builds_what_cargo_builds() {
    let report = check(
        "docker",
        &[
            "--cargo",
            env!("CARGO"),
            "--binary",
            env!("CARGO_BIN_EXE_harbor-router"),
        ],
    );
    let defaults = Config::from_map(&HashMap::new()).unwrap();
    let expose: Vec<u64> = report["expose"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_u64().unwrap())
        .collect();
    assert_eq!(
        expose,
        [
            u64::from(defaults.listen_addr.port()),
            u64::from(defaults.metrics_addr.port())
        ],
        "EXPOSE is not LISTEN_ADDR's and METRICS_ADDR's default ports"
    );
}

/// The variables of README.md's configuration table (the first column's `NAME`s, `(+ _FILE)` too).
fn readme_variables(readme: &str) -> BTreeSet<String> {
    let table = readme
        .split("## Configuration")
        .nth(1)
        .expect("README.md has a Configuration section");
    let table = table.split("\n## ").next().unwrap();
    let mut names = BTreeSet::new();
    for row in table
        .lines()
        .filter(|l| l.starts_with("| `"))
        .map(|l| l.split('|').nth(1).unwrap())
    {
        for part in row.split('`').skip(1).step_by(2) {
            if part.starts_with(|c: char| c.is_ascii_uppercase())
                && part
                    .chars()
                    .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
            {
                names.insert(part.to_string());
            }
        }
    }
    names
}

#[test]
fn every_variable_the_router_reads_is_documented_and_nothing_else() {
    let readme = std::fs::read_to_string("README.md").unwrap();
    let documented = readme_variables(&readme);
    let read = config_env_names();
    let undocumented: Vec<_> = read.difference(&documented).collect();
    assert!(
        undocumented.is_empty(),
        "read by src/config.rs but not in README.md's configuration table: {undocumented:?}"
    );
    let unknown: Vec<_> = documented.difference(&read).collect();
    assert!(
        unknown.is_empty(),
        "in README.md's configuration table but not read by src/config.rs: {unknown:?}"
    );
}

/// GitHub's anchor for a heading.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == '-' || *c == '_' || *c == ' ')
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

fn anchors(markdown: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut fenced = false;
    for line in markdown.lines() {
        if line.starts_with("```") {
            fenced = !fenced;
        }
        if !fenced && line.starts_with('#') {
            out.insert(slug(line.trim_start_matches('#')));
        }
    }
    out
}

/// `path#anchor` references to the project's files: links in README.md and the operator docs, and
/// the `docs/….md#…` pointers in deploy/'s comments and the Dockerfile.
#[test]
fn links_to_the_docs_resolve() {
    let mut refs: Vec<(String, String)> = Vec::new(); // (from, target relative to the repository)
    let sources = ["README.md", "docs/deployment.md", "docs/runbook.md"].map(PathBuf::from);
    for src in &sources {
        let text =
            std::fs::read_to_string(src).unwrap_or_else(|e| panic!("{}: {e}", src.display()));
        let base = src.parent().unwrap();
        let mut rest = text.as_str();
        while let Some(i) = rest.find("](") {
            rest = &rest[i + 2..];
            let end = rest.find(')').unwrap();
            let target = &rest[..end];
            if !target.contains("://") && !target.starts_with('#') && !target.starts_with("mailto:")
            {
                let (path, anchor) = target.split_once('#').unwrap_or((target, ""));
                let joined = base.join(path);
                let joined = joined
                    .to_string_lossy()
                    .trim_start_matches("./")
                    .to_string();
                let joined = normalize(&joined);
                refs.push((src.display().to_string(), format!("{joined}#{anchor}")));
            } else if let Some(anchor) = target.strip_prefix('#') {
                refs.push((
                    src.display().to_string(),
                    format!("{}#{anchor}", src.display()),
                ));
            }
        }
    }
    let mut deploy_files = vec![PathBuf::from("Dockerfile")];
    deploy_files.extend(files_under("deploy"));
    for f in &deploy_files {
        let text = std::fs::read_to_string(f).unwrap_or_default();
        for word in text.split(|c: char| c.is_whitespace() || "(),;'\"".contains(c)) {
            let word = word.trim_end_matches(['.', ':']);
            if (word.starts_with("docs/") || word.starts_with("README.md")) && word.contains(".md")
            {
                refs.push((f.display().to_string(), word.to_string()));
            }
        }
    }
    assert!(refs.len() > 20, "{refs:?}");
    let mut broken = Vec::new();
    for (from, target) in &refs {
        let (path, anchor) = target.split_once('#').unwrap_or((target, ""));
        if Path::new(path).is_dir() {
            continue;
        }
        match std::fs::read_to_string(path) {
            Err(_) => broken.push(format!("{from}: {target} (no such file)")),
            Ok(text) if !anchor.is_empty() && path.ends_with(".md") => {
                if !anchors(&text).contains(anchor) {
                    broken.push(format!("{from}: {target} (no such heading)"));
                }
            }
            Ok(_) => {}
        }
    }
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

/// The operator docs name only metrics docs/observability.md documents (which tests/metrics.rs
/// checks against a scrape), alerts deploy/monitoring/prometheusrule.yaml defines, and log lines and
/// error details the code writes (quoted as log `…`, log: `…` or detail `…`, up to any ellipsis).
#[test]
fn the_operator_docs_name_real_metrics_alerts_and_log_lines() {
    let observability = std::fs::read_to_string("docs/observability.md").unwrap();
    let rules = std::fs::read_to_string("deploy/monitoring/prometheusrule.yaml").unwrap();
    let mut code = String::new();
    for p in files_under("src") {
        if p.extension().is_some_and(|x| x == "rs") {
            code.push_str(&std::fs::read_to_string(&p).unwrap());
        }
    }
    let squash = |s: &str| s.split_whitespace().collect::<Vec<_>>().join(" ");
    let code = squash(&code);
    let mut wrong = Vec::new();
    let (mut metrics, mut alerts, mut lines) = (0, 0, 0);
    for doc in ["docs/deployment.md", "docs/runbook.md"] {
        let text = std::fs::read_to_string(doc).unwrap();
        for word in text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            if word.starts_with("harbor_router_") {
                let name = word;
                let family = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| name.strip_suffix(s))
                    .unwrap_or(name);
                metrics += 1;
                if !observability.contains(&format!("`{family}`")) {
                    wrong.push(format!(
                        "{doc}: metric {name} is not in docs/observability.md"
                    ));
                }
            }
            if word.starts_with("HarborRouter") {
                alerts += 1;
                if !rules.contains(&format!("alert: {word}\n")) {
                    wrong.push(format!("{doc}: alert {word} is not in prometheusrule.yaml"));
                }
            }
        }
        let flat = squash(&text);
        // Log lines, and the `detail` of the errors the router answers, both written by src/.
        for marker in ["log `", "log: `", "detail `"] {
            for piece in flat.split(marker).skip(1) {
                let quoted = piece.split('`').next().unwrap();
                let quoted = quoted.split('…').next().unwrap().trim();
                lines += 1;
                if !code.contains(quoted) {
                    wrong.push(format!(
                        "{doc}: {marker}…` {quoted:?} is not written by src/"
                    ));
                }
            }
        }
    }
    assert!(
        metrics > 10 && alerts > 5 && lines > 10,
        "{metrics} {alerts} {lines}"
    );
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// `docs/../README.md` → `README.md`.
fn normalize(path: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for p in path.split('/') {
        match p {
            ".." => {
                parts.pop();
            }
            "." | "" => {}
            p => parts.push(p),
        }
    }
    parts.join("/")
}

/// Every file below `dir`, at any depth.
fn files_under(dir: &str) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut dirs = vec![PathBuf::from(dir)];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                dirs.push(p);
            } else {
                files.push(p);
            }
        }
    }
    files
}

/// The text under the first heading of `level` (`##`, `###`) whose line contains `title`, up to the
/// next heading of that level or a higher one; fenced blocks are part of it.
fn section<'a>(markdown: &'a str, level: usize, title: &str) -> &'a str {
    let mut start = None;
    let mut offset = 0;
    let mut fenced = false;
    for line in markdown.split_inclusive('\n') {
        if line.starts_with("```") {
            fenced = !fenced;
        }
        let hashes = line.chars().take_while(|c| *c == '#').count();
        if !fenced && hashes >= 1 && line[hashes..].starts_with(' ') {
            match start {
                None if hashes == level && line.contains(title) => {
                    start = Some(offset + line.len())
                }
                Some(s) if hashes <= level => return &markdown[s..offset],
                _ => {}
            }
        }
        offset += line.len();
    }
    let s = start.unwrap_or_else(|| panic!("no {} heading with {title:?}", "#".repeat(level)));
    &markdown[s..]
}

/// The router's verdict on the files a rendering's Secrets ship: the `*_FILE` variables whose
/// shipped content it refuses at start (exit status 64), each with its Secret's name.
fn refused_shipped_secrets(what: &str, r: &serde_json::Value) -> Vec<(String, String)> {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("deploy-shipped-{}", what.replace(['/', '.'], "-")));
    std::fs::create_dir_all(&dir).unwrap();
    let mut refused = Vec::new();
    let files = r["secret_files"].as_object().unwrap();
    for (var, shipped) in files {
        let mut map = HashMap::new();
        for (name, value) in r["env"].as_object().unwrap() {
            let mut value = value.as_str().unwrap().to_string();
            // A file nothing ships (cert-manager's Secret) stood in for by a good one.
            if let Some(v) = name
                .strip_suffix("_FILE")
                .filter(|_| !files.contains_key(name))
            {
                let path = dir.join(format!("made-{v}"));
                std::fs::write(&path, good_file(v)).unwrap();
                value = path.to_string_lossy().into_owned();
            }
            map.insert(name.clone(), value);
        }
        // Every other shipped file stood in for by a good one, this one as shipped.
        for (other, f) in files {
            let path = dir.join(other);
            let content = if other == var {
                f["value"].as_str().unwrap().to_string()
            } else {
                good_file(other.strip_suffix("_FILE").unwrap_or(other))
            };
            std::fs::write(&path, content).unwrap();
            map.insert(other.clone(), path.to_string_lossy().into_owned());
        }
        if let Err(e) = Config::from_map(&map) {
            let e = e.to_string();
            assert!(
                e.contains(var.as_str()),
                "{what}: refused for another reason: {e}"
            );
            refused.push((var.clone(), shipped["secret"].as_str().unwrap().to_string()));
        }
    }
    refused
}

/// docs/deployment.md's checklist names, for each variant, what it ships that the cluster or the
/// operator must supply: each Secret whose shipped value the router refuses, each Localhost
/// seccomp profile, each custom resource's kind, the namespace; for the Vault variant, the role,
/// the secrets' paths and Vault's port. overlays/all says it is a template and points there.
#[test]
fn the_prerequisites_checklist_names_what_each_variant_ships_unfilled() {
    let report = kube_report();
    let doc = std::fs::read_to_string("docs/deployment.md").unwrap();
    let prerequisites = section(&doc, 2, "Prerequisites, per variant");
    let heading = |entry: &str| -> String {
        match entry {
            "deploy" => "`deploy/`".to_string(),
            e => format!("`{e}`"),
        }
    };
    let mut refused_anywhere = 0;
    for (what, r) in every_deployment(report) {
        let title = heading(&what);
        let list = section(prerequisites, 3, &title);
        let mut want: Vec<String> = Vec::new();
        for (var, secret) in refused_shipped_secrets(&what, r) {
            refused_anywhere += 1;
            want.push(format!("`{secret}`"));
            want.push(format!("`{var}`"));
        }
        if r["seccomp"]["type"] == "Localhost" {
            want.push(format!(
                "`{}`",
                r["seccomp"]["localhostProfile"].as_str().unwrap()
            ));
        }
        for kind in r["custom_kinds"].as_array().into_iter().flatten() {
            want.push(format!("`{}`", kind.as_str().unwrap()));
        }
        let namespace = report["renderings"]["deploy"]["namespace"]
            .as_str()
            .unwrap();
        want.push(format!("`{namespace}`"));
        if what.ends_with("deployment-vault.yaml") {
            let ann = r["annotations"].as_object().unwrap();
            want.push(format!(
                "`{}`",
                ann["vault.hashicorp.com/role"].as_str().unwrap()
            ));
            for (k, v) in ann {
                if k.starts_with("vault.hashicorp.com/agent-inject-secret-") {
                    want.push(format!("`{}`", v.as_str().unwrap()));
                }
            }
            want.push("8200".into());
            want.push("`harbor-router-vault`".into());
        }
        let missing: Vec<&String> = want.iter().filter(|w| !list.contains(w.as_str())).collect();
        assert!(
            missing.is_empty(),
            "docs/deployment.md, prerequisites of {title}: {missing:?} not named"
        );
    }
    // The shipped Secrets are placeholders the router refuses: the checklist is what stands
    // between `kubectl apply` and pods that exit 64.
    assert!(
        refused_anywhere >= 2,
        "the shipped robot and Redis secrets are accepted?"
    );
    let all = std::fs::read_to_string("deploy/overlays/all/kustomization.yaml").unwrap();
    let comment: String = all
        .lines()
        .take_while(|l| l.starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n");
    let anchor = slug(
        doc.lines()
            .find(|l| l.starts_with("### ") && l.contains("`deploy/overlays/all`"))
            .unwrap()
            .trim_start_matches('#'),
    );
    let pointer = format!("docs/deployment.md#{anchor}");
    assert!(
        comment.replace(&pointer, "").contains("template") && comment.contains(&pointer),
        "deploy/overlays/all/kustomization.yaml does not say it is a template, with its checklist"
    );
    assert!(section(&doc, 2, "What is in deploy/").contains("template"));
}

/// How many times `text` names the namespace `ns`: as a YAML `namespace:` or `name:` value, a
/// `-n` or `namespace` argument, a selector's value, a DNS name's `.ns.svc`, `namespaces=ns`.
fn namespace_mentions(text: &str, ns: &str) -> usize {
    let bytes = text.as_bytes();
    let mut n = 0;
    let mut from = 0;
    while let Some(i) = text[from..].find(ns) {
        let at = from + i;
        from = at + ns.len();
        let before = &text[..at];
        let after = &text[at + ns.len()..];
        let word_end = after
            .chars()
            .next()
            .is_none_or(|c| !(c.is_ascii_alphanumeric() || c == '-' || c == '_'));
        let word_start =
            at == 0 || !(bytes[at - 1].is_ascii_alphanumeric() || b"-_$/".contains(&bytes[at - 1]));
        if !(word_start && word_end) {
            continue;
        }
        let dns = before.ends_with('.') && after.starts_with(".svc");
        let prefixed = [
            "namespace: ",
            "name: ",
            "-n ",
            "namespace `",
            "namespace ",
            "namespaces=",
            "values: [",
            "metadata.name: ",
        ]
        .iter()
        .any(|p| before.ends_with(p));
        if dns || prefixed {
            n += 1;
        }
    }
    n
}

/// docs/deployment.md's list of what to change for another namespace names every file under
/// deploy/ that names the namespace, and only files that exist.
#[test]
fn the_namespace_list_names_every_file_that_names_the_namespace() {
    let base = std::fs::read_to_string("deploy/base/kustomization.yaml").unwrap();
    let ns = base
        .lines()
        .find_map(|l| l.strip_prefix("namespace: "))
        .expect("deploy/base/kustomization.yaml sets namespace:")
        .trim()
        .to_string();
    let doc = std::fs::read_to_string("docs/deployment.md").unwrap();
    let list = section(&doc, 3, "Another namespace");
    let mut naming = Vec::new();
    for f in files_under("deploy") {
        let Ok(text) = std::fs::read_to_string(&f) else {
            continue;
        };
        if namespace_mentions(&text, &ns) > 0 {
            naming.push(f.display().to_string());
        }
    }
    naming.sort();
    assert!(
        naming.len() >= 6 && naming.contains(&"deploy/deployment-vault.yaml".to_string()),
        "{naming:?}"
    );
    let unlisted: Vec<&String> = naming
        .iter()
        .filter(|f| !list.contains(&format!("`{f}`")))
        .collect();
    assert!(
        unlisted.is_empty(),
        "docs/deployment.md#another-namespace does not list {unlisted:?}, which name the namespace {ns:?}"
    );
    for named in list.split('`').skip(1).step_by(2) {
        if named.starts_with("deploy/") {
            assert!(
                Path::new(named).exists(),
                "the namespace list names {named}, which does not exist"
            );
        }
    }
    // Outside deploy/: the Vault role binds the namespace.
    assert!(list.contains("bound_service_account_namespaces"));
    println!("deploy: the namespace {ns:?} is named in {naming:?}, all in the list");
}

/// Figures in KiB (`2.8 KiB`, `~3 KB`: KB read as 1000 bytes) in `text`, with their byte offset; a
/// range's upper end (`20–40 KB`) is left out.
fn kib_figures(text: &str) -> Vec<(usize, f64)> {
    let mut out = Vec::new();
    for unit in [" KiB", " KB"] {
        let mut from = 0;
        while let Some(i) = text[from..].find(unit) {
            let at = from + i;
            from = at + unit.len();
            let start = text[..at]
                .rfind(|c: char| !(c.is_ascii_digit() || c == '.'))
                .map_or(0, |p| p + text[p..].chars().next().unwrap().len_utf8());
            let Ok(n) = text[start..at].parse::<f64>() else {
                continue;
            };
            if text[..start].ends_with(['–', '-']) {
                continue;
            }
            out.push((
                start,
                if unit == " KB" {
                    n * 1000.0 / 1024.0
                } else {
                    n
                },
            ));
        }
    }
    out
}

/// What docs/deployment.md and docs/runbook.md say an idle connection costs is what
/// docs/benchmarks.md measured: every KiB figure within a few words of `idle` (the first after it,
/// before a busy connection's; the last just before it).
#[test]
fn the_idle_connection_figures_are_the_measured_ones() {
    let bench = std::fs::read_to_string("docs/benchmarks.md").unwrap();
    let row = bench
        .lines()
        .find(|l| l.starts_with("| idle |"))
        .expect("docs/benchmarks.md has the idle row");
    let measured = kib_figures(row)
        .into_iter()
        .map(|(_, k)| k)
        .next()
        .expect("the idle row gives KiB per connection");
    let squash = |s: &str| s.split_whitespace().collect::<Vec<_>>().join(" ");
    let mut seen = 0;
    for doc in ["docs/deployment.md", "docs/runbook.md"] {
        let text = squash(&std::fs::read_to_string(doc).unwrap());
        let figures = kib_figures(&text);
        let mut from = 0;
        while let Some(i) = text[from..].find("idle") {
            let at = from + i;
            from = at + 4;
            let end = text[at..]
                .find([';', '('])
                .map_or(text.len(), |e| at + e)
                .min(at + 120);
            let stop = ["busy", "in flight"]
                .iter()
                .filter_map(|w| text[at..end].find(w).map(|p| at + p))
                .min()
                .unwrap_or(end);
            let after = figures.iter().find(|(p, _)| *p > at && *p < stop);
            let before = figures.iter().rev().find(|(p, _)| *p < at && at - *p < 25);
            for (p, kib) in after.into_iter().chain(before) {
                seen += 1;
                assert!(
                    (kib / measured - 1.0).abs() <= 0.1,
                    "{doc}: an idle connection costs {kib:.2} KiB ({:?}), docs/benchmarks.md measured {measured} KiB",
                    &text[p.saturating_sub(40)..(*p + 40).min(text.len())]
                );
            }
        }
    }
    assert!(seen >= 3, "{seen} idle-connection figures");
}

/// The operator docs cover the settings a cluster decides: the monitoring namespace the policy
/// admits and the Prometheus selectors; each DNS variant's addresses; the plain-HTTP router (no
/// TLS front); both containerd config layouts; the 403 DENIED answer; a kubectl debug the
/// namespace's Pod Security level lets through.
#[test]
fn the_docs_say_what_the_manifests_do() {
    let report = kube_report();
    let doc = std::fs::read_to_string("docs/deployment.md").unwrap();
    let runbook = std::fs::read_to_string("docs/runbook.md").unwrap();
    let mirror = std::fs::read_to_string("docs/mirror.md").unwrap();
    let squash = |s: &str| s.split_whitespace().collect::<Vec<_>>().join(" ");

    // The namespace the NetworkPolicy admits metrics from, said in prose (not only in YAML).
    let peers = report["renderings"]["deploy"]["networkpolicy"]["metrics"]
        .as_array()
        .unwrap();
    let ns = peers
        .iter()
        .find_map(|p| p["namespaceSelector"]["matchExpressions"][0]["values"][0].as_str())
        .unwrap();
    for part in [
        section(&doc, 2, "Probes and the NetworkPolicy"),
        section(&doc, 2, "The security boundary"),
        section(&doc, 2, "Monitoring with the Prometheus operator"),
    ] {
        assert!(
            squash(part).contains(&format!("only the namespace named `{ns}`"))
                || squash(part).contains(&format!("only from the namespace named `{ns}`")),
            "docs/deployment.md does not say metrics come only from the namespace named `{ns}`:\n{part}"
        );
    }
    let monitoring = section(&doc, 2, "Monitoring with the Prometheus operator");
    for word in [
        "serviceMonitorSelector",
        "ruleSelector",
        "serviceMonitorNamespaceSelector",
        "ruleNamespaceSelector",
        "release",
    ] {
        assert!(
            monitoring.contains(&format!("`{word}")),
            "monitoring: {word}"
        );
    }
    let probes = section(&doc, 2, "Probes and the NetworkPolicy");
    assert!(probes.contains("kubelet") && probes.contains("node"));

    // Each DNS variant, by name, with the addresses, namespaces and ports it allows.
    let dns = squash(section(&doc, 2, "DNS egress"));
    for (name, v) in report["variants"].as_object().unwrap() {
        if !name.starts_with("dns-") {
            continue;
        }
        assert!(dns.contains(&format!("`{name}`")), "DNS egress: {name}");
        for rule in v["rules"].as_array().unwrap() {
            for peer in rule["to"].as_array().unwrap() {
                if let Some(cidr) = peer["ipBlock"]["cidr"].as_str() {
                    let addr = cidr.trim_end_matches("/32");
                    assert!(
                        dns.contains(addr) || name == "dns-nodelocal" && addr.starts_with("10."),
                        "DNS egress: {name}'s {cidr}"
                    );
                }
                for e in peer["namespaceSelector"]["matchExpressions"]
                    .as_array()
                    .into_iter()
                    .flatten()
                {
                    for v in e["values"].as_array().unwrap() {
                        assert!(
                            dns.contains(v.as_str().unwrap()),
                            "DNS egress: {name}'s {v}"
                        );
                    }
                }
            }
            for p in rule["ports"].as_array().unwrap() {
                assert!(
                    dns.contains(&p["port"].to_string()),
                    "DNS egress: {name}'s port"
                );
            }
        }
    }

    // No TLS in the router: TLS is an ingress's or a load balancer's.
    for (name, text) in [("docs/mirror.md", &mirror), ("docs/deployment.md", &doc)] {
        assert!(
            !squash(text).contains("TLS front"),
            "{name} names a TLS front"
        );
    }
    let plain = squash(section(&doc, 2, "Clients on plain HTTP"));
    for word in [
        "ingress",
        "load balancer",
        "/etc/docker/daemon.json",
        "/etc/containers/registries.conf",
        "hosts.toml",
    ] {
        assert!(plain.contains(word), "Clients on plain HTTP: {word}");
    }
    assert!(squash(&mirror).contains("deployment.md#clients-on-plain-http"));

    // 403 DENIED, as src/error.rs answers it, has its row.
    let error_rs = std::fs::read_to_string("src/error.rs").unwrap();
    assert!(
        error_rs.contains("Error::Denied { .. } => \"DENIED\"")
            && error_rs.contains("Error::Denied { .. } => StatusCode::FORBIDDEN"),
        "src/error.rs no longer answers DENIED with 403"
    );
    let rows: Vec<&str> = runbook
        .lines()
        .filter(|l| l.starts_with("| 403 `DENIED`"))
        .collect();
    assert!(rows.len() >= 2, "docs/runbook.md has no 403 DENIED rows");

    // Under `restricted`, a kubectl debug without the restricted profile is refused: every one the
    // docs give asks for it.
    assert_eq!(report["namespace"]["pod_security"]["enforce"], "restricted");
    let mut debugs = 0;
    for (name, text) in [("docs/deployment.md", &doc), ("docs/runbook.md", &runbook)] {
        let text = squash(text);
        for piece in text.split("kubectl ").skip(1) {
            let cmd = piece.split(['`', '\n']).next().unwrap();
            if cmd.split_whitespace().any(|w| w == "debug") && cmd.contains("-it") {
                debugs += 1;
                assert!(
                    cmd.contains("--profile=restricted"),
                    "{name}: `kubectl {cmd}` is refused under the restricted Pod Security Standard"
                );
            }
        }
    }
    assert!(debugs >= 2, "{debugs} kubectl debug commands");
}

/// The docs' TOML, JSON and YAML blocks parse (tests/deploy/check.py), and say what each runtime
/// needs: containerd's `config_path` in the 2.x and the 1.x layout; for a plain-HTTP router,
/// Docker's `insecure-registries`, containerd's `hosts.toml` with an `http://` server and host, and
/// a containers-registries `[[registry]]` marked insecure, all for the same address.
#[test]
fn the_docs_configuration_snippets_parse_and_fit_each_runtime() {
    let report = check("docs", &[]);
    let blocks = |doc: &str| -> Vec<&serde_json::Value> {
        report[doc]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| &b["data"])
            .collect()
    };
    let mirror = blocks("docs/mirror.md");
    let config_path = |version: i64, plugin: &str| {
        mirror.iter().any(|d| {
            d["version"] == version
                && d["plugins"][plugin]["registry"]["config_path"] == "/etc/containerd/certs.d"
        })
    };
    assert!(
        config_path(3, "io.containerd.cri.v1.images"),
        "docs/mirror.md: no containerd 2.x config_path"
    );
    assert!(
        config_path(2, "io.containerd.grpc.v1.cri"),
        "docs/mirror.md: no containerd 1.x config_path"
    );
    let plain = blocks("docs/deployment.md");
    let docker: Vec<&str> = plain
        .iter()
        .filter_map(|d| d["insecure-registries"].as_array())
        .flatten()
        .map(|h| h.as_str().unwrap())
        .collect();
    assert_eq!(
        docker.len(),
        1,
        "daemon.json insecure-registries: {docker:?}"
    );
    let host = docker[0];
    assert!(!host.contains("://"), "insecure-registries take host:port");
    let http = format!("http://{host}");
    let containerd = plain.iter().any(|d| {
        d["server"] == http.as_str()
            && d["host"][&http]["capabilities"] == serde_json::json!(["pull", "resolve"])
    });
    assert!(
        containerd,
        "no hosts.toml with server and host {http}, pull and resolve"
    );
    let crio = plain.iter().any(|d| {
        d["registry"].as_array().is_some_and(|rs| {
            rs.iter()
                .any(|r| r["location"] == host && r["insecure"] == true)
        })
    });
    assert!(
        crio,
        "no registries.conf [[registry]] for {host} with insecure = true"
    );
}
