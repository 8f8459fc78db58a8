//! The `veer` command.
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use veer_core::config::AdminBind;

mod demo;
mod envoy_mode;
mod file_source;
mod run;
mod xds_source;

#[derive(Parser)]
#[command(
    name = "veer",
    version,
    about = "A pure-Rust sidecar data plane for Consul's service mesh"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Args, Clone)]
pub struct LogArgs {
    /// Log filter: a level (error, warn, info, debug, trace) or a tracing
    /// filter such as `info,veer::access=off` (which turns off the one-line
    /// access log written when each connection closes). Also from VEER_LOG.
    #[arg(long, env = "VEER_LOG", default_value = "info")]
    pub log_level: String,
    /// Log format.
    #[arg(long, env = "VEER_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,
}

/// Consul as the control plane (instead of --config).
#[derive(clap::Args, Clone, Default)]
pub struct ConsulArgs {
    /// Follow this proxy registration on the local Consul agent
    /// (e.g. web-sidecar-proxy).
    #[arg(long, conflicts_with = "sidecar_for")]
    pub proxy_id: Option<String>,
    /// Follow the sidecar proxy registered for this service ID.
    #[arg(long)]
    pub sidecar_for: Option<String>,
    /// Transparent mode for agents that predate `Proxy.Mode` (Consul < 1.10):
    /// outbound listener and implicit upstreams.
    #[arg(long)]
    pub transparent: bool,
    /// The transparent outbound listener's port (127.0.0.1 and [::1]),
    /// over the registration's, service-defaults' and proxy-defaults'
    /// `TransparentProxy.OutboundListenerPort` (default 15001). Use the
    /// port given to `veer redirect-traffic -proxy-outbound-port`.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    pub outbound_port: Option<u16>,
    /// The agent's HTTP API (default: CONSUL_HTTP_ADDR, else 127.0.0.1:8500;
    /// http://, https:// or unix://).
    #[arg(long)]
    pub http_addr: Option<String>,
    /// ACL token (default: CONSUL_HTTP_TOKEN).
    #[arg(long)]
    pub token: Option<String>,
    /// File holding the ACL token (default: CONSUL_HTTP_TOKEN_FILE).
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// CA bundle for an https agent address (default: CONSUL_CACERT).
    #[arg(long)]
    pub ca_file: Option<PathBuf>,
    /// Transparent mode: how many services are read from the agent at once
    /// after a change (each read is one agent connection while it lasts).
    #[arg(long, env = "VEER_CONSUL_MAX_READS", default_value_t = veer_consul::options::DEFAULT_MAX_READS)]
    pub consul_max_reads: usize,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the sidecar.
    Run {
        /// The TOML configuration file (the static source).
        #[arg(long, short, conflicts_with_all = ["proxy_id", "sidecar_for"])]
        config: Option<PathBuf>,
        #[command(flatten)]
        consul: Box<ConsulArgs>,
        /// Worker threads of the data plane (at least 1).
        #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..))]
        concurrency: u16,
        /// On SIGTERM or POST /quitquitquit: stop accepting inbound, keep
        /// outbound serving, and wait up to this long for open connections
        /// before exiting 0. A second SIGTERM, or SIGINT, exits at once.
        #[arg(long, default_value = "30s", value_parser = parse_duration)]
        shutdown_grace_period: Duration,
        /// Keep the outbound listener serving at least this long after
        /// SIGTERM even when no connection is open (for apps that still dial
        /// out while they shut down, when veer is not a native sidecar that
        /// Kubernetes stops after the app).
        #[arg(long, default_value = "0s", value_parser = parse_duration)]
        shutdown_min_wait: Duration,
        /// The admin endpoint (/ready, /stats/prometheus, /config_dump,
        /// /drain, /quitquitquit); "" turns it off. Overrides `[admin] bind`;
        /// default 127.0.0.1:19000.
        #[arg(long, env = "VEER_ADMIN_BIND", value_parser = parse_admin_bind)]
        admin_bind: Option<AdminBind>,
        /// A separate listener for /stats/prometheus (and /ready), like
        /// Consul's envoy_prometheus_bind_addr; "" turns it off. Overrides
        /// `[admin] prometheus_bind`; default off.
        #[arg(long, env = "VEER_PROMETHEUS_BIND", value_parser = parse_admin_bind)]
        prometheus_bind: Option<AdminBind>,
        #[command(flatten)]
        log: LogArgs,
    },
    /// Wait until a running veer is ready (GET /ready answers 200), for
    /// application entrypoints: `veer await-ready && exec my-app`.
    #[command(name = "await-ready")]
    AwaitReady {
        /// The admin endpoint of the veer to wait for (HOST:PORT, e.g.
        /// 127.0.0.1:19000 or localhost:19000).
        #[arg(long, env = "VEER_ADMIN_ADDR", default_value = AdminBind::DEFAULT, value_parser = parse_host_port)]
        admin: std::net::SocketAddr,
        /// Only a veer serving this service counts as ready (its `/ready`
        /// names the service in the `veer-service` header), so that another
        /// sidecar's admin endpoint on the same address is not taken for it.
        #[arg(long)]
        service: Option<String>,
        /// Give up (exit 1) after this long.
        #[arg(long, default_value = "60s", value_parser = parse_duration)]
        timeout: Duration,
        /// Time between two polls.
        #[arg(long, default_value = "100ms", value_parser = parse_duration)]
        interval: Duration,
    },
    /// Check a configuration file (and the files it names) without starting anything.
    Validate {
        /// The TOML configuration file to check (as `veer run --config`).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Build a local demo mesh in network namespaces (needs root), show an
    /// allowed, a denied and a passthrough call, and tear it down.
    Demo {
        /// Keep the demo running until Ctrl-C instead of tearing it down.
        #[arg(long)]
        keep: bool,
        #[command(flatten)]
        log: LogArgs,
    },
    /// Run in Envoy's place, with Envoy's command line and bootstrap (as
    /// consul-dataplane and `consul connect envoy` start `envoy`); also when
    /// invoked as `envoy` or with an Envoy flag first. See `veer envoy --help`.
    #[command(disable_help_flag = true)]
    Envoy {
        #[arg(allow_hyphen_values = true, trailing_var_arg = true, num_args = 0..)]
        args: Vec<std::ffi::OsString>,
    },
    /// Install Consul's transparent-proxy iptables rules (see `veer redirect-traffic -h`).
    #[command(name = "redirect-traffic", disable_help_flag = true)]
    RedirectTraffic {
        #[arg(allow_hyphen_values = true, trailing_var_arg = true, num_args = 0..)]
        args: Vec<std::ffi::OsString>,
    },
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    veer_core::duration::parse(s)
}

/// `HOST:PORT`, the host an IP or a name (resolved; the first address).
fn parse_host_port(s: &str) -> Result<std::net::SocketAddr, String> {
    use std::net::ToSocketAddrs;
    if let Ok(a) = s.parse() {
        return Ok(a);
    }
    s.to_socket_addrs()
        .map_err(|e| format!("{s:?} is not HOST:PORT: {e}"))?
        .next()
        .ok_or_else(|| format!("{s:?} resolves to no address"))
}

/// What `veer run` says when no source is given.
const NO_SOURCE: &str = "veer run needs a source of configuration, one of:
  --config FILE                  a TOML file (see `veer validate --config FILE`)
  --proxy-id ID / --sidecar-for SERVICE_ID
                                 the local Consul agent (CONSUL_HTTP_ADDR, default 127.0.0.1:8500)
  Envoy's --config-path/--config-yaml (xDS, as consul-dataplane and `consul connect envoy` start it)";

fn parse_admin_bind(s: &str) -> Result<AdminBind, String> {
    AdminBind::parse(s)
}

pub fn init_logs(log: &LogArgs) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_new(&log.log_level).unwrap_or_else(|e| {
        eprintln!("veer: bad --log-level {:?}: {e}; using info", log.log_level);
        EnvFilter::new("info")
    });
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if log.log_format == "json" {
        b.json().flatten_event(true).init();
    } else {
        b.with_ansi(false).init();
    }
}

fn main() -> ExitCode {
    // Go-style single-dash flags after `redirect-traffic` are passed through untouched.
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if argv.get(1).is_some_and(|a| a == "redirect-traffic") {
        return ExitCode::from(veer_redirect::main(&argv[2..]) as u8);
    }
    // Envoy's command line: invoked as `envoy`, as `veer envoy …`, or with
    // an Envoy flag first (consul-dataplane, `consul connect envoy`).
    if let Some(args) = envoy_mode::envoy_argv(&argv) {
        return envoy_mode::main(args);
    }
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Validate { config } => match veer_core::config::load(&config) {
            Ok(l) => {
                println!(
                    "{}: ok ({} as {}, {} upstreams, {} intentions, {} expose paths)",
                    config.display(),
                    l.spec.listen.inbound,
                    l.spec.identity,
                    l.spec.upstreams.len(),
                    l.spec.intentions.len(),
                    l.spec.expose.len()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("veer: {e}");
                ExitCode::from(2)
            }
        },
        Cmd::Run {
            config,
            consul,
            concurrency,
            shutdown_grace_period,
            shutdown_min_wait,
            admin_bind,
            prometheus_bind,
            log,
        } => {
            if config.is_none() && consul.proxy_id.is_none() && consul.sidecar_for.is_none() {
                eprintln!("veer: {NO_SOURCE}");
                return ExitCode::from(2);
            }
            init_logs(&log);
            let source = match config {
                Some(path) => run::Source::File(path),
                None => run::Source::Consul(Box::new(veer_consul::Flags {
                    http_addr: consul.http_addr,
                    token: consul.token,
                    token_file: consul.token_file,
                    ca_file: consul.ca_file,
                    proxy_id: consul.proxy_id,
                    sidecar_for: consul.sidecar_for,
                    transparent: consul.transparent,
                    max_reads: Some(consul.consul_max_reads),
                    outbound_port: consul.outbound_port,
                })),
            };
            run::run(run::RunOpts {
                source,
                threads: usize::from(concurrency),
                grace: shutdown_grace_period,
                min_wait: shutdown_min_wait,
                admin_bind,
                prometheus_bind,
            })
        }
        Cmd::AwaitReady {
            admin,
            service,
            timeout,
            interval,
        } => match veer_admin::client::await_ready(admin, service.as_deref(), timeout, interval) {
            Ok(took) => {
                eprintln!("veer: ready (after {} ms)", took.as_millis());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("veer: {e}");
                ExitCode::FAILURE
            }
        },
        Cmd::Demo { keep, log } => {
            init_logs(&log);
            demo::demo(keep)
        }
        Cmd::RedirectTraffic { .. } | Cmd::Envoy { .. } => unreachable!("handled before parsing"),
    }
}
