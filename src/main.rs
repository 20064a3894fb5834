fn main() -> std::process::ExitCode {
    datafree::kernels::tune_allocator();
    datafree::cli::main()
}
