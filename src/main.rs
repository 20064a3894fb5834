fn main() -> std::process::ExitCode {
    datafree::kernels::tune_process();
    datafree::cli::main()
}
