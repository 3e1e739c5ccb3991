//! Shell completions (clap_complete) and man pages (clap_mangen), generated from the
//! command-line definition itself, so they never drift from `--help`.

use std::io::Write;
use std::path::{Path, PathBuf};

/// The two subcommands, flattened into the binary's own.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Manual {
    /// Print a shell completion script (e.g. `completions bash > /etc/bash_completion.d/NAME`).
    Completions {
        /// The shell to complete for.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write man pages (NAME.1 and NAME-SUBCOMMAND.1 for each subcommand) into DIR.
    Man {
        /// Directory to write the pages into (created if missing), e.g.
        /// /usr/local/share/man/man1.
        dir: PathBuf,
    },
}

impl Manual {
    /// Writes what was asked for `cmd`, the binary's whole command line.
    pub fn write(&self, cmd: clap::Command) -> std::io::Result<()> {
        match self {
            Manual::Completions { shell } => completions(cmd, *shell),
            Manual::Man { dir } => man_pages(cmd, dir).map(|_| ()),
        }
    }
}

/// Writes the completion script of `cmd` for `shell` to stdout.
pub fn completions(mut cmd: clap::Command, shell: clap_complete::Shell) -> std::io::Result<()> {
    let name = cmd.get_name().to_string();
    let mut out = std::io::stdout().lock();
    clap_complete::generate(shell, &mut cmd, name, &mut out);
    out.flush()
}

/// Writes `NAME.1` for `cmd` and `NAME-SUB.1` for each subcommand (nested ones too) into
/// `dir`; returns the files written.
pub fn man_pages(mut cmd: clap::Command, dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    // Global options and the version reach the subcommands only once built.
    cmd.build();
    let mut written = Vec::new();
    write_pages(&cmd, cmd.get_name(), dir, &mut written)?;
    Ok(written)
}

fn write_pages(
    cmd: &clap::Command,
    name: &str,
    dir: &Path,
    written: &mut Vec<PathBuf>,
) -> std::io::Result<()> {
    let page = cmd.clone().name(name.to_string());
    let path = dir.join(format!("{name}.1"));
    let mut buf = Vec::new();
    clap_mangen::Man::new(page).render(&mut buf)?;
    std::fs::write(&path, buf)?;
    written.push(path);
    for sub in cmd.get_subcommands() {
        if sub.is_hide_set() || sub.get_name() == "help" {
            continue;
        }
        write_pages(sub, &format!("{name}-{}", sub.get_name()), dir, written)?;
    }
    Ok(())
}
