//! The `zfsync-send` binary: everything is in [`zfsync_send::cli`].

fn main() -> std::process::ExitCode {
    zfsync_send::cli::main()
}
