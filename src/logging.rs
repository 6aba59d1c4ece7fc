//! Log output: `tracing` with a pretty (human) or JSON (one object per line, fields flattened)
//! format, at `LOG_LEVEL`. `RUST_LOG`-style filters are not read: one variable, one meaning.

use std::io::IsTerminal;

use tracing_subscriber::filter::LevelFilter;

use crate::config::{LogFormat, LogLevel};

/// Installs the global subscriber; call once, before the first log line.
pub fn init(level: LogLevel, format: LogFormat) {
    let level = match level {
        LogLevel::Trace => LevelFilter::TRACE,
        LogLevel::Debug => LevelFilter::DEBUG,
        LogLevel::Info => LevelFilter::INFO,
        LogLevel::Warn => LevelFilter::WARN,
        LogLevel::Error => LevelFilter::ERROR,
    };
    let builder = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_thread_names(false)
        .with_target(true);
    match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .init(),
        LogFormat::Pretty => builder.with_ansi(std::io::stdout().is_terminal()).init(),
    }
}
