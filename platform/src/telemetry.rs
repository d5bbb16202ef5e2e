//! Tracing set-up: `RUST_LOG` filters (default `info`), `PARLEY_LOG_FORMAT=json` for JSON lines.

use tracing_subscriber::EnvFilter;

pub fn init() {
    init_with_default("info");
}

/// As `init`, with `default` as the filter when `RUST_LOG` is not set.
pub fn init_with_default(default: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let json = std::env::var("PARLEY_LOG_FORMAT").is_ok_and(|v| v == "json");
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}
