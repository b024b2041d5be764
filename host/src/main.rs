fn main() -> std::process::ExitCode {
    autocollect::cli::main()
}
