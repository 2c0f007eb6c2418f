//! The `tokenbroker` binary: parses the command line, sets up logging and
//! hands over to `server::serve` or `dev::run`. Nothing else lives here.

use std::process::ExitCode;

use clap::Parser;
use tokenbroker::config::{Cli, Command};
use tokenbroker::{dev, server, shutdown, telemetry};

/// Exit code for a configuration the broker cannot start with (a bad
/// setting, an unusable TLS or policy file, a port it cannot bind).
const EXIT_CONFIG: u8 = 2;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => {
            telemetry::init(args.common.log_format);
            let config = match args.validate() {
                Ok(config) => config,
                Err(error) => return fail(&error, EXIT_CONFIG),
            };
            match server::serve(config, first_signal()).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) if error.is_config() => fail(&error, EXIT_CONFIG),
                Err(error) => fail(&error, 1),
            }
        }
        Command::AuditHash(args) => {
            match tokenbroker::audit::fingerprint_of_input(&args.key_file, std::io::stdin()) {
                Ok(fingerprint) => {
                    println!("{fingerprint}");
                    ExitCode::SUCCESS
                }
                Err(error) => fail(&error, EXIT_CONFIG),
            }
        }
        Command::Dev(args) => {
            telemetry::init(args.common.log_format);
            match dev::run(*args, first_signal()).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => fail(&error, 1),
            }
        }
    }
}

/// Completes on the first SIGTERM/SIGINT; a second one exits at once.
async fn first_signal() {
    shutdown::signal().await;
    shutdown::exit_on_second_signal();
}

/// One clear line on stderr, then exit.
fn fail(error: &dyn std::fmt::Display, code: u8) -> ExitCode {
    eprintln!("tokenbroker: error: {error}");
    ExitCode::from(code)
}
