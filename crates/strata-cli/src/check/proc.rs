//! A worker process of a torture run and its line protocol (commands on stdin, answers
//! on stdout, a history file, stderr kept in a file).

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

use crate::secret;

/// A worker process and its line protocol.
pub struct WorkerProc {
    /// Its name (in the history and in messages).
    pub name: String,
    /// The process.
    pub child: Child,
    stdin: ChildStdin,
    lines: Lines<BufReader<ChildStdout>>,
    stderr: PathBuf,
    /// Its history file.
    pub history: PathBuf,
}

impl WorkerProc {
    /// Sends one command line.
    pub async fn send(&mut self, command: &str) -> Result<()> {
        self.stdin
            .write_all(format!("{command}\n").as_bytes())
            .await
            .with_context(|| format!("{} does not listen: {}", self.name, self.stderr_tail()))?;
        self.stdin.flush().await.with_context(|| format!("{} does not listen", self.name))
    }

    /// Waits for a line starting with `word`; returns the rest.
    pub async fn expect(&mut self, word: &str, within: Duration) -> Result<String> {
        let line = tokio::time::timeout(within, self.lines.next_line())
            .await
            .map_err(|_| {
                anyhow!("{} did not say {word} within {within:?}: {}", self.name, self.stderr_tail())
            })?
            .with_context(|| format!("reading from {}", self.name))?
            .ok_or_else(|| anyhow!("{} exited before saying {word}: {}", self.name, self.stderr_tail()))?;
        match line.strip_prefix(word) {
            Some(rest) => Ok(rest.trim().to_owned()),
            None => bail!("{} said {line:?}, expected {word}", self.name),
        }
    }

    /// The end of its stderr, secrets scrubbed.
    pub fn stderr_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.stderr).unwrap_or_default();
        let start = text.len().saturating_sub(2000);
        let start = (start..text.len()).find(|&i| text.is_char_boundary(i)).unwrap_or(text.len());
        format!("its stderr ends with:\n{}", secret::scrub(&text[start..]))
    }
}

impl WorkerProc {
    /// Starts `cmd` as the worker `name` (killed when dropped), stderr to `stderr`.
    pub fn start(name: String, mut cmd: Command, stderr: PathBuf, history: PathBuf) -> Result<WorkerProc> {
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).context("cannot create a worker's stderr file")?)
            .kill_on_drop(true);
        let mut child = cmd.spawn().with_context(|| format!("cannot start {name}"))?;
        let stdin = child.stdin.take().ok_or_else(|| anyhow!("no stdin for {name}"))?;
        let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout for {name}"))?;
        Ok(WorkerProc { name, child, stdin, lines: BufReader::new(stdout).lines(), stderr, history })
    }
}
