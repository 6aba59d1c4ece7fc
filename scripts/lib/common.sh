# Shared by scripts/*.sh: install what is missing (Debian), and small helpers. Source it; do not run it.

# Minimum Rust the crate builds with (Cargo.toml's rust-version).
HR_MIN_RUST="1.85"

hr_log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

hr_sudo() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    echo "need root (or sudo) to run: $*" >&2; return 1; fi
}

_hr_apt_updated=""
# hr_apt PACKAGE...: installs the Debian packages that are not installed yet.
hr_apt() {
  local missing=()
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [ "${#missing[@]}" -eq 0 ] && return 0
  if ! command -v apt-get >/dev/null; then
    echo "missing packages ${missing[*]} and no apt-get to install them" >&2; return 1
  fi
  if [ -z "$_hr_apt_updated" ]; then
    hr_log "apt-get update"
    hr_sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    _hr_apt_updated=1
  fi
  hr_log "apt-get install ${missing[*]}"
  hr_sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

_hr_version_ge() { [ "$(printf '%s\n%s\n' "$2" "$1" | sort -V | head -n1)" = "$2" ]; }

# hr_rust: makes sure cargo, rustc (>= HR_MIN_RUST), rustfmt and clippy are usable, and a C compiler
# for the crates that build C (mimalloc).
hr_rust() {
  [ -d "$HOME/.cargo/bin" ] && export PATH="$HOME/.cargo/bin:$PATH"
  command -v cc >/dev/null || hr_apt gcc libc6-dev
  if ! command -v cargo >/dev/null; then
    hr_log "no cargo found: trying Debian's Rust toolchain"
    hr_apt cargo rustc || true
  fi
  local v
  v=$(rustc --version 2>/dev/null | awk '{print $2}')
  if [ -z "$v" ] || ! _hr_version_ge "$v" "$HR_MIN_RUST"; then
    # Debian stable's Rust is older than the crate needs: install the current stable with rustup.
    hr_log "rustc ${v:-missing} is older than $HR_MIN_RUST: installing the stable toolchain with rustup"
    if ! command -v rustup >/dev/null; then
      hr_apt curl ca-certificates
      curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs |
        sh -s -- -y --profile minimal --component rustfmt,clippy ||
        { echo "could not install rustup; install Rust >= $HR_MIN_RUST and retry" >&2; return 1; }
      export PATH="$HOME/.cargo/bin:$PATH"
    fi
    rustup toolchain install stable --profile minimal --component rustfmt,clippy
    rustup default stable
  fi
  if ! cargo fmt --version >/dev/null 2>&1 || ! cargo clippy --version >/dev/null 2>&1; then
    if command -v rustup >/dev/null; then
      rustup component add rustfmt clippy
    else
      hr_apt rustfmt rust-clippy
    fi
  fi
}

# hr_wait_port HOST PORT SECONDS: waits until a TCP port accepts connections.
hr_wait_port() {
  local host=$1 port=$2 deadline=$((SECONDS + $3))
  until (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null; do
    [ "$SECONDS" -ge "$deadline" ] && return 1
    sleep 0.1
  done
}

# hr_wait_for FILE SED-EXPR PID: prints the first match of SED-EXPR in FILE, waiting up to 60 s while
# PID lives.
hr_wait_for() {
  local v=""
  for _ in $(seq 1 600); do
    v=$(sed -n "$2" "$1" 2>/dev/null | head -n1)
    [ -n "$v" ] && { echo "$v"; return 0; }
    kill -0 "$3" 2>/dev/null || break
    sleep 0.1
  done
  echo "gave up waiting; log $1:" >&2; cat "$1" >&2; return 1
}

# hr_standin BINARY: starts the test bed's stand-in Harbor (and its seeded registry) from BINARY, as a
# process of hr_work's, and waits for its JSON line (harbor_url, robot_user, robot_password, images):
# kept in $standin for hr_standin_field.
hr_standin() {
  "$1" >"$work/standin.json" 2>"$work/standin.log" &
  pids+=($!)
  standin=$(hr_wait_for "$work/standin.json" '/harbor_url/p' "${pids[-1]}")
}

# hr_standin_field EXPR: prints the Python expression EXPR over `v`, the stand-in's JSON line.
hr_standin_field() {
  python3 -c 'import json,sys; v=json.loads(sys.argv[1]); print(eval(sys.argv[2], {}, {"v": v}))' "$standin" "$1"
}

# hr_work: makes $work (a temp dir) and $pids (an array: add every process started); on exit, stops
# every process in $pids, waits for them and removes $work. Ctrl-C and SIGTERM exit with 130.
hr_work() {
  work=$(mktemp -d)
  pids=()
  trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
        for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
        rm -rf "$work"' EXIT
  trap 'exit 130' INT TERM
}

# hr_free_port: a loopback port that was free a moment ago, for servers that cannot report the port
# they picked (nginx). Only for benchmarks: tests bind port 0 and read the port back.
hr_free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# hr_cpu_ticks PID: user + system CPU time of a process (all its threads), in clock ticks
# (getconf CLK_TCK a second).
hr_cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
