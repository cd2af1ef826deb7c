//! The command line is a contract: scripts and users rely on these flags.

use std::process::Command;

#[test]
fn help_lists_the_contract_flags() {
    let out = Command::new(env!("CARGO_BIN_EXE_zfsync-recv"))
        .arg("--help")
        .output()
        .expect("run zfsync-recv --help");
    assert!(out.status.success());
    let h = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "-v, --verbose",
        "-p, --port",
        "-l, --listen",
        "-o, --log-file",
        "--ca",
        "--cert",
        "--key",
        "--allow-client",
        "--zfs",
        "TARGET_DATASET",
        "[default: 7878]",
    ] {
        assert!(h.contains(flag), "--help lacks {flag}:\n{h}");
    }
}

#[test]
fn a_missing_certificate_names_the_file_and_the_fix() {
    let out = Command::new(env!("CARGO_BIN_EXE_zfsync-recv"))
        .args(["-p", "0", "-l", "127.0.0.1", "--ca", "/nonexistent/ca.pem"])
        .args([
            "--cert",
            "/nonexistent/r.pem",
            "--key",
            "/nonexistent/r.key",
            "pool/t",
        ])
        .output()
        .expect("run zfsync-recv");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("/nonexistent/ca.pem") && err.contains("make certs"),
        "{err}"
    );
}
