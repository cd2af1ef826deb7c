fn main() -> std::process::ExitCode {
    zfsync_recv::cli::main()
}
