//! `peftk bench` refuses arguments that would measure nothing, through the real binary, before it
//! allocates its 1 GiB bandwidth buffer or any weight (each of these returns in milliseconds).

use std::process::{Command, Output};

fn peftk(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_peftk"))
        .args(args)
        .output()
        .expect("run peftk")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn a_filter_that_matches_nothing_fails_and_prints_nothing() {
    let o = peftk(&["bench", "--device", "cpu", "--filter", "^no-such-op/"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("matches no case"), "{}", stderr(&o));
    // Not even the memory-bandwidth line: nothing ran.
    assert!(o.stdout.is_empty(), "{}", String::from_utf8_lossy(&o.stdout));
}

#[test]
fn an_invalid_filter_is_a_usage_error() {
    let o = peftk(&["bench", "--device", "cpu", "--filter", "("]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("--filter"), "{}", stderr(&o));
}

#[test]
fn empty_shapes_and_zero_tokens_are_usage_errors() {
    for args in [
        &["--shape", "0x0"][..],
        &["--shape", "0x4096"],
        &["--shape", "4096x0"],
        &["--shape", "4096"],
        &["--shape", "4096x"],
        &["--tokens", "0"],
        &["--tokens", "1,0,16"],
        &["--tokens", "one"],
    ] {
        let o = peftk(&[&["bench", "--device", "cpu"][..], args].concat());
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(args[0]), "{args:?}: {}", stderr(&o));
        assert!(o.stdout.is_empty(), "{args:?}");
    }
}

#[test]
fn help_documents_every_flag() {
    let o = peftk(&["bench", "--help"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let help = String::from_utf8_lossy(&o.stdout);
    for flag in [
        "--device",
        "--filter",
        "--quick",
        "--full",
        "--shape",
        "--tokens",
        "--rotate-mib",
    ] {
        let line = help
            .lines()
            .position(|l| l.trim_start().starts_with(flag))
            .unwrap_or_else(|| panic!("{flag} missing from --help:\n{help}"));
        // The flag's own line or the next one carries a description, not just the name.
        let text: String = help.lines().skip(line).take(2).collect::<Vec<_>>().join(" ");
        assert!(
            text.split_whitespace().count() >= 6,
            "{flag} is not described in --help:\n{help}"
        );
    }
}
