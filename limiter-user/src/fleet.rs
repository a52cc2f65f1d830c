//! One command for several servers: `limiter ARGS --json` on each host
//! through the system's ssh client (no listening port, no credentials of
//! its own), in parallel, each with its own deadline.

use std::{
    io::{BufRead, BufReader, Read},
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::Context;

/// The options that choose the servers; they stay on this side.
const LOCAL_OPTIONS: &[&str] = &["--server", "--servers-file", "--server-timeout"];

/// The hosts a command goes to, and how to reach them.
#[derive(Debug)]
pub struct Fleet {
    hosts: Vec<String>,
    /// `ssh`, or `$LIMITER_SSH` split as a shell would.
    ssh: Vec<String>,
    timeout: Duration,
}

/// One server's answer: what `limiter ... --json` printed, or why there is
/// none.
#[derive(Debug)]
pub struct Answer {
    pub server: String,
    pub outcome: Result<String, Failure>,
}

/// Why a server gave no answer, in one line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    pub message: String,
    /// The remote limiter itself refused (so nothing changed there); when
    /// false, ssh failed, timed out or the answer was cut, and a change may
    /// or may not have taken.
    pub refused: bool,
}

impl Failure {
    /// A failure whose effect on the server is not known.
    pub fn unknown(message: impl Into<String>) -> Failure {
        Failure {
            message: message.into(),
            refused: false,
        }
    }
}

impl Fleet {
    /// The fleet of `--server` and `--servers-file` (one host a line, `#`
    /// comments), in order, each once; `None` when neither names one.
    pub fn new(
        servers: &[String],
        servers_file: Option<&Path>,
        timeout: Duration,
    ) -> anyhow::Result<Option<Fleet>> {
        let mut hosts: Vec<String> = servers.iter().map(|s| s.trim().to_string()).collect();
        if let Some(path) = servers_file {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("--servers-file {}", path.display()))?;
            hosts.extend(
                text.lines()
                    .map(|l| l.split('#').next().unwrap_or_default().trim())
                    .filter(|l| !l.is_empty())
                    .map(str::to_string),
            );
            if hosts.is_empty() {
                anyhow::bail!("--servers-file {}: names no server", path.display());
            }
        }
        if hosts.is_empty() {
            return Ok(None);
        }
        if let Some(bad) = hosts
            .iter()
            .find(|h| h.is_empty() || h.starts_with('-') || h.contains(char::is_whitespace))
        {
            anyhow::bail!("{bad:?} is not a host name or ssh alias");
        }
        let mut seen = std::collections::HashSet::new();
        hosts.retain(|h| seen.insert(h.clone()));
        let ssh = match std::env::var("LIMITER_SSH") {
            Ok(command) if !command.trim().is_empty() => shell_words::split(&command)
                .map_err(|e| anyhow::anyhow!("LIMITER_SSH {command:?}: {e}"))?,
            _ => vec!["ssh".to_string()],
        };
        if ssh.is_empty() {
            anyhow::bail!("LIMITER_SSH names no command");
        }
        Ok(Some(Fleet {
            hosts,
            ssh,
            timeout,
        }))
    }

    pub fn hosts(&self) -> &[String] {
        &self.hosts
    }

    /// Runs `limiter ARGS --json` on every server at once and waits for
    /// each until its deadline.
    pub fn ask(&self, args: &[String]) -> Vec<Answer> {
        self.each_host(|host| self.ask_one(host, args))
    }

    /// Runs `limiter ARGS --json` on every server and hands each line it
    /// prints to `line` as it comes, until every server has ended (what
    /// `events --follow` needs). The answers say how each ended.
    pub fn stream(&self, args: &[String], line: &(dyn Fn(&str, &str) + Sync)) -> Vec<Answer> {
        self.each_host(|host| {
            let outcome = self.spawn(host, args).and_then(|mut child| {
                let stderr = drain(child.stderr.take());
                if let Some(stdout) = child.stdout.take() {
                    for text in BufReader::new(stdout).lines().map_while(Result::ok) {
                        line(host, &text);
                    }
                }
                let status = child
                    .wait()
                    .map_err(|e| Failure::unknown(format!("ssh: {e}")))?;
                finished(status, String::new(), join(stderr))
            });
            // A follower never ends on its own: say at once which server
            // could not be followed.
            if let Err(failure) = &outcome {
                eprintln!("limiter: {host}: {}", failure.message);
            }
            outcome
        })
    }

    /// `run` for every host, each on a thread of its own, all at once.
    fn each_host(&self, run: impl Fn(&str) -> Result<String, Failure> + Sync) -> Vec<Answer> {
        std::thread::scope(|scope| {
            let running: Vec<_> = self
                .hosts
                .iter()
                .map(|host| scope.spawn(|| run(host)))
                .collect();
            running
                .into_iter()
                .zip(&self.hosts)
                .map(|(handle, host)| Answer {
                    server: host.clone(),
                    outcome: handle
                        .join()
                        .unwrap_or_else(|_| Err(Failure::unknown("the thread asking it failed"))),
                })
                .collect()
        })
    }

    fn spawn(&self, host: &str, args: &[String]) -> Result<Child, Failure> {
        let mut remote = vec!["limiter".to_string()];
        remote.extend(args.iter().cloned());
        remote.push("--json".to_string());
        let connect_timeout = self.timeout.as_secs().clamp(1, 10);
        Command::new(&self.ssh[0])
            .args(&self.ssh[1..])
            .args(["-o", "BatchMode=yes"])
            .arg("-o")
            .arg(format!("ConnectTimeout={connect_timeout}"))
            .arg("--")
            .arg(host)
            // ssh hands the remote shell one string.
            .arg(shell_words::join(&remote))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| Failure::unknown(format!("running {}: {e}", self.ssh[0])))
    }

    fn ask_one(&self, host: &str, args: &[String]) -> Result<String, Failure> {
        let mut child = self.spawn(host, args)?;
        let stdout = drain(child.stdout.take());
        let stderr = drain(child.stderr.take());
        let deadline = Instant::now() + self.timeout;
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Ok(None) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(Failure::unknown(format!(
                        "no answer within {}s (--server-timeout)",
                        self.timeout.as_secs()
                    )));
                }
                Err(e) => return Err(Failure::unknown(format!("ssh: {e}"))),
            }
        };
        finished(status, join(stdout), join(stderr))
    }
}

/// Reads a child's pipe to the end on a thread of its own (so that neither
/// pipe fills while the other is read).
fn drain(pipe: Option<impl Read + Send + 'static>) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut text = String::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_string(&mut text);
        }
        text
    })
}

fn join(handle: std::thread::JoinHandle<String>) -> String {
    handle.join().unwrap_or_default()
}

/// The answer of a finished `ssh`: its output, or the one line that says
/// what went wrong (ssh's own, or the remote limiter's).
fn finished(
    status: std::process::ExitStatus,
    stdout: String,
    stderr: String,
) -> Result<String, Failure> {
    if status.success() {
        return Ok(stdout);
    }
    let last = stderr.lines().map(str::trim).rfind(|l| !l.is_empty());
    // limiter exits 1 with one "limiter: ..." line when it refuses (ssh
    // itself exits 255).
    if status.code() == Some(1)
        && let Some(refusal) = last.and_then(|l| l.strip_prefix("limiter: "))
    {
        return Err(Failure {
            message: refusal.to_string(),
            refused: true,
        });
    }
    Err(Failure::unknown(match (status.code(), last) {
        (_, Some(line)) => line.to_string(),
        (Some(255), None) => "ssh failed".to_string(),
        (Some(code), None) => format!("exited with status {code}"),
        (None, None) => "killed by a signal".to_string(),
    }))
}

/// This command line without the options that choose the servers and
/// without `--json` (the fleet asks for JSON itself): what each server
/// runs.
pub fn remote_args(args: impl IntoIterator<Item = String>) -> Vec<String> {
    let mut out = Vec::new();
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        if arg == "--json" {
            continue;
        }
        if LOCAL_OPTIONS.contains(&arg.as_str()) {
            args.next();
            continue;
        }
        if LOCAL_OPTIONS
            .iter()
            .any(|o| arg.starts_with(&format!("{o}=")))
        {
            continue;
        }
        out.push(arg);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(args: &[&str]) -> Vec<String> {
        args.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn the_servers_options_stay_here() {
        assert_eq!(
            remote_args(strings(&[
                "connector",
                "set",
                "Default Frontend",
                "--server",
                "mx1",
                "--max-inbound-connection-per-source",
                "500",
                "--server=mx2",
                "--servers-file",
                "/etc/limiter/servers",
                "--server-timeout=5",
                "--json",
            ])),
            strings(&[
                "connector",
                "set",
                "Default Frontend",
                "--max-inbound-connection-per-source",
                "500",
            ])
        );
    }

    #[test]
    fn a_servers_file_is_read_in_order_once_each() {
        let dir = std::env::temp_dir().join(format!("limiter-fleet-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("servers");
        std::fs::write(&file, "# the MX hosts\nmx2\n\nmx1  # primary\nmx2\n").unwrap();
        let fleet = Fleet::new(&strings(&["mx3"]), Some(&file), Duration::from_secs(5))
            .unwrap()
            .unwrap();
        assert_eq!(fleet.hosts(), strings(&["mx3", "mx2", "mx1"]));
        std::fs::write(&file, "# nobody\n").unwrap();
        let error = Fleet::new(&[], Some(&file), Duration::from_secs(5)).unwrap_err();
        assert!(error.to_string().contains("names no server"), "{error}");
        assert!(
            Fleet::new(
                &strings(&["-oProxyCommand=x"]),
                None,
                Duration::from_secs(5)
            )
            .is_err()
        );
        assert!(
            Fleet::new(&[], None, Duration::from_secs(5))
                .unwrap()
                .is_none()
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_failure_is_one_line() {
        use std::os::unix::process::ExitStatusExt;
        let failed = |code: i32| std::process::ExitStatus::from_raw(code << 8);
        assert_eq!(
            finished(
                failed(1),
                String::new(),
                "limiter: there is no connector \"Relay\"\n".into()
            ),
            Err(Failure {
                message: "there is no connector \"Relay\"".to_string(),
                refused: true
            })
        );
        assert_eq!(
            finished(
                failed(255),
                String::new(),
                "ssh: connect to host 10.78.2.1 port 22: Connection refused\r\n".into()
            ),
            Err(Failure::unknown(
                "ssh: connect to host 10.78.2.1 port 22: Connection refused"
            ))
        );
        assert_eq!(
            finished(failed(0), "[]".into(), String::new()),
            Ok("[]".to_string())
        );
    }
}
