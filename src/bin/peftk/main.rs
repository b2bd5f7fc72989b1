//! `peftk`: the peft-kernels command line.

use clap::{Parser, Subcommand};
use std::process::ExitCode;

mod dequantize;
mod inspect;
mod quantize;

#[derive(Parser)]
#[command(
    name = "peftk",
    version,
    about = "peft-kernels: quantize, dequantize and inspect checkpoints"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Quantize the linear weights of a safetensors checkpoint to bitsandbytes NF4/FP4.
    Quantize(quantize::Args),
    /// Dequantize every bitsandbytes 4-bit weight of a safetensors checkpoint.
    Dequantize(dequantize::Args),
    /// List the tensors of a safetensors file, grouping 4-bit weights with their quant state.
    Inspect(inspect::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Quantize(a) => quantize::run(a),
        Command::Dequantize(a) => dequantize::run(a),
        Command::Inspect(a) => inspect::run(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("peftk: error: {e}");
            ExitCode::FAILURE
        }
    }
}
