//! `peftk`: the peft-kernels command line.
fn main() {
    println!("peftk {}", env!("CARGO_PKG_VERSION"));
}
