//! The `veer` command.
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

mod demo;
mod file_source;
mod run;

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
    /// filter such as `info,veer::access=off`. Also from VEER_LOG.
    #[arg(long, env = "VEER_LOG", default_value = "info")]
    pub log_level: String,
    /// Log format.
    #[arg(long, env = "VEER_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the sidecar.
    Run {
        /// The TOML configuration file.
        #[arg(long, short)]
        config: PathBuf,
        /// Worker threads of the data plane.
        #[arg(long, default_value_t = 2)]
        concurrency: usize,
        /// On SIGTERM: stop accepting inbound, keep outbound serving, and
        /// wait this long for open connections before exiting.
        #[arg(long, default_value = "30s", value_parser = parse_duration)]
        shutdown_grace_period: Duration,
        #[command(flatten)]
        log: LogArgs,
    },
    /// Check a configuration file (and the files it names) without starting anything.
    Validate {
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
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Validate { config } => match veer_core::config::load(&config) {
            Ok(l) => {
                println!(
                    "{}: ok ({} as {}, {} upstreams, {} intentions)",
                    config.display(),
                    l.spec.listen.inbound,
                    l.spec.identity,
                    l.spec.upstreams.len(),
                    l.spec.intentions.len()
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
            concurrency,
            shutdown_grace_period,
            log,
        } => {
            init_logs(&log);
            run::run(config, concurrency.max(1), shutdown_grace_period)
        }
        Cmd::Demo { keep, log } => {
            init_logs(&log);
            demo::demo(keep)
        }
        Cmd::RedirectTraffic { .. } => unreachable!("handled before parsing"),
    }
}
