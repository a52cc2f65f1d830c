//! The man pages and shell completions of `limiter`, generated from the
//! clap definitions the binary parses its command line with
//! ([`crate::cli::command`]), so they cannot drift from it.

use std::{io, path::Path};

use clap_complete::Shell;

/// The manual section: system administration tools and daemons.
pub const MAN_SECTION: &str = "8";

/// The man pages: `limiter.8`, and one per subcommand (`limiter-run.8`,
/// `limiter-connector-set.8`, ...), as (file name, roff).
pub fn man_pages() -> io::Result<Vec<(String, Vec<u8>)>> {
    fn add(command: clap::Command, pages: &mut Vec<(String, Vec<u8>)>) -> io::Result<()> {
        for sub in command.get_subcommands().filter(|s| !s.is_hide_set()) {
            add(sub.clone(), pages)?;
        }
        let man = clap_mangen::Man::new(command).section(MAN_SECTION);
        let mut roff = Vec::new();
        man.render(&mut roff)?;
        pages.push((man.get_filename(), roff));
        Ok(())
    }
    let mut command = crate::cli::command().disable_help_subcommand(true);
    // Gives each subcommand its display name (`limiter-run`).
    command.build();
    let mut pages = Vec::new();
    add(command, &mut pages)?;
    pages.sort();
    Ok(pages)
}

/// The completion script for `shell`.
pub fn completion(shell: Shell) -> Vec<u8> {
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut crate::cli::command(), "limiter", &mut script);
    script
}

/// The shells completions are made for, and where Debian's packages put
/// their scripts.
pub const COMPLETIONS: [(Shell, &str); 3] = [
    (Shell::Bash, "bash-completion/completions/limiter"),
    (Shell::Zsh, "zsh/vendor-completions/_limiter"),
    (Shell::Fish, "fish/vendor_completions.d/limiter.fish"),
];

/// Writes `man/*.8` and the completions, under `dir` as under
/// `/usr/share` (`dir/man/man8/limiter.8`, `dir/bash-completion/...`).
pub fn write_all(dir: &Path) -> io::Result<()> {
    let man = dir.join("man").join(format!("man{MAN_SECTION}"));
    std::fs::create_dir_all(&man)?;
    for (name, roff) in man_pages()? {
        std::fs::write(man.join(name), roff)?;
    }
    for (shell, path) in COMPLETIONS {
        let path = dir.join(path);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(path, completion(shell))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_subcommand_has_a_page_and_every_flag_is_in_it_and_in_the_completions() {
        let pages = man_pages().unwrap();
        let names: Vec<&str> = pages.iter().map(|(n, _)| n.as_str()).collect();
        for name in [
            "limiter.8",
            "limiter-run.8",
            "limiter-connector-set.8",
            "limiter-events.8",
        ] {
            assert!(names.contains(&name), "{name} in {names:?}");
        }
        let page = |name: &str| {
            let (_, roff) = pages.iter().find(|(n, _)| n == name).unwrap();
            String::from_utf8(roff.clone()).unwrap()
        };
        let run = page("limiter-run.8");
        assert!(run.contains(".TH limiter-run 8"), "{run}");
        let bash = String::from_utf8(completion(Shell::Bash)).unwrap();
        let fish = String::from_utf8(completion(Shell::Fish)).unwrap();
        let zsh = String::from_utf8(completion(Shell::Zsh)).unwrap();
        let command = crate::cli::command();
        let run_command = command.find_subcommand("run").unwrap();
        for arg in run_command.get_arguments() {
            let Some(long) = arg.get_long() else { continue };
            // roff escapes the dashes.
            assert!(
                run.contains(&format!("\\-\\-{}", long.replace('-', "\\-"))),
                "--{long} in limiter-run.8"
            );
            assert!(bash.contains(&format!("--{long}")), "--{long} in bash");
            assert!(fish.contains(&format!("-l {long}")), "--{long} in fish");
            assert!(zsh.contains(&format!("--{long}")), "--{long} in zsh");
        }
    }
}
