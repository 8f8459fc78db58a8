//! `veer redirect-traffic`: Consul's transparent-proxy traffic redirection,
//! made idempotent and atomic.
//!
//! It installs exactly the `nat` rule set of Consul's `sdk/iptables` package
//! (chains `CONSUL_PROXY_INBOUND`, `CONSUL_PROXY_IN_REDIRECT`,
//! `CONSUL_PROXY_OUTPUT`, `CONSUL_PROXY_REDIRECT`, `CONSUL_DNS_REDIRECT`) and
//! accepts the same flags and the same `CONSUL_REDIRECT_TRAFFIC_CONFIG` JSON as
//! `consul connect redirect-traffic` / consul-k8s. Differences from Consul:
//!
//! * **Atomic**: each address family is applied with one
//!   `iptables-restore --noflush` transaction; a failure changes nothing.
//!   With IPv6 (dual stack) both inputs are checked with `--test` first, and if
//!   the IPv6 commit still fails the IPv4 table is put back as it was.
//! * **Idempotent**: the five chains are declared with `:CHAIN - [0:0]`, which
//!   creates or flushes them inside the transaction, and every existing
//!   `OUTPUT`/`PREROUTING`/`INPUT`/`POSTROUTING` rule that jumps to one of them
//!   (read from `iptables-save -t nat` just before) is deleted with `-D` in the
//!   same transaction. Running twice leaves one copy of each rule; a restarted
//!   init container exits 0.
//! * **Cleanup**: `cleanup` (or `-cleanup`) removes the five chains and every
//!   rule jumping to them, and nothing else.
//! * **Back ends**: nf_tables (`iptables-nft-restore`) and legacy
//!   (`iptables-legacy-restore`) are probed; the one used is printed on stderr,
//!   and when neither `nat` table is usable the reason is given for each.
//!
//! Configuration precedence (see [`cli`]): `CONSUL_REDIRECT_TRAFFIC_CONFIG`
//! is the base; `-proxy-id` (the proxy registration) overrides its ports and
//! adds inbound exclusions; single-valued flags override; repeatable
//! `-exclude-*` flags are appended.
//!
//! Layout: [`config`] (Consul's `Config` and its validation), [`rules`] (pure
//! rule generation and `iptables-restore` texts), [`exec`] (back-end detection
//! and the executor), [`consul`] (reading a proxy registration for
//! `-proxy-id`), [`cli`] (flags). The crate has no `unsafe`: network
//! namespaces are entered with `nsenter --net=PATH`.
#![deny(unsafe_code)]

pub mod cli;
pub mod config;
pub mod consul;
pub mod exec;
pub mod rules;

use std::ffi::OsString;
use std::io::Write;

pub use cli::Cli;
pub use config::Config;
pub use exec::{Backend, BackendChoice, BackendProblem, ProblemKind};
pub use rules::{Family, NatState, Rule};

/// The one error type of this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The command line is malformed (unknown flag, missing or unparsable value).
    /// The texts follow Go's `flag` package, as Consul's CLI prints them.
    #[error("{0}")]
    Usage(String),
    /// The configuration is invalid. Where Consul has a message for the case
    /// (for example "ProxyUserID is required to set up traffic redirection")
    /// the text is Consul's.
    #[error("{0}")]
    Invalid(String),
    /// `CONSUL_REDIRECT_TRAFFIC_CONFIG` is not the JSON consul-k8s writes.
    #[error("invalid CONSUL_REDIRECT_TRAFFIC_CONFIG: {0}")]
    EnvConfig(String),
    /// Reading the proxy registration from the Consul agent (`-proxy-id`) failed.
    #[error("{0}")]
    Consul(String),
    /// No back end has a usable `nat` table; one entry per back end and family tried.
    #[error("{}", exec::no_backend_message(.0))]
    NoBackend(Vec<BackendProblem>),
    /// An external command failed. The first part is Consul's executor message
    /// (`failed to run command: <cmd>, err: <err>, output: <output>`); `context`
    /// adds the offending input line and what was (not) changed.
    #[error("failed to run command: {command}, err: {status}, output: {output}{context}")]
    Command {
        command: String,
        status: String,
        output: String,
        context: String,
    },
    /// An I/O error outside a command's own failure (spawning, reading a file).
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> Error {
        Error::Io {
            what: what.into(),
            source,
        }
    }
}

/// Environment variable holding consul-k8s' JSON configuration.
pub const ENV_CONFIG: &str = "CONSUL_REDIRECT_TRAFFIC_CONFIG";
/// Environment variable consul-k8s sets for dual-stack pods (`true` enables IPv6).
pub const ENV_DUAL_STACK: &str = "CONSUL_DUAL_STACK";

/// Entry point for `veer redirect-traffic`: `args` are the arguments after
/// `redirect-traffic`. Reads the process environment, prints to stdout/stderr,
/// and returns the process exit code (0 on success, also when the rules were
/// already in place; 1 on any error).
pub fn main(args: &[OsString]) -> i32 {
    let env = |k: &str| std::env::var(k).ok();
    let stdout = std::io::stdout();
    let stderr = std::io::stderr();
    run(args, &env, &mut stdout.lock(), &mut stderr.lock())
}

/// [`main`] with the environment and the output streams passed in (for tests
/// and embedding). `env` is consulted for `CONSUL_REDIRECT_TRAFFIC_CONFIG`,
/// `CONSUL_DUAL_STACK`, `CONSUL_HTTP_ADDR`, `CONSUL_HTTP_TOKEN`,
/// `CONSUL_HTTP_TOKEN_FILE`, `CONSUL_HTTP_SSL` and `PATH` (where the iptables
/// binaries and `nsenter` are looked up).
pub fn run(
    args: &[OsString],
    env: &dyn Fn(&str) -> Option<String>,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> i32 {
    let cli = match cli::parse(args) {
        Ok(c) => c,
        Err(e) => {
            let _ = writeln!(err, "{e}");
            let _ = writeln!(err, "Run 'veer redirect-traffic -help' for usage.");
            return 1;
        }
    };
    if cli.help {
        let _ = write!(out, "{}", cli::HELP);
        return 0;
    }
    match execute(&cli, env, out, err) {
        Ok(()) => 0,
        Err(e) => {
            let _ = writeln!(err, "error: {e}");
            1
        }
    }
}

fn execute(
    cli: &Cli,
    env: &dyn Fn(&str) -> Option<String>,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<(), Error> {
    let cfg = cli::build_config(cli, env)?;
    let runner = exec::Runner::new(
        (!cfg.netns.is_empty()).then(|| cfg.netns.clone().into()),
        env("PATH"),
    );
    if cli.cleanup {
        return exec::cleanup(&runner, cli.backend, cfg.dual_stack, out, err);
    }
    let families = rules::families(&cfg);
    let mut plan = Vec::new();
    for f in &families {
        plan.push((*f, rules::rules(&cfg, *f)?));
    }
    if cli.dry_run {
        return exec::dry_run(&runner, cli.backend, &plan, out, err);
    }
    exec::apply(&runner, cli.backend, &plan, out, err)
}
