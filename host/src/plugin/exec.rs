//! The `exec` capability: a collector may start programs the operator
//! allow-listed for it, and every process it started is gone when its run
//! ends.
//!
//! - [`ExecPolicy`]: what the operator allows (`exec_allow`, `exec_env`,
//!   `exec_grace_secs` of the role).
//! - [`ExecCtx`]: one run's view: the policy, the working directory, and
//!   the process groups started so far.
//! - [`Process`]: the host side of the WIT `process` resource.
//! - [`ProcessGroups::terminate`]: after the run: stdin closed (the store
//!   is gone), a grace period, SIGTERM to each group, another grace
//!   period, SIGKILL.
//! - [`ExecScript`]: for plugin authors' tests (`autocollect::testing`),
//!   programs that are not started: each start is answered by a script
//!   (output lines, exit status), after the same policy checks.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin};
use tokio::sync::mpsc;

/// Longest output line kept; the rest of the line is dropped.
pub const LINE_MAX: usize = 16 * 1024;
/// Output lines buffered per child before its pipes fill up.
const LINES_BUFFERED: usize = 256;
/// How often a stopping process group is checked.
const POLL: Duration = Duration::from_millis(20);

/// What the operator lets one plugin run.
#[derive(Debug, Clone, Default)]
pub struct ExecPolicy {
    /// Absolute paths of the programs it may start.
    pub allowed: Vec<String>,
    /// Environment every child gets.
    pub env: Vec<(String, String)>,
    /// Names of the variables the plugin itself may set (others are
    /// refused: `LD_PRELOAD=./lib.so` would run the plugin's own code).
    pub env_allowed: Vec<String>,
    /// How long a child gets after its stdin closes, and again after
    /// SIGTERM, before the next step.
    pub grace: Duration,
    /// How many programs may be running at once (each with whatever it
    /// started in its process group).
    pub max_processes: usize,
    /// Tests only: answer starts from this script instead of starting
    /// anything.
    pub script: Option<ExecScript>,
}

/// A program start as a script sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecCall {
    pub program: String,
    pub args: Vec<String>,
    /// What the plugin set (the policy's `exec_env` not included).
    pub env: Vec<(String, String)>,
    /// The directory it would run in (the job's output directory): the
    /// script may write the files the program would have written.
    pub cwd: PathBuf,
}

/// What a scripted program does: its output lines, then its exit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScriptedRun {
    pub stdout: Vec<String>,
    pub stderr: Vec<String>,
    pub exit: Exit,
}

/// One scripted start: the call, and what the plugin wrote to its stdin.
#[derive(Debug, Clone)]
pub struct ScriptedCall {
    pub call: ExecCall,
    pub stdin: Arc<Mutex<Vec<u8>>>,
}

type Respond = dyn Fn(&ExecCall) -> ScriptedRun + Send + Sync;

/// Scripted programs: `respond` answers each start; every call is kept.
#[derive(Clone)]
pub struct ExecScript {
    respond: Arc<Respond>,
    calls: Arc<Mutex<Vec<ScriptedCall>>>,
}

impl std::fmt::Debug for ExecScript {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExecScript").finish_non_exhaustive()
    }
}

impl ExecScript {
    pub fn new(respond: impl Fn(&ExecCall) -> ScriptedRun + Send + Sync + 'static) -> ExecScript {
        ExecScript {
            respond: Arc::new(respond),
            calls: Default::default(),
        }
    }

    /// Every start so far, in order.
    pub fn calls(&self) -> Vec<ScriptedCall> {
        self.calls.lock().unwrap().clone()
    }
}

impl ExecPolicy {
    /// Why the plugin may not set these variables, if it may not.
    pub fn check_env(&self, env: &[(String, String)]) -> Result<(), String> {
        match env.iter().find(|(k, _)| !self.env_allowed.contains(k)) {
            None => Ok(()),
            Some((k, _)) => Err(format!(
                "the plugin may not set environment variable {k} (exec_env_allow)"
            )),
        }
    }

    /// Why `program` may not run, if it may not.
    pub fn check(&self, program: &str) -> Result<(), String> {
        if !Path::new(program).is_absolute() {
            return Err(format!("{program:?} is not an absolute path"));
        }
        if !self.allowed.iter().any(|a| a == program) {
            return Err(if self.allowed.is_empty() {
                format!(
                    "{program} is not allowed: this plugin may not run programs (exec_allow is empty)"
                )
            } else {
                format!("{program} is not allowed for this plugin (exec_allow)")
            });
        }
        Ok(())
    }
}

/// One run's exec state.
pub struct ExecCtx {
    pub policy: Arc<ExecPolicy>,
    /// Host directory children run in (the job's output directory).
    pub cwd: Option<PathBuf>,
    pub groups: ProcessGroups,
    /// Every program the run started, for the host's manifest.
    pub runs: ExecRuns,
}

/// One program a run started: what, and how it ended (if the plugin
/// waited for it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecRun {
    pub program: String,
    pub args: Vec<String>,
    /// `None`: the plugin never waited for it (it was stopped with the run).
    pub exit: Option<Exit>,
    /// From the start to the end the plugin's `wait` saw.
    pub duration: Option<Duration>,
}

/// The programs a run started, in order (shared with its processes, which
/// fill in how they ended).
#[derive(Clone, Default)]
pub struct ExecRuns(Arc<Mutex<Vec<ExecRun>>>);

impl ExecRuns {
    pub fn snapshot(&self) -> Vec<ExecRun> {
        self.0.lock().unwrap().clone()
    }

    fn start(&self, program: &str, args: &[String]) -> usize {
        let mut runs = self.0.lock().unwrap();
        runs.push(ExecRun {
            program: program.to_string(),
            args: args.to_vec(),
            exit: None,
            duration: None,
        });
        runs.len() - 1
    }

    fn ended(&self, index: usize, exit: Exit, duration: Duration) {
        if let Some(run) = self.0.lock().unwrap().get_mut(index) {
            run.exit = Some(exit);
            run.duration = Some(duration);
        }
    }
}

/// The process groups a run started (by their leader's pid).
#[derive(Clone, Default)]
pub struct ProcessGroups(Arc<Mutex<Vec<u32>>>);

/// A started child (or a scripted one), as the plugin holds it.
pub struct Process {
    pid: u32,
    child: Running,
    lines: mpsc::Receiver<OutputLine>,
    started: Instant,
    /// Where its end is recorded (its index in the run's [`ExecRuns`]).
    record: (ExecRuns, usize),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

#[derive(Debug, Clone)]
pub struct OutputLine {
    pub stream: Stream,
    pub text: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    Signal(i32),
}

/// Why a spawn did not happen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SpawnError {
    Denied(String),
    Failed(String),
}

impl ExecCtx {
    /// Start `program` if the policy allows it.
    pub fn spawn(
        &self,
        program: &str,
        args: &[String],
        env: &[(String, String)],
        plugin: &str,
    ) -> Result<Process, SpawnError> {
        if let Err(reason) = self
            .policy
            .check(program)
            .and_then(|()| self.policy.check_env(env))
        {
            tracing::warn!(%plugin, %program, "refused to start a program: {reason}");
            return Err(SpawnError::Denied(reason));
        }
        let Some(cwd) = &self.cwd else {
            return Err(SpawnError::Denied(
                "programs may not be started here (no job directory)".into(),
            ));
        };
        let running = self.groups.running();
        if running >= self.policy.max_processes {
            let reason = format!(
                "{running} programs are already running, the most this plugin may have (exec_max_processes)"
            );
            tracing::warn!(%plugin, %program, "refused to start a program: {reason}");
            return Err(SpawnError::Denied(reason));
        }
        if let Some(script) = &self.policy.script {
            return Ok(self.scripted(script, program, args, env, cwd));
        }
        let mut command = tokio::process::Command::new(program);
        command
            .args(args)
            .env_clear()
            .envs(self.policy.env.iter().cloned())
            .envs(env.iter().cloned())
            .current_dir(cwd)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        let mut child = command
            .spawn()
            .map_err(|e| SpawnError::Failed(format!("starting {program}: {e}")))?;
        let pid = child.id().expect("a child that was just spawned has a pid");
        self.groups.0.lock().unwrap().push(pid);
        let record = (self.runs.clone(), self.runs.start(program, args));
        tracing::info!(%plugin, %program, pid, "started a program");
        crate::metrics::global().programs_started.inc();

        let (tx, lines) = mpsc::channel(LINES_BUFFERED);
        let stdout = child.stdout.take().expect("piped");
        let stderr = child.stderr.take().expect("piped");
        tokio::spawn(forward_lines(
            BufReader::new(stdout),
            Stream::Stdout,
            tx.clone(),
        ));
        tokio::spawn(forward_lines(BufReader::new(stderr), Stream::Stderr, tx));
        Ok(Process {
            pid,
            child: Running::Child {
                stdin: child.stdin.take(),
                child: Box::new(child),
            },
            lines,
            started: Instant::now(),
            record,
        })
    }

    /// A start answered by `script`: its lines queued, its exit kept for
    /// `wait`, its stdin recorded.
    fn scripted(
        &self,
        script: &ExecScript,
        program: &str,
        args: &[String],
        env: &[(String, String)],
        cwd: &Path,
    ) -> Process {
        let call = ExecCall {
            program: program.to_string(),
            args: args.to_vec(),
            env: env.to_vec(),
            cwd: cwd.to_path_buf(),
        };
        let run = (script.respond)(&call);
        let stdin = Arc::new(Mutex::new(Vec::new()));
        script.calls.lock().unwrap().push(ScriptedCall {
            call,
            stdin: stdin.clone(),
        });
        let (tx, lines) = mpsc::channel(run.stdout.len() + run.stderr.len() + 1);
        let stdout = run.stdout.into_iter().map(|text| (Stream::Stdout, text));
        let stderr = run.stderr.into_iter().map(|text| (Stream::Stderr, text));
        for (stream, text) in stdout.chain(stderr) {
            let _ = tx.try_send(OutputLine { stream, text });
        }
        Process {
            pid: 0,
            child: Running::Scripted {
                exit: run.exit,
                stdin: Some(stdin),
            },
            lines,
            started: Instant::now(),
            record: (self.runs.clone(), self.runs.start(program, args)),
        }
    }
}

/// A real child, or a scripted one.
enum Running {
    Child {
        child: Box<Child>,
        stdin: Option<ChildStdin>,
    },
    Scripted {
        exit: Exit,
        stdin: Option<Arc<Mutex<Vec<u8>>>>,
    },
}

impl Process {
    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub async fn write_stdin(&mut self, data: &[u8]) -> Result<(), String> {
        match &mut self.child {
            Running::Child { stdin, .. } => {
                let stdin = stdin.as_mut().ok_or("stdin is closed")?;
                stdin.write_all(data).await.map_err(|e| e.to_string())?;
                stdin.flush().await.map_err(|e| e.to_string())
            }
            Running::Scripted { stdin, .. } => {
                let stdin = stdin.as_ref().ok_or("stdin is closed")?;
                stdin.lock().unwrap().extend_from_slice(data);
                Ok(())
            }
        }
    }

    pub fn close_stdin(&mut self) {
        match &mut self.child {
            Running::Child { stdin, .. } => *stdin = None,
            Running::Scripted { stdin, .. } => *stdin = None,
        }
    }

    pub async fn read_line(&mut self) -> Option<OutputLine> {
        self.lines.recv().await
    }

    pub async fn wait(&mut self) -> Result<Exit, String> {
        use std::os::unix::process::ExitStatusExt;
        let exit = match &mut self.child {
            Running::Scripted { exit, .. } => *exit,
            Running::Child { child, .. } => {
                let status = child.wait().await.map_err(|e| e.to_string())?;
                match (status.code(), status.signal()) {
                    (Some(code), _) => Exit::Code(code),
                    (None, Some(signal)) => Exit::Signal(signal),
                    (None, None) => Exit::Code(-1),
                }
            }
        };
        let (runs, index) = &self.record;
        runs.ended(*index, exit, self.started.elapsed());
        Ok(exit)
    }

    pub fn kill(&mut self) {
        if let Running::Child { .. } = self.child {
            crate::metrics::global().programs_killed.inc();
            signal_group(self.pid, libc::SIGKILL);
        }
    }
}

/// Send each line of `reader` to `tx` until the stream ends or nobody
/// listens any more.
async fn forward_lines(
    mut reader: impl AsyncBufRead + Unpin,
    stream: Stream,
    tx: mpsc::Sender<OutputLine>,
) {
    while let Some(text) = read_line_capped(&mut reader).await {
        if tx.send(OutputLine { stream, text }).await.is_err() {
            return;
        }
    }
}

/// One line (without `\n` or `\r\n`), at most [`LINE_MAX`] bytes of it;
/// `None` at the end of the stream or on a read error.
async fn read_line_capped(reader: &mut (impl AsyncBufRead + Unpin)) -> Option<String> {
    let mut line = Vec::new();
    let mut saw_any = false;
    loop {
        let buf = reader.fill_buf().await.ok()?;
        if buf.is_empty() {
            return saw_any.then(|| finish_line(line));
        }
        saw_any = true;
        let (chunk, found) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (&buf[..i], Some(i + 1)),
            None => (buf, None),
        };
        let room = LINE_MAX.saturating_sub(line.len());
        line.extend_from_slice(&chunk[..chunk.len().min(room)]);
        let used = found.unwrap_or(buf.len());
        reader.consume(used);
        if found.is_some() {
            return Some(finish_line(line));
        }
    }
}

fn finish_line(mut line: Vec<u8>) -> String {
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    String::from_utf8_lossy(&line).into_owned()
}

impl ProcessGroups {
    /// How many of the run's process groups still have a live process.
    pub fn running(&self) -> usize {
        let groups = self.0.lock().unwrap().clone();
        groups.into_iter().filter(|&g| group_alive(g)).count()
    }

    /// Stop every process group the run started: each gets `grace` to go
    /// by itself (its stdin is closed by now), then SIGTERM and another
    /// `grace`, then SIGKILL. Returns once none is left (or, for a process
    /// that even SIGKILL cannot end at once, after a last short wait).
    pub async fn terminate(&self, grace: Duration, plugin: &str) {
        let groups = std::mem::take(&mut *self.0.lock().unwrap());
        let stops = groups
            .into_iter()
            .map(|pgid| stop_group(pgid, grace, plugin));
        futures::future::join_all(stops).await;
    }
}

async fn stop_group(pgid: u32, grace: Duration, plugin: &str) {
    for (signal, name, wait) in [
        (None, "", grace),
        (Some(libc::SIGTERM), "SIGTERM", grace),
        (Some(libc::SIGKILL), "SIGKILL", Duration::from_secs(2)),
    ] {
        if let Some(signal) = signal {
            if !group_alive(pgid) {
                return;
            }
            if signal == libc::SIGTERM {
                crate::metrics::global().programs_killed.inc();
            }
            tracing::warn!(%plugin, pgid, "a program's process group outlived its run: {name}");
            signal_group(pgid, signal);
        }
        let deadline = tokio::time::Instant::now() + wait;
        while group_alive(pgid) && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(POLL).await;
        }
    }
    if group_alive(pgid) {
        tracing::error!(%plugin, pgid, "a process group survived SIGKILL");
    }
}

fn signal_group(pgid: u32, signal: i32) {
    // SAFETY: kill(2) with a negative pid signals a process group; it
    // touches no memory of ours.
    unsafe {
        libc::kill(-(pgid as i32), signal);
    }
}

/// Does any live (not zombie) process belong to process group `pgid`?
/// Zombies are dead: they only wait for their parent to reap them.
pub fn group_alive(pgid: u32) -> bool {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return false;
    };
    entries.flatten().any(|entry| {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        else {
            return false;
        };
        process_state(pid).is_some_and(|(state, pgrp)| pgrp == pgid && state != 'Z' && state != 'X')
    })
}

/// State letter and process group of `/proc/PID`.
fn process_state(pid: &str) -> Option<(char, u32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces: parse after it.
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let _ppid = fields.next()?;
    let pgrp = fields.next()?.parse().ok()?;
    Some((state, pgrp))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_allow_listed_absolute_paths_may_run() {
        let policy = ExecPolicy {
            allowed: vec!["/opt/couchbase/bin/cbcollect_info".into()],
            ..Default::default()
        };
        assert!(policy.check("/opt/couchbase/bin/cbcollect_info").is_ok());
        for denied in [
            "/bin/sh",
            "cbcollect_info",
            "/opt/couchbase/bin/../bin/cbcollect_info",
        ] {
            assert!(policy.check(denied).is_err(), "{denied}");
        }
        let none = ExecPolicy::default();
        assert!(
            none.check("/bin/true")
                .unwrap_err()
                .contains("exec_allow is empty")
        );
    }

    #[test]
    fn the_plugin_sets_only_the_variables_the_operator_allows() {
        let policy = ExecPolicy {
            env_allowed: vec!["CB_DEBUG".into()],
            ..Default::default()
        };
        let var = |k: &str| vec![(k.to_string(), "1".to_string())];
        assert!(policy.check_env(&var("CB_DEBUG")).is_ok());
        let refused = policy.check_env(&var("LD_PRELOAD")).unwrap_err();
        assert!(refused.contains("LD_PRELOAD"), "{refused}");
        assert!(ExecPolicy::default().check_env(&[]).is_ok());
    }

    #[tokio::test]
    async fn long_lines_are_cut_and_crlf_removed() {
        let long = "x".repeat(LINE_MAX + 10);
        let input = format!("a\r\n{long}\nlast");
        let mut reader = BufReader::new(input.as_bytes());
        assert_eq!(read_line_capped(&mut reader).await.as_deref(), Some("a"));
        assert_eq!(read_line_capped(&mut reader).await.unwrap().len(), LINE_MAX);
        assert_eq!(read_line_capped(&mut reader).await.as_deref(), Some("last"));
        assert_eq!(read_line_capped(&mut reader).await, None);
    }
}
