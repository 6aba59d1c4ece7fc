//! The `harbor-router` binary: read the configuration (exit 64 on any bad variable, before binding a
//! port), start the workers, wait for SIGTERM or SIGINT, drain, exit 0. A second signal during the
//! drain exits at once with status 130.

use std::process::ExitCode;

use mimalloc::MiMalloc;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use harbor_router::config::Config;
use harbor_router::{logging, Server};

#[global_allocator]
static GLOBAL: MiMalloc = MiMalloc;

/// `EX_USAGE` from sysexits.h: the configuration is wrong.
const EXIT_CONFIG: u8 = 64;
/// Could not start (port taken, no runtime): `EX_UNAVAILABLE`.
const EXIT_START: u8 = 69;

/// `mi_option_arena_eager_commit` in mimalloc.h's option enum (the same index in mimalloc v2 and v3;
/// check it when libmimalloc-sys moves to a new mimalloc).
#[cfg(target_os = "linux")]
const MI_OPTION_ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4;

/// Arenas committed on demand rather than at once. On Linux (overcommit) mimalloc commits its
/// arenas eagerly by default, and what it purges there stays resident, so the memory a burst of
/// connections held would never go back to the system. Runs as a constructor, before the first
/// allocation reserves an arena; the option set in the environment (under its name or its legacy
/// one) still wins.
#[cfg(target_os = "linux")]
extern "C" fn allocator_settings() {
    // SAFETY: getenv reads the environment the loader set up (no thread runs yet) and allocates
    // nothing; mi_option_set stores a plain option.
    unsafe {
        let set = |name: &std::ffi::CStr| !libc::getenv(name.as_ptr()).is_null();
        if !set(c"MIMALLOC_ARENA_EAGER_COMMIT") && !set(c"MIMALLOC_EAGER_REGION_COMMIT") {
            libmimalloc_sys::mi_option_set(MI_OPTION_ARENA_EAGER_COMMIT, 0);
        }
    }
}

#[cfg(target_os = "linux")]
#[used]
#[link_section = ".init_array"]
static ALLOCATOR_SETTINGS: extern "C" fn() = allocator_settings;

fn main() -> ExitCode {
    let config = match Config::from_env() {
        Ok(c) => c,
        Err(errors) => {
            eprint!("harbor-router: {errors}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    logging::init(config.log_level, config.log_format);
    match run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "cannot start");
            ExitCode::from(EXIT_START)
        }
    }
}

fn run(config: Config) -> anyhow::Result<()> {
    // Registered before the workers start, so an early SIGTERM is not lost.
    let mut signals = Signals::new([SIGTERM, SIGINT])?;
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        harbor = %config.harbor_url.origin(),
        proxy_project = %config.proxy_project,
        user = config.harbor_credentials.as_ref().map(|c| c.username.as_str()).unwrap_or("(anonymous)"),
        "starting"
    );
    if config.harbor_credentials.is_none() {
        tracing::warn!(
            "HARBOR_USERNAME is not set: Harbor is accessed anonymously (public projects only)"
        );
    }
    let shutdown_timeout = config.shutdown_timeout;
    let running = Server::bind(config)?.start()?;
    let signal = signals.forever().next();
    tracing::info!(signal = ?signal, timeout = ?shutdown_timeout, "shutting down: draining connections");
    running.shutdown();
    std::thread::spawn(move || {
        if let Some(s) = signals.forever().next() {
            tracing::warn!(
                signal = s,
                "second signal: exiting without finishing the drain"
            );
            std::process::exit(130);
        }
    });
    running.join();
    tracing::info!("stopped");
    Ok(())
}
