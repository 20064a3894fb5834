fn main() -> std::process::ExitCode {
    datafree::cli::main()
}
