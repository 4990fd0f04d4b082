//! The `brokerscope` binary: the command line lives in the library (`brokerscope::main`), so
//! the fuzz targets (fuzz/) link the same parsers the agent runs.

fn main() -> std::process::ExitCode {
    brokerscope::main()
}
