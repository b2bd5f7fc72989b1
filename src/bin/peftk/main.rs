//! `peftk`: the peft-kernels command line.

mod bench;
mod causal_lm;
mod compare;
mod dequantize;
mod finetune;
mod inspect;
mod merge;
mod plot;
mod qr_adapt;
mod qr_adapt_eval;
mod qr_adapt_plot;
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
    /// Quantize the linear-layer weights of a safetensors checkpoint to bitsandbytes NF4/FP4 (by default
    /// the ones transformers quantizes: not embeddings, lm_head or norms).
    Quantize(quantize::Args),
    /// Dequantize every bitsandbytes 4-bit weight of a safetensors checkpoint.
    Dequantize(dequantize::Args),
    /// Describe a safetensors file (tensors, 4-bit quant states, bytes per weight) or a PEFT adapter
    /// directory (method, rank per layer, scaling, trainable parameters; WaveFT / VB-LoRA details).
    /// Exits with status 1 if a 4-bit weight is invalid.
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
    /// Fine-tune with each method (and seed) under the same recipe, each run in its own process, then
    /// write results.{md,json,csv} and bar charts (results.svg, results.png).
    Compare(compare::Args),
    /// QR-Adaptor: search each linear's base bit-width and adapter rank under a memory budget by
    /// fine-tuning on the task (NSGA-II, optional GP refinement), then fine-tune the chosen one.
    QrAdapt(qr_adapt::Args),
}

/// On SIGINT, SIGTERM or SIGHUP, removes the temp files of outputs being written and exits with
/// status 128 + the signal number (the shell's convention). SIGKILL cannot be caught: its leftovers
/// are swept by the next write to the same directory (see `peft_kernels::io::output`).
fn remove_temps_on_signals() {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    match signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP]) {
        Ok(mut signals) => {
            std::thread::spawn(move || {
                if let Some(sig) = signals.forever().next() {
                    peft_kernels::io::output::remove_pending_temps_and_exit(sig);
                }
            });
        }
        Err(e) => eprintln!(
            "peftk: warning: cannot install signal handlers ({e}); an interrupted write may leave a temp file"
        ),
    }
}

/// The error and its causes, one per line, skipping a cause whose text the message already shows.
fn render_error(e: &peft_kernels::Error) -> String {
    let mut msg = format!("peftk: error: {e}");
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        let text = s.to_string();
        if !msg.contains(&text) {
            msg.push_str(&format!("\n  caused by: {text}"));
        }
        src = s.source();
    }
    msg
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // `finetune` handles SIGINT itself (stop after the current step, then save); every other command
    // removes its temp files and exits on a signal.
    if !matches!(cli.command, Command::Finetune(_)) {
        remove_temps_on_signals();
    }
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
        Command::Compare(a) => compare::run(a),
        Command::QrAdapt(a) => qr_adapt::run(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{}", inspect::escape(&render_error(&e), true));
            ExitCode::FAILURE
        }
    }
}
