use std::process::ExitCode;

use clap::{Parser, Subcommand};
use mobiface::config::Config;
use mobiface::startup::Application;

/// MobiFace face-verification service.
#[derive(Parser)]
#[command(name = "mobiface", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the HTTP API.
    Serve(Box<Config>),
    /// Measure verification accuracy on an LFW-style pairs file through the service's own engine.
    Eval(Box<mobiface::eval::EvalArgs>),
    /// Detect and align the face in every photo under a folder into 112x112 crops, with the
    /// service's own detector and aligner.
    Align(Box<mobiface::detection::align_dir::AlignArgs>),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(config) => serve(*config),
        Command::Eval(args) => mobiface::eval::run(*args),
        Command::Align(args) => mobiface::detection::align_dir::run(*args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One clear line, cause chain included, rather than a backtrace.
            eprintln!("mobiface: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn serve(config: Config) -> anyhow::Result<()> {
    mobiface::telemetry::init(config.log_format);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let app = Application::build(config).await?;
        app.run_until_stopped().await
    })
}
