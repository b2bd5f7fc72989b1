//! `peftk`: the peft-kernels command line.
use clap::{Parser, Subcommand};
use std::process::ExitCode;

mod bench;

#[derive(Parser)]
#[command(name = "peftk", version, about = "peft-kernels command line")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Named microbenchmarks of the kernels, one JSON line each.
    Bench(bench::BenchArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Bench(args) => bench::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("peftk: {e}");
            ExitCode::FAILURE
        }
    }
}
