//! Packaging and deployment: deploy/ and the Dockerfile against the code, and the docs against
//! `src/config.rs`. Nothing here needs a cluster or a Docker engine.
//!
//! - `kubectl kustomize` renders deploy/ and its overlays (without kubectl, a built-in subset of
//!   kustomize does, and says so); every object is validated against the Kubernetes schemas
//!   (kubernetes-validate, offline), the custom resources field by field, and the rendering is
//!   checked against the code: probe paths and ports, env names `config.rs` reads, values
//!   `Config::from_map` accepts, the drain timing, the Vault variant kept alike
//!   (tests/deploy/check.py does the YAML side).
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
            let content = if var.ends_with("USERNAME") {
                "robot$harbor-router\n"
            } else {
                "s3cret\n"
            };
            std::fs::write(&file, content).unwrap();
            value = file.to_string_lossy().into_owned();
        }
        map.insert(name.clone(), value);
    }
    Config::from_map(&map)
        .unwrap_or_else(|e| panic!("{what}: the router refuses its environment: {e}"))
}

#[test]
fn the_kustomizations_render_validate_and_agree_with_the_code() {
    let names: Vec<String> = config_env_names().into_iter().collect();
    let report = check("kube", &["--env-names", &names.join(",")]);
    let mut checked = Vec::new();
    let renderings = report["renderings"].as_object().unwrap();
    assert_eq!(renderings.len(), 3, "{renderings:?}");
    let mut all: Vec<(String, &serde_json::Value)> =
        renderings.iter().map(|(k, v)| (k.clone(), v)).collect();
    all.push(("deploy/deployment-vault.yaml".into(), &report["vault"]));
    for (what, r) in all {
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
        checked.push(what);
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
/// checks against a scrape), alerts deploy/monitoring/prometheusrule.yaml defines, and log lines the
/// code writes (quoted as log `…` or log: `…`, up to any ellipsis).
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
        for marker in ["log `", "log: `"] {
            for piece in flat.split(marker).skip(1) {
                let quoted = piece.split('`').next().unwrap();
                let quoted = quoted.split('…').next().unwrap().trim();
                lines += 1;
                if !code.contains(quoted) {
                    wrong.push(format!("{doc}: log line {quoted:?} is not written by src/"));
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
