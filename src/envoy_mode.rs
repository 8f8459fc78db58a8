//! `veer` in Envoy's place: when invoked as `envoy` (argv[0]'s basename),
//! as `veer envoy <args>`, or with one of Envoy's flags first
//! (`--config-yaml`, `--config-path`, `-c`, `--version`, `--mode`, …), the
//! command line is Envoy's (see [`veer_xds::envoy_cli`]) and the
//! configuration an Envoy bootstrap (see [`veer_xds::bootstrap`]).
use crate::run::{self, RunOpts, Source};
use crate::xds_source::XdsStart;
use std::ffi::OsString;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;
use veer_xds::bootstrap::{self, Bootstrap, CaSource};
use veer_xds::envoy_cli::{self, EnvoyArgs, LogFormat, Mode};

/// Envoy's arguments (without argv[0]) when this invocation is Envoy's.
pub fn envoy_argv(argv: &[OsString]) -> Option<Vec<String>> {
    let s: Vec<String> = argv
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let name = s
        .first()
        .map(|a0| {
            Path::new(a0)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        })
        .unwrap_or_default();
    if name == "envoy" {
        return Some(s[1..].to_vec());
    }
    if s.get(1).is_some_and(|a| a == "envoy") {
        return Some(s[2..].to_vec());
    }
    if s.len() > 1 && envoy_cli::looks_like_envoy(&s[1..]) {
        return Some(s[1..].to_vec());
    }
    None
}

fn init_logs(a: &EnvoyArgs) -> Result<(), String> {
    use tracing_subscriber::fmt::writer::BoxMakeWriter;
    use tracing_subscriber::EnvFilter;
    // VEER_LOG (a tracing filter) wins over --log-level.
    let filter = match std::env::var("VEER_LOG") {
        Ok(f) if !f.is_empty() => {
            EnvFilter::try_new(&f).map_err(|e| format!("bad VEER_LOG {f:?}: {e}"))?
        }
        // Envoy's log level covers its own logs, not access logs (Consul
        // configures none unless proxy-defaults `AccessLogs` asks), so
        // veer's per-connection lines stay off here; `VEER_LOG` can turn
        // them on (`info,veer::access=info`).
        _ => EnvFilter::new(format!("{},veer::access=off", a.log_level.as_filter())),
    };
    let writer = match &a.log_path {
        Some(p) => {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|e| format!("--log-path {}: {e}", p.display()))?;
            BoxMakeWriter::new(std::sync::Mutex::new(f))
        }
        None => BoxMakeWriter::new(std::io::stderr),
    };
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    match a.log_format {
        LogFormat::Json => b.json().flatten_event(true).init(),
        LogFormat::Text => b.with_ansi(false).init(),
    }
    Ok(())
}

/// Reads and checks the bootstrap: what `--mode validate` reports and what
/// serving starts from.
pub fn load(a: &EnvoyArgs) -> Result<Bootstrap, String> {
    let doc = bootstrap::read_config(a.config_path.as_deref(), a.config_yaml.as_deref())
        .map_err(|e| e.to_string())?;
    let mut b = bootstrap::parse(
        doc,
        bootstrap::Options {
            allow_unknown_fields: a.allow_unknown_static_fields,
        },
    )
    .map_err(|e| e.to_string())?;
    if b.node.id.is_empty() {
        b.node.id = a.service_node.clone().unwrap_or_default();
    }
    if b.node.cluster.is_empty() {
        b.node.cluster = a.service_cluster.clone().unwrap_or_default();
    }
    // As Envoy: ADS needs both (Consul finds the proxy by node.id).
    if b.node.id.is_empty() || b.node.cluster.is_empty() {
        return Err(
            "node.id and node.cluster are required (in the bootstrap, or --service-node / --service-cluster)"
                .into(),
        );
    }
    if let Some(tls) = &b.ads.tls {
        if let CaSource::File(_) = tls.ca {
            tls.ca
                .pem()
                .map_err(|e| format!("the xDS cluster {:?}: {e}", b.ads.cluster))?;
        }
    }
    Ok(b)
}

fn describe(a: &EnvoyArgs) -> String {
    match (&a.config_path, &a.config_yaml) {
        (Some(p), None) => p.display().to_string(),
        (None, Some(_)) => "--config-yaml".into(),
        (Some(p), Some(_)) => format!("{} + --config-yaml", p.display()),
        (None, None) => "(no configuration)".into(),
    }
}

/// Runs Envoy's command line; `args` excludes argv[0].
pub fn main(args: Vec<String>) -> ExitCode {
    let a = match envoy_cli::parse(&args) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("veer: {e}");
            return ExitCode::FAILURE;
        }
    };
    match a.mode {
        Mode::Version => {
            return match envoy_cli::envoy_version(
                std::env::var("VEER_ENVOY_VERSION").ok().as_deref(),
            ) {
                Ok(v) => {
                    println!("{}", envoy_cli::version_line(&v, env!("CARGO_PKG_VERSION")));
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("veer: {e}");
                    ExitCode::FAILURE
                }
            };
        }
        Mode::HotRestartVersion => {
            println!("hot restart is disabled (veer does not hot-restart)");
            return ExitCode::SUCCESS;
        }
        Mode::Help => {
            print!("{}", envoy_cli::help());
            return ExitCode::SUCCESS;
        }
        Mode::Validate | Mode::InitOnly => {
            return match load(&a) {
                Ok(b) => {
                    println!(
                        "{}: ok (node {} in {}, ADS {} via {}, admin {}, {} static listeners{})",
                        describe(&a),
                        b.node.id,
                        b.node.cluster,
                        b.ads.addr,
                        b.ads.cluster,
                        b.admin.map_or_else(|| "off".into(), |x| x.to_string()),
                        b.listeners.len(),
                        if b.ignored.is_empty() {
                            String::new()
                        } else {
                            format!("; not applied: {}", b.ignored.join(", "))
                        }
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("veer: {}: {e}", describe(&a));
                    ExitCode::FAILURE
                }
            };
        }
        Mode::Serve => {}
    }
    if let Err(e) = init_logs(&a) {
        eprintln!("veer: {e}");
        return ExitCode::FAILURE;
    }
    for w in &a.warnings {
        tracing::warn!("{w}");
    }
    if !a.ignored.is_empty() {
        tracing::info!(flags = ?a.ignored, "Envoy flags accepted without effect");
    }
    if !a.component_log_levels.is_empty() {
        tracing::info!(levels = ?a.component_log_levels, "--component-log-level accepted; veer has no Envoy components, not applied");
    }
    let b = match load(&a) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("veer: {}: {e}", describe(&a));
            return ExitCode::FAILURE;
        }
    };
    let threads = match a.concurrency {
        None => 2,
        Some(0) => std::thread::available_parallelism().map_or(2, |n| n.get()),
        Some(n) => n as usize,
    };
    run::run(RunOpts {
        source: Source::Xds(Box::new(XdsStart { bootstrap: b })),
        threads,
        // Envoy's drain time bounds how long veer waits for open
        // connections when asked to quit.
        grace: a.drain_time.unwrap_or(Duration::from_secs(30)),
        min_wait: Duration::ZERO,
        admin_bind: None,
        prometheus_bind: None,
    })
}
