//! The command line is a contract: scripts and users rely on these flags.

use std::process::Command;

fn help() -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_zfsync-send"))
        .arg("--help")
        .output()
        .expect("run zfsync-send --help");
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn help_lists_the_contract_flags() {
    let h = help();
    for flag in [
        "-v, --verbose",
        "-p, --port",
        "-t, --threads",
        "-o, --log-file",
        "--ca",
        "--cert",
        "--key",
        "--server-name",
        "--full",
        "--zfs",
        "SOURCE_DATASET",
        "RECEIVER_HOST",
        "[default: 7878]",
        "[default: 4]",
    ] {
        assert!(h.contains(flag), "--help lacks {flag}:\n{h}");
    }
}

#[test]
fn missing_arguments_exit_2() {
    let out = Command::new(env!("CARGO_BIN_EXE_zfsync-send"))
        .output()
        .expect("run zfsync-send");
    assert_eq!(out.status.code(), Some(2));
}
