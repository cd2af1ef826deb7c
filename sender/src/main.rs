fn main() -> std::process::ExitCode {
    zfsync_send::cli::main()
}
