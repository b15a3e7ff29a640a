//! The `kkm-bridge` binary: parses the command line and hands over to the library.

use clap::Parser;

fn main() -> std::process::ExitCode {
    kkm_bridge::cli::main_with(kkm_bridge::cli::Cli::parse())
}
