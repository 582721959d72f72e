//! `dmaplane secret`: the shared secret agents prove to each other on their handshake.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Subcommand;

#[derive(Debug, Subcommand)]
pub enum SecretCmd {
    /// Write a new random secret (32 bytes from the operating system, as 64 hexadecimal
    /// characters) to FILE, readable by its owner only; an existing file is not overwritten.
    /// Give the same file to every agent that may connect (`--secret-file FILE`).
    New {
        /// The file to create.
        file: PathBuf,
    },
}

pub fn run(cmd: &SecretCmd, json: bool) -> Result<()> {
    match cmd {
        SecretCmd::New { file } => {
            dmaplane::auth::Secret::create_file(file)
                .with_context(|| format!("a new secret in {}", file.display()))?;
            if json {
                println!("{}", serde_json::json!({ "secret_file": file }));
            } else {
                println!(
                    "wrote a new secret to {} (mode 600): give it to every agent that may \
                     connect, and keep it off shared storage",
                    file.display()
                );
            }
            Ok(())
        }
    }
}
