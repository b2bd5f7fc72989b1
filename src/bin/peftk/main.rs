//! `peftk`: the peft-kernels command line.

mod bench;
mod dequantize;
mod finetune;
mod inspect;
mod merge;
mod quantize;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser, Debug)]
#[command(
    name = "peftk",
    version,
    about = "peft-kernels: quantize, dequantize, inspect and merge checkpoints and PEFT adapters; benchmark the kernels"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Quantize the linear weights of a safetensors checkpoint to bitsandbytes NF4/FP4.
    Quantize(quantize::Args),
    /// Dequantize every bitsandbytes 4-bit weight of a safetensors checkpoint.
    Dequantize(dequantize::Args),
    /// Describe a safetensors file (tensors, 4-bit quant states, bytes per weight) or a PEFT adapter
    /// directory (method, rank per layer, scaling, trainable parameters).
    Inspect(inspect::Args),
    /// Merge a PEFT adapter into a base safetensors checkpoint (dense or bitsandbytes 4-bit).
    Merge(merge::MergeArgs),
    /// Same as `inspect DIR` for a PEFT adapter directory.
    #[command(hide = true)]
    InspectAdapter(merge::InspectAdapterArgs),
    /// Named microbenchmarks of the kernels, one JSON line each.
    Bench(bench::BenchArgs),
    /// Fine-tune a BERT sequence classifier with LoRA/QLoRA/DoRA/WaveFT/VB-LoRA (default: the demo).
    Finetune(finetune::Args),
    /// Loss, accuracy and macro-F1 of a fine-tuned classifier over a data file.
    Eval(finetune::EvalArgs),
    /// Label and probability per input text.
    Predict(finetune::PredictArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Quantize(a) => quantize::run(a),
        Command::Dequantize(a) => dequantize::run(a),
        Command::Inspect(a) => inspect::run(a),
        Command::Merge(a) => merge::run(&a),
        Command::InspectAdapter(a) => merge::run_inspect_adapter(&a),
        Command::Bench(a) => bench::run(a),
        Command::Finetune(a) => finetune::run(a),
        Command::Eval(a) => finetune::run_eval(a),
        Command::Predict(a) => finetune::run_predict(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let mut msg = format!("peftk: error: {e}");
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
