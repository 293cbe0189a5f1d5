//! Prints peersan's CRDs, generated from the Rust types, or writes them where the repository
//! keeps them (`crds/*.yaml` and the Helm chart's `charts/peersan/files/crds/`).
//!
//! ```sh
//! cargo run -p peersan-crds --bin crdgen              # one YAML stream on stdout
//! cargo run -p peersan-crds --bin crdgen -- --write   # update the checked-in files
//! cargo run -p peersan-crds --bin crdgen -- --check   # fail if they differ
//! ```

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Parser;

#[derive(Parser, Debug)]
#[command(about = "Generate peersan's CustomResourceDefinitions from the Rust types")]
struct Args {
    /// Write the files into the repository instead of printing them.
    #[arg(long, conflicts_with = "check")]
    write: bool,
    /// Compare the files in the repository with the generated ones; exit 1 when they differ.
    #[arg(long)]
    check: bool,
    /// Root of the repository.
    #[arg(long, env = "PEERSAN_REPO_ROOT", default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/.."))]
    root: PathBuf,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let files = peersan_crds::crd_files()?;
    if !args.write && !args.check {
        for (i, (_, text)) in files.iter().enumerate() {
            if i > 0 {
                println!("---");
            }
            print!("{text}");
        }
        return Ok(());
    }
    let root = args.root.canonicalize().with_context(|| format!("repository root {}", args.root.display()))?;
    let mut stale = Vec::new();
    for dir in peersan_crds::CRD_DIRS {
        let dir = root.join(dir);
        for (name, text) in &files {
            let path = dir.join(name);
            let current = std::fs::read_to_string(&path).ok();
            if current.as_deref() == Some(text.as_str()) {
                continue;
            }
            if args.check {
                stale.push(path.display().to_string());
            } else {
                std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
                std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
                eprintln!("wrote {}", path.display());
            }
        }
    }
    if !stale.is_empty() {
        bail!("out of date (run `cargo run -p peersan-crds --bin crdgen -- --write`): {}", stale.join(", "));
    }
    Ok(())
}
