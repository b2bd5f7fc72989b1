//! `peftk`: the peft-kernels command line.

mod bench;
mod merge;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser, Debug)]
#[command(name = "peftk", version, about = "peft-kernels command line")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Merge a PEFT adapter into a base safetensors checkpoint.
    Merge(merge::MergeArgs),
    /// Summarize a PEFT adapter directory (method, ranks, scalings, parameters, sizes).
    InspectAdapter(merge::InspectAdapterArgs),
    /// Named microbenchmarks of the kernels, one JSON line each.
    Bench(bench::BenchArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Merge(a) => merge::run(&a),
        Command::InspectAdapter(a) => merge::run_inspect_adapter(&a),
        Command::Bench(a) => bench::run(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let mut msg = format!("error: {e}");
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                msg.push_str(&format!("\n  caused by: {s}"));
                src = s.source();
            }
            eprintln!("{msg}");
            ExitCode::FAILURE
        }
    }
}
