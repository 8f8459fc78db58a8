//! Envoy's command line, as consul-dataplane and `consul connect envoy`
//! pass it to the `envoy` binary (sans-IO: argv in, [`EnvoyArgs`] out).
//!
//! Accepted forms, as Envoy's TCLAP parser takes them:
//! `--flag value`, `--flag=value`, `-c value`, and a flag with its value in
//! one argument separated by a space (`"--concurrency 2"`, the way
//! consul-dataplane appends `--concurrency`, `--drain-time-s` and
//! `--drain-strategy`).
//!
//! A flag veer does not know is an error naming it. A flag whose meaning
//! veer does not implement but which is safe to leave out (`--base-id`,
//! `--parent-shutdown-time-s`, …) is accepted and listed in
//! [`EnvoyArgs::ignored`]; one that would need hot restart
//! (`--restart-epoch` other than 0) is refused.
//!
//! **Repeated single-valued flags.** Envoy stops with
//! `(--concurrency) -- Argument already set!`. consul-dataplane appends its
//! own `--concurrency`, `--drain-time-s` and `--drain-strategy` *after* the
//! user's extra arguments, meaning "the user's value wins" (its comment says
//! so; its duplicate check is broken, so Envoy then fails). veer keeps the
//! first value and records a warning for each later one, which is what
//! consul-dataplane intended and what a user who set `--concurrency` in
//! `envoy-extra-args` wants.
//!
//! **`--version`** prints an Envoy-shaped line (see [`version_line`]):
//! `consul connect envoy` (Consul >= 1.15) runs `<envoy> --version`, takes
//! the first `\d+\.\d+\.\d+` of the output and requires its minor to be in
//! the Consul release's supported Envoy window.
use std::path::PathBuf;
use std::time::Duration;

#[cfg(test)]
mod tests;

/// The Envoy version veer reports by default to `--version`.
///
/// Chosen from Consul v1.16.0's `envoyextensions/xdscommon/proxysupport.go`
/// (supported Envoy 1.23–1.26): 1.26 is the newest minor Consul 1.16
/// accepts, and each later Consul release keeps the previous three or four
/// minors, so 1.26 is also inside the windows of the releases right after
/// it. No single version is inside every release's window (Consul moves it
/// by about one minor per release); `VEER_ENVOY_VERSION=1.x.y` picks
/// another, or run `consul connect envoy -ignore-envoy-compatibility`.
pub const DEFAULT_ENVOY_VERSION: &str = "1.26.8";

/// The `--version` line: Envoy's shape
/// (`envoy  version: <sha>/<version>/<status>/<build>/<ssl>`) with the
/// Envoy version first, so that Consul's `(\d+\.\d+\.\d+)` finds it before
/// veer's own version at the end.
pub fn version_line(envoy_version: &str, veer_version: &str) -> String {
    format!(
        "veer  version: 0000000000000000000000000000000000000000/{envoy_version}/Clean/RELEASE/rustls (veer {veer_version})"
    )
}

/// `VEER_ENVOY_VERSION` if it is a plain `major.minor.patch`, else the
/// default; the error names the bad value.
pub fn envoy_version(env: Option<&str>) -> Result<String, CliError> {
    match env {
        None | Some("") => Ok(DEFAULT_ENVOY_VERSION.to_string()),
        Some(v) => {
            let ok = v.split('.').count() == 3
                && v.split('.')
                    .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
            if ok {
                Ok(v.to_string())
            } else {
                Err(CliError::BadValue {
                    flag: "VEER_ENVOY_VERSION".into(),
                    value: v.into(),
                    reason: "expected major.minor.patch, e.g. 1.26.8".into(),
                })
            }
        }
    }
}

/// Why an Envoy command line was refused. [`CliError::classify`] gives a
/// bounded label for metrics.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CliError {
    #[error("unknown flag {0} (veer accepts Envoy's flags that consul-dataplane and `consul connect envoy` use; see `veer envoy --help`)")]
    UnknownFlag(String),
    #[error("flag {0} needs a value")]
    MissingValue(String),
    #[error("flag {0} takes no value")]
    UnexpectedValue(String),
    #[error("bad value {value:?} for {flag}: {reason}")]
    BadValue {
        flag: String,
        value: String,
        reason: String,
    },
    #[error("unexpected argument {0:?} (Envoy takes no positional arguments)")]
    Positional(String),
    #[error("{0} is not supported by veer (no hot restart)")]
    Unsupported(String),
}

impl CliError {
    pub fn classify(&self) -> &'static str {
        match self {
            CliError::UnknownFlag(_) => "unknown_flag",
            CliError::MissingValue(_) => "missing_value",
            CliError::UnexpectedValue(_) => "unexpected_value",
            CliError::BadValue { .. } => "bad_value",
            CliError::Positional(_) => "positional",
            CliError::Unsupported(_) => "unsupported",
        }
    }
}

/// What the process is asked to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Run (the default).
    Serve,
    /// Check the configuration and exit 0 or 1.
    Validate,
    /// Envoy's `init_only`: initialise and exit; veer treats it as validate.
    InitOnly,
    /// Print the version line and exit 0.
    Version,
    /// Print the hot-restart compatibility version and exit 0.
    HotRestartVersion,
    /// Print the accepted flags and exit 0.
    Help,
}

/// Envoy's log levels, mapped to tracing's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogLevel {
    Trace,
    Debug,
    Info,
    Warn,
    Error,
    /// Envoy's `critical`: veer logs errors.
    Critical,
    Off,
}

impl LogLevel {
    pub fn parse(s: &str) -> Option<LogLevel> {
        Some(match s.to_ascii_lowercase().as_str() {
            "trace" => LogLevel::Trace,
            "debug" => LogLevel::Debug,
            "info" => LogLevel::Info,
            "warning" | "warn" => LogLevel::Warn,
            "error" | "err" => LogLevel::Error,
            "critical" => LogLevel::Critical,
            "off" => LogLevel::Off,
            _ => return None,
        })
    }

    /// The `tracing` filter directive for this level.
    pub fn as_filter(self) -> &'static str {
        match self {
            LogLevel::Trace => "trace",
            LogLevel::Debug => "debug",
            LogLevel::Info => "info",
            LogLevel::Warn => "warn",
            LogLevel::Error | LogLevel::Critical => "error",
            LogLevel::Off => "off",
        }
    }
}

/// How logs are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

impl LogFormat {
    /// Envoy's `--log-format` is an spdlog pattern. One that writes JSON
    /// (it uses `%j`, Envoy's JSON-escaped message, or is a `{…}` object)
    /// becomes veer's JSON logs; any other pattern becomes veer's text logs.
    pub fn from_pattern(p: &str) -> LogFormat {
        let t = p.trim();
        if t.contains("%j") || (t.starts_with('{') && t.ends_with('}')) {
            LogFormat::Json
        } else {
            LogFormat::Text
        }
    }
}

/// Envoy's `--drain-strategy`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DrainStrategy {
    Gradual,
    Immediate,
}

/// A parsed Envoy command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EnvoyArgs {
    pub mode: Mode,
    /// `--config-path` / `-c` (may be a FIFO).
    pub config_path: Option<PathBuf>,
    /// `--config-yaml` (JSON or YAML), merged over the file when both are given.
    pub config_yaml: Option<String>,
    /// `--concurrency` (worker threads; 0 = Envoy's "one per CPU").
    pub concurrency: Option<u32>,
    /// `--drain-time-s`.
    pub drain_time: Option<Duration>,
    pub drain_strategy: DrainStrategy,
    pub log_level: LogLevel,
    /// `--component-log-level a:debug,b:trace` (validated; veer has no
    /// Envoy components, so these are not applied).
    pub component_log_levels: Vec<(String, LogLevel)>,
    pub log_format: LogFormat,
    /// `--log-path`: write logs to this file instead of stderr.
    pub log_path: Option<PathBuf>,
    /// `--service-cluster`, `--service-node`: the node's cluster and id when
    /// the bootstrap has none.
    pub service_cluster: Option<String>,
    pub service_node: Option<String>,
    /// `--allow-unknown-static-fields`: unknown bootstrap fields are logged,
    /// not refused.
    pub allow_unknown_static_fields: bool,
    /// Flags accepted without effect, as given (for one log line).
    pub ignored: Vec<String>,
    /// Repeated flags whose later value was dropped, and similar notes.
    pub warnings: Vec<String>,
}

impl Default for EnvoyArgs {
    fn default() -> Self {
        EnvoyArgs {
            mode: Mode::Serve,
            config_path: None,
            config_yaml: None,
            concurrency: None,
            drain_time: None,
            drain_strategy: DrainStrategy::Gradual,
            log_level: LogLevel::Info,
            component_log_levels: Vec::new(),
            log_format: LogFormat::Text,
            log_path: None,
            service_cluster: None,
            service_node: None,
            allow_unknown_static_fields: false,
            ignored: Vec::new(),
            warnings: Vec::new(),
        }
    }
}

/// Whether a flag takes a value, and what it does.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Value,
    Switch,
}

/// Every flag veer accepts: (long name, short name, kind).
const FLAGS: &[(&str, Option<&str>, Kind)] = &[
    ("--config-path", Some("-c"), Kind::Value),
    ("--config-yaml", None, Kind::Value),
    ("--mode", None, Kind::Value),
    ("--concurrency", None, Kind::Value),
    ("--drain-time-s", None, Kind::Value),
    ("--drain-strategy", None, Kind::Value),
    ("--parent-shutdown-time-s", None, Kind::Value),
    ("--log-level", Some("-l"), Kind::Value),
    ("--component-log-level", None, Kind::Value),
    ("--log-format", None, Kind::Value),
    ("--log-path", None, Kind::Value),
    ("--base-id", None, Kind::Value),
    ("--restart-epoch", None, Kind::Value),
    ("--service-cluster", None, Kind::Value),
    ("--service-node", None, Kind::Value),
    ("--service-zone", None, Kind::Value),
    ("--file-flush-interval-msec", None, Kind::Value),
    ("--local-address-ip-version", None, Kind::Value),
    ("--max-obj-name-len", None, Kind::Value),
    ("--disable-hot-restart", None, Kind::Switch),
    ("--use-dynamic-base-id", None, Kind::Switch),
    ("--log-format-escaped", None, Kind::Switch),
    ("--enable-fine-grain-logging", None, Kind::Switch),
    ("--allow-unknown-static-fields", None, Kind::Switch),
    ("--reject-unknown-dynamic-fields", None, Kind::Switch),
    ("--ignore-unknown-dynamic-fields", None, Kind::Switch),
    ("--enable-core-dump", None, Kind::Switch),
    ("--version", None, Kind::Switch),
    ("--hot-restart-version", None, Kind::Switch),
    ("--help", Some("-h"), Kind::Switch),
];

/// The flags, for `--help`.
pub fn help() -> String {
    let mut s = String::from(
        "veer in Envoy's place: accepts Envoy's command line as consul-dataplane and `consul connect envoy` pass it.\n\nFlags:\n",
    );
    for (long, short, kind) in FLAGS {
        let short = short.map(|s| format!(", {s}")).unwrap_or_default();
        let v = if *kind == Kind::Value { " <value>" } else { "" };
        s.push_str(&format!("  {long}{short}{v}\n"));
    }
    s
}

fn lookup(name: &str) -> Option<(&'static str, Kind)> {
    FLAGS
        .iter()
        .find(|(long, short, _)| *long == name || *short == Some(name))
        .map(|(long, _, kind)| (*long, *kind))
}

fn bad(flag: &str, value: &str, reason: impl Into<String>) -> CliError {
    CliError::BadValue {
        flag: flag.into(),
        value: value.into(),
        reason: reason.into(),
    }
}

fn parse_u32(flag: &str, v: &str) -> Result<u32, CliError> {
    v.trim()
        .parse::<u32>()
        .map_err(|_| bad(flag, v, "expected a non-negative integer"))
}

/// Parses Envoy's arguments (without argv[0]).
pub fn parse<S: AsRef<str>>(args: &[S]) -> Result<EnvoyArgs, CliError> {
    let mut out = EnvoyArgs::default();
    let mut seen: Vec<&'static str> = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let arg = args[i].as_ref();
        i += 1;
        if !arg.starts_with('-') || arg == "-" {
            return Err(CliError::Positional(arg.to_string()));
        }
        // "--flag=value", then "--flag value" in one argument.
        let (name, inline) = if let Some((n, v)) = arg.split_once('=') {
            (n, Some(v.to_string()))
        } else if let Some((n, v)) = arg.split_once(char::is_whitespace) {
            (n, Some(v.trim_start().to_string()))
        } else {
            (arg, None)
        };
        let Some((flag, kind)) = lookup(name) else {
            return Err(CliError::UnknownFlag(name.to_string()));
        };
        let value = match (kind, inline) {
            (Kind::Switch, Some(_)) => return Err(CliError::UnexpectedValue(flag.into())),
            (Kind::Switch, None) => None,
            (Kind::Value, Some(v)) => Some(v),
            (Kind::Value, None) => match args.get(i) {
                Some(v) => {
                    i += 1;
                    Some(v.as_ref().to_string())
                }
                None => return Err(CliError::MissingValue(flag.into())),
            },
        };
        if seen.contains(&flag) {
            out.warnings.push(format!(
                "{flag} given more than once; keeping the first value, ignoring {}",
                value.as_deref().unwrap_or("the repeat")
            ));
            continue;
        }
        seen.push(flag);
        let v = value.unwrap_or_default();
        match flag {
            "--config-path" => out.config_path = Some(PathBuf::from(v)),
            "--config-yaml" => out.config_yaml = Some(v),
            "--mode" => {
                let m = match v.as_str() {
                    "serve" => Mode::Serve,
                    "validate" => Mode::Validate,
                    "init_only" => Mode::InitOnly,
                    _ => return Err(bad(flag, &v, "expected serve, validate or init_only")),
                };
                // --version / --help win over --mode, as in Envoy.
                if matches!(out.mode, Mode::Serve | Mode::Validate | Mode::InitOnly) {
                    out.mode = m;
                }
            }
            "--concurrency" => out.concurrency = Some(parse_u32(flag, &v)?),
            "--drain-time-s" => {
                out.drain_time = Some(Duration::from_secs(u64::from(parse_u32(flag, &v)?)))
            }
            "--drain-strategy" => {
                out.drain_strategy = match v.as_str() {
                    "gradual" => DrainStrategy::Gradual,
                    "immediate" => DrainStrategy::Immediate,
                    _ => return Err(bad(flag, &v, "expected gradual or immediate")),
                }
            }
            "--log-level" => {
                out.log_level = LogLevel::parse(&v).ok_or_else(|| {
                    bad(
                        flag,
                        &v,
                        "expected trace, debug, info, warning, warn, error, critical or off",
                    )
                })?
            }
            "--component-log-level" => {
                for part in v.split(',').filter(|p| !p.trim().is_empty()) {
                    let (c, l) = part
                        .split_once(':')
                        .ok_or_else(|| bad(flag, &v, "expected component:level[,…]"))?;
                    let l = LogLevel::parse(l.trim())
                        .ok_or_else(|| bad(flag, &v, format!("bad level in {part:?}")))?;
                    out.component_log_levels.push((c.trim().to_string(), l));
                }
            }
            "--log-format" => out.log_format = LogFormat::from_pattern(&v),
            "--log-path" => out.log_path = Some(PathBuf::from(v)),
            "--restart-epoch" => {
                if parse_u32(flag, &v)? != 0 {
                    return Err(CliError::Unsupported(format!("--restart-epoch {v}")));
                }
            }
            "--service-cluster" => out.service_cluster = Some(v),
            "--service-node" => out.service_node = Some(v),
            "--allow-unknown-static-fields" => out.allow_unknown_static_fields = true,
            "--version" => out.mode = Mode::Version,
            "--hot-restart-version" => {
                if out.mode != Mode::Version {
                    out.mode = Mode::HotRestartVersion
                }
            }
            "--help" => out.mode = Mode::Help,
            "--base-id"
            | "--parent-shutdown-time-s"
            | "--file-flush-interval-msec"
            | "--max-obj-name-len" => {
                parse_u32(flag, &v)?;
                out.ignored.push(format!("{flag} {v}"));
            }
            "--local-address-ip-version" => {
                if v != "v4" && v != "v6" {
                    return Err(bad(flag, &v, "expected v4 or v6"));
                }
                out.ignored.push(format!("{flag} {v}"));
            }
            "--service-zone" => out.ignored.push(format!("{flag} {v}")),
            // Switches with nothing to do: veer never hot-restarts, has no
            // base id, writes its own log format, ignores nothing dynamic
            // unless the translation says so.
            _ => out.ignored.push(flag.to_string()),
        }
    }
    Ok(out)
}

/// Whether argv (without argv[0]) looks like Envoy's rather than veer's own
/// subcommands: its first argument is one of Envoy's flags.
pub fn looks_like_envoy<S: AsRef<str>>(args: &[S]) -> bool {
    let Some(first) = args.first() else {
        return false;
    };
    let first = first.as_ref();
    if !first.starts_with('-') {
        return false;
    }
    let name = first
        .split(|c: char| c == '=' || c.is_whitespace())
        .next()
        .unwrap_or(first);
    // `--help` stays veer's own; `--version` is Envoy's (its line carries
    // veer's version too), for `consul connect envoy -envoy-binary veer`.
    !matches!(name, "--help" | "-h") && lookup(name).is_some()
}
