//! `unitune edit` (in progress).

use anyhow::{bail, Result};
use clap::Args;

#[derive(Args)]
pub struct EditArgs {}

pub fn run(_args: EditArgs) -> Result<()> {
    bail!("edit is not implemented yet")
}
