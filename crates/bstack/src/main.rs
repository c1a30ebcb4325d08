//! `bstack`: one command line for the BStack components.
//!
//! The binary is thin: it parses arguments, calls the libraries and prints.
//! Exit codes are the same for every command: 0 ok, 1 problems found (a plan
//! that does not validate), 2 bad usage or unreadable input. Errors print one
//! line, `error: ` and the cause.

mod bcache;
mod bcache_serve;
mod bench;
mod bench_bwrt;
mod bench_datajax;
mod bench_hw_cluster;
mod bench_strata;
mod bwrt_abi;
mod bwrt_cmd;
mod datajax;
mod demo;
mod demo_bwrt;
mod demo_cluster;
mod demo_kv;
mod hotweights;
mod hw_cluster;
mod output;
mod plan;
mod redis_server;
mod strata;
mod strata_serve;

use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

/// The version `--version` prints: the package version and the git revision
/// the binary was built from (see `build.rs`).
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (git ",
    env!("BSTACK_GIT_REV"),
    ")"
);

/// BStack: plans for LLM infrastructure: weight rollouts, KV-cache movement,
/// DataFrame pipelines and wave runtimes, all exchanged as validated contracts.
#[derive(Parser, Debug)]
#[command(
    name = "bstack",
    version = VERSION,
    max_term_width = 100,
    after_help = "Examples:
  bstack demo                          the whole stack in one flow; writes ./out
  bstack plan examples -o ex           one example file of every contract
  bstack plan validate ex/*            check files, every problem with its path
  bstack plan show ex/swap_plan.json   summary and the largest operations
  bstack --json plan show FILE         the same as JSON

Exit codes: 0 ok, 1 problems found, 2 bad usage or unreadable input.
Logs: -v / -q, or BSTACK_LOG=bstack=debug (a tracing filter)."
)]
struct Cli {
    /// Print machine-readable JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,

    /// More log output on stderr (-v info, -vv debug, -vvv trace).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,

    /// Only errors on stderr.
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    quiet: bool,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Inspect, validate and convert contract files (manifests, cache plans,
    /// swap windows, swap plans, wave specs), in JSON or protobuf form, and
    /// write an example of each.
    #[command(subcommand)]
    Plan(plan::PlanCommand),

    /// Weight rollouts: chunk-level manifests of safetensors checkpoints.
    #[command(subcommand, visible_alias = "hw")]
    Hotweights(Box<hotweights::HotweightsCommand>),

    /// KV-cache planning: plan a window, replay a trace under LRU / FIFO /
    /// Belady / bcache, tune the planner.
    #[command(subcommand)]
    Bcache(bcache::BcacheCommand),

    /// The tiered artifact store: put, get, list and serve objects across
    /// memory, mmap/DAX, disk and Redis tiers; execute cache plans.
    #[command(subcommand)]
    Strata(strata::StrataCommand),

    /// Traced DataFrame programs on DataFusion: run, explain and export
    /// pipelines (IR JSON or Substrait), and export WaveSpecs from serving
    /// traces.
    #[command(subcommand)]
    Datajax(datajax::DatajaxCommand),

    /// The wave runtime through its C ABI: capabilities, and GEMM waves run
    /// on a runtime built from a WaveSpec, with counters.
    #[command(subcommand)]
    Bwrt(bwrt_cmd::BwrtCommand),

    /// Run the whole stack in one flow on a serving trace, each stage reading
    /// the files the one before wrote: datajax exports a WaveSpec, bcache
    /// plans KV movement with its prefix cohorts, stratacache executes the
    /// plans on real bytes, hotweights rolls a new checkpoint out to two
    /// worker processes, bwrt swaps weights inside the window. Prints one
    /// table of what each stage read, wrote and measured.
    Demo(demo::DemoArgs),

    /// Measure a component's speed; prints one JSON object per figure, with a
    /// same-run baseline where a physical limit exists.
    Bench(bench::BenchArgs),

    /// Print a shell completion script for bstack to stdout.
    #[command(after_help = "Install it where your shell looks, for example:
  bstack completions bash > ~/.local/share/bash-completion/completions/bstack
  bstack completions zsh > ~/.zfunc/_bstack      (with fpath+=~/.zfunc before compinit)
  bstack completions fish > ~/.config/fish/completions/bstack.fish")]
    Completions {
        /// The shell: bash, zsh, fish, elvish or powershell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

/// The outcome of a command that ran to the end.
pub enum Outcome {
    /// Everything checked out.
    Ok,
    /// The input was read but has problems (exit 1).
    Problems,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // Help and version go to stdout with 0; usage errors exit 2.
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    init_logging(cli.verbose, cli.quiet);
    let out = output::Output { json: cli.json };
    let result = match cli.command {
        Command::Plan(cmd) => plan::run(cmd, &out),
        Command::Hotweights(cmd) => hotweights::run(*cmd, &out, cli.quiet),
        Command::Bcache(cmd) => bcache::run(cmd, &out, cli.quiet),
        Command::Strata(cmd) => strata::run(cmd, &out, cli.quiet),
        Command::Datajax(cmd) => datajax::run(cmd, &out),
        Command::Bwrt(cmd) => bwrt_cmd::run(cmd, &out),
        Command::Demo(args) => demo::run(args, &out),
        Command::Bench(args) => bench::run(args, &out),
        Command::Completions { shell } => completions(shell),
    };
    match result {
        Ok(Outcome::Ok) => ExitCode::SUCCESS,
        Ok(Outcome::Problems) => ExitCode::from(1),
        // The reader went away (`bstack ... | head`): nothing left to say.
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            ExitCode::from(2)
        }
    }
}

/// Writes the completion script for `shell`, built from the same argument
/// definitions the parser uses, so it never lists a flag that does not exist.
fn completions(shell: clap_complete::Shell) -> anyhow::Result<Outcome> {
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "bstack", &mut script);
    std::io::Write::write_all(&mut std::io::stdout().lock(), &script)?;
    Ok(Outcome::Ok)
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// The error and its causes on one line, leaving out a cause whose text the
/// line already holds (library errors often include their source's message).
pub fn one_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

fn init_logging(verbose: u8, quiet: bool) {
    let level = match (quiet, verbose) {
        (true, _) => "error",
        (false, 0) => "warn",
        (false, 1) => "info",
        (false, 2) => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("BSTACK_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}
