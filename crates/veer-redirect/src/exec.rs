//! The executor: finds a usable iptables back end (nf_tables or legacy), reads
//! the current `nat` table with `iptables-save -t nat`, and applies the texts
//! from [`crate::rules`] with `iptables-restore --noflush`, inside a network
//! namespace via `nsenter --net=PATH` when one is given.
//!
//! Back-end choice (`-iptables-backend auto`, the default): every back end
//! whose binaries exist is probed with `<family>-<backend>-save -t nat`. Among
//! the usable ones, one whose table already holds Consul's chains wins (so a
//! re-run or a cleanup acts where the rules are); otherwise the system default
//! (what `iptables-restore` on `PATH` resolves to) comes first. If the apply
//! fails because the kernel lacks the table/extension, the next usable back end
//! is tried (the failed transaction changed nothing).
use std::ffi::OsString;
use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::rules::{self, Family, NatState, Rule};
use crate::Error;

/// An iptables back end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Backend {
    /// nf_tables (`iptables-nft-restore`, `xtables-nft-multi`).
    Nft,
    /// The legacy x_tables kernel interface (`iptables-legacy-restore`).
    Legacy,
}

impl Backend {
    /// `nft` or `legacy`.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Nft => "nft",
            Backend::Legacy => "legacy",
        }
    }

    fn other(self) -> Backend {
        match self {
            Backend::Nft => Backend::Legacy,
            Backend::Legacy => Backend::Nft,
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Backend {
    type Err = ();
    fn from_str(s: &str) -> Result<Backend, ()> {
        match s {
            "nft" | "nf_tables" | "nftables" => Ok(Backend::Nft),
            "legacy" => Ok(Backend::Legacy),
            _ => Err(()),
        }
    }
}

/// `-iptables-backend`: pick automatically or use one back end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BackendChoice {
    #[default]
    Auto,
    Fixed(Backend),
}

/// Why a back end's `nat` table cannot be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProblemKind {
    /// The `iptables-*-save`/`-restore` binary is not installed.
    MissingBinary,
    /// Not root / no `CAP_NET_ADMIN` in the namespace.
    PermissionDenied,
    /// The kernel lacks the table or extension (module not loaded / not built).
    MissingKernelSupport,
    /// Anything else (the command's output says what).
    Other,
}

impl ProblemKind {
    fn describe(self) -> &'static str {
        match self {
            ProblemKind::MissingBinary => "missing binary",
            ProblemKind::PermissionDenied => {
                "permission denied (needs root or the NET_ADMIN capability)"
            }
            ProblemKind::MissingKernelSupport => {
                "the kernel has no usable nat table for this back end (module missing or not loaded)"
            }
            ProblemKind::Other => "nat table not usable",
        }
    }
}

/// One back end/family that could not be used, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendProblem {
    pub backend: Backend,
    pub family: Family,
    pub kind: ProblemKind,
    /// The command output or the missing binary's name.
    pub detail: String,
}

impl fmt::Display for BackendProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ({}): {}: {}",
            self.backend,
            self.family,
            self.kind.describe(),
            self.detail
        )
    }
}

/// Text of [`Error::NoBackend`].
pub fn no_backend_message(problems: &[BackendProblem]) -> String {
    let mut s = String::from("no usable iptables nat table");
    for p in problems {
        s.push_str("\n  ");
        s.push_str(&p.to_string());
    }
    s
}

/// Classifies the output of a failed `iptables-save`/`-restore`.
pub fn classify(output: &str) -> ProblemKind {
    let o = output.to_ascii_lowercase();
    if o.contains("permission denied")
        || o.contains("you must be root")
        || o.contains("operation not permitted")
    {
        ProblemKind::PermissionDenied
    } else if o.contains("table does not exist")
        || o.contains("do you need to insmod")
        || o.contains("protocol not supported")
        || o.contains("address family not supported")
        || o.contains("operation not supported")
        || o.contains("couldn't load target")
        || o.contains("couldn't load match")
        || o.contains("could not process rule: no such file or directory")
        || o.contains("no chain/target/match by that name")
    {
        ProblemKind::MissingKernelSupport
    } else {
        ProblemKind::Other
    }
}

/// Runs programs, inside a network namespace when one is set.
#[derive(Debug, Clone)]
pub struct Runner {
    netns: Option<PathBuf>,
    path: String,
}

/// What a finished command did.
#[derive(Debug, Clone)]
pub struct Ran {
    /// The command line as run (including `nsenter`).
    pub command: String,
    pub success: bool,
    /// Go-style status: `exit status 2`, `signal: 9`.
    pub status: String,
    pub stdout: String,
    /// stdout followed by stderr.
    pub output: String,
}

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

impl Runner {
    /// `netns`: path of a network namespace (`/var/run/netns/x`) or `None`;
    /// `path_env`: the `PATH` to look binaries up in (a default when unset).
    pub fn new(netns: Option<PathBuf>, path_env: Option<String>) -> Runner {
        Runner {
            netns,
            path: path_env.unwrap_or_else(|| DEFAULT_PATH.to_string()),
        }
    }

    /// The namespace commands run in, if any.
    pub fn netns(&self) -> Option<&Path> {
        self.netns.as_deref()
    }

    /// Finds an executable on the runner's `PATH`.
    pub fn which(&self, name: &str) -> Option<PathBuf> {
        use std::os::unix::fs::PermissionsExt;
        std::env::split_paths(&self.path)
            .map(|d| d.join(name))
            .find(|p| {
                std::fs::metadata(p)
                    .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            })
    }

    /// Runs `program args` (with `input` on stdin), via `nsenter --net=PATH --`
    /// when a namespace is set. Fails only when the command cannot be started.
    pub fn run(&self, program: &Path, args: &[&str], input: Option<&str>) -> Result<Ran, Error> {
        let mut argv: Vec<OsString> = Vec::new();
        if let Some(ns) = &self.netns {
            if !ns.exists() {
                return Err(Error::Invalid(format!(
                    "network namespace {}: no such file",
                    ns.display()
                )));
            }
            let nsenter = self.which("nsenter").ok_or_else(|| {
                Error::Invalid(format!(
                    "-netns {} needs nsenter (util-linux), which is not in PATH",
                    ns.display()
                ))
            })?;
            argv.push(nsenter.into());
            let mut net = OsString::from("--net=");
            net.push(ns);
            argv.push(net);
            argv.push("--".into());
        }
        argv.push(program.into());
        argv.extend(args.iter().map(OsString::from));
        let command = argv
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ");
        let mut child = Command::new(&argv[0])
            .args(&argv[1..])
            .stdin(if input.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| Error::io(format!("starting {command}"), e))?;
        let stdin = child.stdin.take();
        let result = std::thread::scope(|s| {
            if let (Some(mut w), Some(text)) = (stdin, input) {
                s.spawn(move || {
                    // A write error shows up as the command's own failure.
                    let _ = w.write_all(text.as_bytes());
                });
            }
            child.wait_with_output()
        });
        let out = result.map_err(|e| Error::io(format!("running {command}"), e))?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr);
        let output = format!("{stdout}{stderr}").trim_end().to_string();
        let status = match (out.status.code(), {
            use std::os::unix::process::ExitStatusExt;
            out.status.signal()
        }) {
            (Some(c), _) => format!("exit status {c}"),
            (None, Some(s)) => format!("signal: {s}"),
            _ => out.status.to_string(),
        };
        Ok(Ran {
            command,
            success: out.status.success(),
            status,
            stdout,
            output,
        })
    }

    /// The system's default back end: what `iptables-restore` (or `iptables`)
    /// on `PATH` resolves to, with the resolved file for messages.
    pub fn system_default(&self) -> Option<(Backend, PathBuf)> {
        let p = self
            .which("iptables-restore")
            .or_else(|| self.which("iptables"))?;
        let real = std::fs::canonicalize(&p).unwrap_or(p);
        Some((variant_of(&real), real))
    }

    fn tools(
        &self,
        backend: Backend,
        family: Family,
    ) -> Result<(PathBuf, PathBuf), BackendProblem> {
        let cmd = family.command();
        let save = format!("{cmd}-{}-save", backend.name());
        let restore = format!("{cmd}-{}-restore", backend.name());
        if let (Some(s), Some(r)) = (self.which(&save), self.which(&restore)) {
            return Ok((s, r));
        }
        // Images with a single back end may only have the plain names.
        let plain_save = self.which(&format!("{cmd}-save"));
        let plain_restore = self.which(&format!("{cmd}-restore"));
        if let (Some(s), Some(r)) = (plain_save, plain_restore) {
            let real = std::fs::canonicalize(&r).unwrap_or_else(|_| r.clone());
            if variant_of(&real) == backend {
                return Ok((s, r));
            }
        }
        let missing = if self.which(&restore).is_none() {
            restore
        } else {
            save
        };
        Err(BackendProblem {
            backend,
            family,
            kind: ProblemKind::MissingBinary,
            detail: format!("{missing} not found in PATH ({})", self.path),
        })
    }
}

fn variant_of(real: &Path) -> Backend {
    let name = real
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if name.contains("nft") {
        Backend::Nft
    } else {
        Backend::Legacy
    }
}

/// A back end's table for one family, as read just now.
#[derive(Debug, Clone)]
pub struct Target {
    pub backend: Backend,
    pub family: Family,
    pub save: PathBuf,
    pub restore: PathBuf,
    pub state: NatState,
}

/// Reads the `nat` table of one back end/family. The outer error is fatal
/// (cannot run anything); the inner one says why this back end is unusable.
pub fn probe(
    runner: &Runner,
    backend: Backend,
    family: Family,
) -> Result<Result<Target, BackendProblem>, Error> {
    let (save, restore) = match runner.tools(backend, family) {
        Ok(t) => t,
        Err(p) => return Ok(Err(p)),
    };
    let ran = runner.run(&save, &["-t", "nat"], None)?;
    if !ran.success {
        return Ok(Err(BackendProblem {
            backend,
            family,
            kind: classify(&ran.output),
            detail: format!("{}: {}: {}", ran.command, ran.status, ran.output),
        }));
    }
    Ok(Ok(Target {
        backend,
        family,
        save,
        restore,
        state: NatState::parse(&ran.stdout),
    }))
}

struct Candidate {
    backend: Backend,
    targets: Vec<Target>,
    reason: String,
}

impl Candidate {
    fn has_consul(&self) -> bool {
        self.targets.iter().any(|t| t.state.has_consul())
    }
}

fn preference(runner: &Runner, choice: BackendChoice) -> (Vec<Backend>, String) {
    match choice {
        BackendChoice::Fixed(b) => (vec![b], "requested with -iptables-backend".into()),
        BackendChoice::Auto => match runner.system_default() {
            Some((b, real)) => (
                vec![b, b.other()],
                format!(
                    "the system default (iptables-restore is {})",
                    real.display()
                ),
            ),
            None => (
                vec![Backend::Nft, Backend::Legacy],
                "preferred when both work".into(),
            ),
        },
    }
}

/// Probes the back ends for `families`; returns the usable ones, best first.
fn select(
    runner: &Runner,
    choice: BackendChoice,
    families: &[Family],
) -> Result<Vec<Candidate>, Error> {
    let (order, first_reason) = preference(runner, choice);
    let mut usable = Vec::new();
    let mut problems = Vec::new();
    'backends: for (i, b) in order.iter().enumerate() {
        let mut targets = Vec::new();
        for f in families {
            match probe(runner, *b, *f)? {
                Ok(t) => targets.push(t),
                Err(p) => {
                    problems.push(p);
                    continue 'backends;
                }
            }
        }
        let reason = if i == 0 {
            first_reason.clone()
        } else if usable.is_empty() {
            format!(
                "the {} back end is not usable: {}",
                order[0],
                problems
                    .iter()
                    .map(|p: &BackendProblem| p.kind.describe())
                    .collect::<Vec<_>>()
                    .join("; ")
            )
        } else {
            "the other back end failed".into()
        };
        usable.push(Candidate {
            backend: *b,
            targets,
            reason,
        });
    }
    if usable.is_empty() {
        return Err(Error::NoBackend(problems));
    }
    if choice == BackendChoice::Auto && usable.len() > 1 && !usable[0].has_consul() {
        if let Some(pos) = usable.iter().position(Candidate::has_consul) {
            let mut c = usable.remove(pos);
            c.reason = "its nat table already holds Consul's chains".into();
            usable.insert(0, c);
        }
    }
    Ok(usable)
}

fn restore_args(test: bool) -> Vec<&'static str> {
    let mut a = vec!["-w", "10", "--noflush"];
    if test {
        a.push("--test");
    }
    a
}

fn command_error(ran: &Ran, input: &str, note: &str) -> Error {
    let mut context = String::new();
    if let Some(n) = failed_line(&ran.output) {
        if let Some(line) = input.lines().nth(n.saturating_sub(1)) {
            context.push_str(&format!("\n  input line {n}: {line}"));
        }
    }
    context.push_str("\n  ");
    context.push_str(note);
    context.push_str("\n  (run with --dry-run to see the whole input)");
    Error::Command {
        command: ran.command.clone(),
        status: ran.status.clone(),
        output: ran.output.clone(),
        context,
    }
}

/// The input line an iptables-restore error points at ("line 5 failed",
/// "Error occurred at line: 3").
pub fn failed_line(output: &str) -> Option<usize> {
    for (i, _) in output.match_indices("line") {
        let rest = output[i + 4..].trim_start_matches([':', ' ']);
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        if let Ok(n) = digits.parse() {
            return Some(n);
        }
    }
    None
}

fn where_(runner: &Runner) -> String {
    match runner.netns() {
        Some(p) => format!(" in network namespace {}", p.display()),
        None => String::new(),
    }
}

/// Commits the rule sets of `plan` on one back end; see the module docs.
fn commit(runner: &Runner, cand: &Candidate, plan: &[(Family, Vec<Rule>)]) -> Result<(), Error> {
    let texts: Vec<String> = cand
        .targets
        .iter()
        .zip(plan)
        .map(|(t, (_, r))| rules::restore_text(r, &t.state))
        .collect();
    if texts.len() > 1 {
        for (t, text) in cand.targets.iter().zip(&texts) {
            let ran = runner.run(&t.restore, &restore_args(true), Some(text))?;
            if !ran.success {
                return Err(command_error(
                    &ran,
                    text,
                    "checked with --test before applying anything: nothing was changed",
                ));
            }
        }
    }
    for (i, (t, text)) in cand.targets.iter().zip(&texts).enumerate() {
        let ran = runner.run(&t.restore, &restore_args(false), Some(text))?;
        if ran.success {
            continue;
        }
        if i == 0 {
            return Err(command_error(
                &ran,
                text,
                "the transaction is atomic: nothing was changed",
            ));
        }
        let mut note = format!("the {} transaction is atomic and changed nothing", t.family);
        for done in &cand.targets[..i] {
            match rollback(runner, done) {
                Ok(()) => note.push_str(&format!(
                    "; the {} rules already applied were rolled back",
                    done.family
                )),
                Err(e) => note.push_str(&format!(
                    "; rolling back the {} rules FAILED, they stay applied: {e}",
                    done.family
                )),
            }
        }
        return Err(command_error(&ran, text, &note));
    }
    Ok(())
}

fn rollback(runner: &Runner, done: &Target) -> Result<(), Error> {
    let ran = runner.run(&done.save, &["-t", "nat"], None)?;
    if !ran.success {
        return Err(command_error(
            &ran,
            "",
            "could not read the table to roll back",
        ));
    }
    let text = rules::rollback_text(&done.state, &NatState::parse(&ran.stdout));
    let ran = runner.run(&done.restore, &restore_args(false), Some(&text))?;
    if !ran.success {
        return Err(command_error(&ran, &text, "rollback failed"));
    }
    Ok(())
}

/// Applies `plan` (one rule list per family, from [`rules::rules`]) atomically
/// and idempotently on the chosen back end.
pub fn apply(
    runner: &Runner,
    choice: BackendChoice,
    plan: &[(Family, Vec<Rule>)],
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<(), Error> {
    let families: Vec<Family> = plan.iter().map(|(f, _)| *f).collect();
    let cands = select(runner, choice, &families)?;
    for (i, cand) in cands.iter().enumerate() {
        let _ = writeln!(
            err,
            "veer redirect-traffic: using the {} iptables back end ({}): {}",
            cand.backend,
            cand.targets
                .iter()
                .map(|t| t.restore.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
            cand.reason
        );
        match commit(runner, cand, plan) {
            Ok(()) => {
                let fams = families
                    .iter()
                    .map(|f| f.to_string())
                    .collect::<Vec<_>>()
                    .join(" and ");
                let _ = writeln!(
                    out,
                    "Successfully applied traffic redirection rules ({fams}, {} back end{})",
                    cand.backend,
                    where_(runner)
                );
                for other in cands.iter().filter(|c| c.backend != cand.backend) {
                    if other.has_consul() {
                        let _ = writeln!(
                            err,
                            "warning: the {b} back end also holds Consul chains; both apply. \
                             Remove them with: veer redirect-traffic cleanup -iptables-backend {b}",
                            b = other.backend
                        );
                    }
                }
                return Ok(());
            }
            Err(Error::Command { ref output, .. })
                if choice == BackendChoice::Auto
                    && i + 1 < cands.len()
                    && classify(output) == ProblemKind::MissingKernelSupport =>
            {
                let _ = writeln!(
                    err,
                    "veer redirect-traffic: the {} back end cannot apply the rules (kernel support missing): {output}; trying the next one",
                    cand.backend
                );
            }
            Err(e) => return Err(e),
        }
    }
    unreachable!("the last candidate returns")
}

/// Prints the restore texts `apply` would feed, reading the current table when
/// possible (so the `-D` lines are the real ones).
pub fn dry_run(
    runner: &Runner,
    choice: BackendChoice,
    plan: &[(Family, Vec<Rule>)],
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<(), Error> {
    let families: Vec<Family> = plan.iter().map(|(f, _)| *f).collect();
    let selected = select(runner, choice, &families);
    let (states, restore): (Vec<NatState>, Vec<String>) = match &selected {
        Ok(cands) => {
            let c = &cands[0];
            let _ = writeln!(
                err,
                "veer redirect-traffic: dry run; would use the {} iptables back end: {}",
                c.backend, c.reason
            );
            c.targets
                .iter()
                .map(|t| (t.state.clone(), t.restore.display().to_string()))
                .unzip()
        }
        Err(e) => {
            let _ = writeln!(
                err,
                "veer redirect-traffic: dry run; cannot read the current nat table, so no -D lines for existing hooks are shown: {e}"
            );
            families
                .iter()
                .map(|f| (NatState::default(), format!("{}-restore", f.command())))
                .unzip()
        }
    };
    for (((family, r), state), restore) in plan.iter().zip(&states).zip(&restore) {
        let _ = writeln!(
            out,
            "# {family}: {restore} -w 10 --noflush{}",
            where_(runner)
        );
        let _ = write!(out, "{}", rules::restore_text(r, state));
    }
    Ok(())
}

/// Removes Consul's chains and the rules jumping to them from every usable
/// back end and family where they exist, and nothing else.
pub fn cleanup(
    runner: &Runner,
    choice: BackendChoice,
    ipv6: bool,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<(), Error> {
    let (order, _) = preference(runner, choice);
    let mut problems = Vec::new();
    let mut usable_v4 = false;
    let mut usable_v6 = false;
    let mut cleaned = Vec::new();
    for b in order {
        for f in [Family::V4, Family::V6] {
            let t = match probe(runner, b, f)? {
                Ok(t) => t,
                Err(p) => {
                    problems.push(p);
                    continue;
                }
            };
            match f {
                Family::V4 => usable_v4 = true,
                Family::V6 => usable_v6 = true,
            }
            if !t.state.has_consul() {
                continue;
            }
            let text = rules::cleanup_text(&t.state);
            let ran = runner.run(&t.restore, &restore_args(false), Some(&text))?;
            if !ran.success {
                return Err(command_error(
                    &ran,
                    &text,
                    "the transaction is atomic: nothing was changed by this command",
                ));
            }
            let _ = writeln!(
                err,
                "veer redirect-traffic: removed Consul chains from the {b} {f} nat table ({})",
                t.restore.display()
            );
            cleaned.push(format!("{b} {f}"));
        }
    }
    if !usable_v4 || (ipv6 && !usable_v6) {
        let wanted: Vec<BackendProblem> = problems
            .into_iter()
            .filter(|p| p.family == Family::V4 || ipv6)
            .collect();
        return Err(Error::NoBackend(wanted));
    }
    if cleaned.is_empty() {
        let _ = writeln!(
            out,
            "No Consul traffic redirection rules found{}; nothing to clean up",
            where_(runner)
        );
    } else {
        let _ = writeln!(
            out,
            "Removed Consul traffic redirection rules ({}){}",
            cleaned.join(", "),
            where_(runner)
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests;
