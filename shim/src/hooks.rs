//! OCI hooks that run in the runtime's namespace on the host: `prestart` and `createRuntime`
//! before the container's network is taken over, `poststart` after it starts, `poststop` after
//! it is deleted. Docker's `libnetwork-setkey` and nerdctl's CNI hook are such hooks: they set
//! up the network namespace whose interfaces the VM then takes over.
//!
//! `createContainer` and `startContainer` hooks would run inside the container's namespaces,
//! which are in the guest, where host binaries do not exist: they are skipped with a warning.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use oci_spec::runtime::{Hook, Spec};
use serde::Serialize;
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

/// A hook without a timeout of its own gets this long: a hung hook must not hang the runtime.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
/// What a failed hook printed, kept for the error message.
const STDERR_KEEP: usize = 2000;

#[derive(Debug, thiserror::Error)]
pub enum HookError {
    #[error("{phase} hook {path}: cannot start it: {source}")]
    Spawn {
        phase: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{phase} hook {path} failed ({status}): {stderr}")]
    Failed {
        phase: &'static str,
        path: PathBuf,
        status: String,
        stderr: String,
    },
    #[error("{phase} hook {path} did not finish within {timeout:?}; it was killed")]
    Timeout {
        phase: &'static str,
        path: PathBuf,
        timeout: Duration,
    },
}

/// The container state a hook reads on its stdin (OCI runtime spec, "State").
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct State {
    pub oci_version: String,
    pub id: String,
    pub status: &'static str,
    /// A process in the container's network namespace (see `net::NetnsHolder`), or the VMM.
    pub pid: u32,
    pub bundle: PathBuf,
    #[serde(skip_serializing_if = "std::collections::HashMap::is_empty")]
    pub annotations: std::collections::HashMap<String, String>,
}

impl State {
    pub fn new(spec: &Spec, id: &str, status: &'static str, pid: u32, bundle: &Path) -> Self {
        Self {
            oci_version: spec.version().clone(),
            id: id.to_string(),
            status,
            pid,
            bundle: bundle.to_path_buf(),
            annotations: spec.annotations().clone().unwrap_or_default(),
        }
    }
}

/// The hooks that run on the host when a container is created, in the order runc runs them.
pub fn create_hooks(spec: &Spec) -> Vec<Hook> {
    let Some(hooks) = spec.hooks() else {
        return Vec::new();
    };
    for (phase, list) in [
        ("createContainer", hooks.create_container()),
        ("startContainer", hooks.start_container()),
    ] {
        if let Some(list) = list.as_ref().filter(|l| !l.is_empty()) {
            log::warn!(
                "skipping {} {phase} hook(s): they would run inside the guest, where host binaries do not exist",
                list.len()
            );
        }
    }
    #[allow(deprecated)] // prestart is deprecated in the spec but Docker still uses it.
    let prestart = hooks.prestart().clone().unwrap_or_default();
    prestart
        .into_iter()
        .chain(hooks.create_runtime().clone().unwrap_or_default())
        .collect()
}

/// A container's hooks for after Create: poststart and poststop, with the state they read. A
/// failure of either is worth a warning, not the container (OCI runtime spec).
#[derive(Debug, Clone)]
pub struct LaterHooks {
    poststart: Vec<Hook>,
    poststop: Vec<Hook>,
    state: State,
}

impl LaterHooks {
    pub fn new(spec: &Spec, id: &str, bundle: &Path) -> Self {
        let hooks = spec.hooks().as_ref();
        Self {
            poststart: hooks
                .and_then(|h| h.poststart().clone())
                .unwrap_or_default(),
            poststop: hooks.and_then(|h| h.poststop().clone()).unwrap_or_default(),
            state: State::new(spec, id, "created", 0, bundle),
        }
    }

    /// Runs the poststart hooks for a container now running as `pid`.
    pub async fn poststart(&self, pid: u32) {
        self.run_logged("poststart", &self.poststart, "running", pid)
            .await;
    }

    /// Runs the poststop hooks for a container gone (its VMM was `pid`).
    pub async fn poststop(&self, pid: u32) {
        self.run_logged("poststop", &self.poststop, "stopped", pid)
            .await;
    }

    async fn run_logged(
        &self,
        phase: &'static str,
        hooks: &[Hook],
        status: &'static str,
        pid: u32,
    ) {
        let state = State {
            status,
            pid,
            ..self.state.clone()
        };
        if let Err(e) = run(phase, hooks, &state).await {
            log::warn!("container {}: {e}", self.state.id);
        }
    }
}

/// Runs `hooks` one after another with `state` on stdin; the first failure stops the run.
pub async fn run(phase: &'static str, hooks: &[Hook], state: &State) -> Result<(), HookError> {
    let input = serde_json::to_vec(state).unwrap_or_default();
    for hook in hooks {
        run_one(phase, hook, &input).await?;
    }
    Ok(())
}

async fn run_one(phase: &'static str, hook: &Hook, input: &[u8]) -> Result<(), HookError> {
    let path = hook.path().clone();
    let mut cmd = Command::new(&path);
    // args[0] is the hook's argv[0], as in execv.
    if let Some(args) = hook.args() {
        if let Some((argv0, rest)) = args.split_first() {
            cmd.arg0(argv0).args(rest);
        }
    }
    // The hook gets exactly the environment the spec gives it, like runc does.
    cmd.env_clear();
    for entry in hook.env().iter().flatten() {
        if let Some((key, value)) = entry.split_once('=') {
            if !key.is_empty() {
                cmd.env(key, value);
            }
        }
    }
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().map_err(|source| HookError::Spawn {
        phase,
        path: path.clone(),
        source,
    })?;
    let timeout = hook
        .timeout()
        .filter(|t| *t > 0)
        .map(|t| Duration::from_secs(t as u64))
        .unwrap_or(DEFAULT_TIMEOUT);
    // The timeout covers the hook's whole life, feeding its stdin included: a hook that does
    // not read a state larger than the pipe's buffer must not hold Create beyond it.
    let stdin = child.stdin.take();
    let life = async move {
        if let Some(mut stdin) = stdin {
            // A hook that does not read its state is fine: ignore a broken pipe.
            let _ = stdin.write_all(input).await;
        }
        child.wait_with_output().await
    };
    let output = match tokio::time::timeout(timeout, life).await {
        Ok(Ok(output)) => output,
        Ok(Err(source)) => {
            return Err(HookError::Spawn {
                phase,
                path,
                source,
            })
        }
        // Dropping the future kills the child (kill_on_drop).
        Err(_) => {
            return Err(HookError::Timeout {
                phase,
                path,
                timeout,
            })
        }
    };
    if output.status.success() {
        log::info!("{phase} hook {} done", path.display());
        return Ok(());
    }
    let mut stderr = String::from_utf8_lossy(&output.stderr).trim().to_string();
    if stderr.len() > STDERR_KEEP {
        let mut cut = STDERR_KEEP;
        while !stderr.is_char_boundary(cut) {
            cut -= 1;
        }
        stderr.truncate(cut);
    }
    Err(HookError::Failed {
        phase,
        path,
        status: output.status.to_string(),
        stderr,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(hooks: &str) -> Spec {
        serde_json::from_str(&format!(
            r#"{{"ociVersion":"1.0.2","annotations":{{"a":"b"}},"hooks":{hooks}}}"#
        ))
        .expect("spec")
    }

    fn state(spec: &Spec) -> State {
        State::new(spec, "c1", "creating", 4242, Path::new("/bundle"))
    }

    #[test]
    fn create_hooks_are_prestart_then_create_runtime() {
        let s = spec(
            r#"{"prestart":[{"path":"/p"}],"createRuntime":[{"path":"/r"}],
                "createContainer":[{"path":"/c"}],"poststart":[{"path":"/s"}]}"#,
        );
        let paths: Vec<_> = create_hooks(&s).iter().map(|h| h.path().clone()).collect();
        assert_eq!(paths, [PathBuf::from("/p"), PathBuf::from("/r")]);
        let later = LaterHooks::new(&s, "c1", Path::new("/bundle"));
        assert_eq!(later.poststart.len(), 1);
        assert!(later.poststop.is_empty());
    }

    #[test]
    fn state_is_the_oci_shape() {
        let json = serde_json::to_value(state(&spec("{}"))).expect("json");
        assert_eq!(
            json,
            serde_json::json!({"ociVersion":"1.0.2","id":"c1","status":"creating","pid":4242,
                               "bundle":"/bundle","annotations":{"a":"b"}})
        );
    }

    #[tokio::test]
    async fn a_hook_reads_the_state_with_its_own_args_and_env() {
        let out = std::env::temp_dir().join(format!("hako-hook-{}", std::process::id()));
        let script = format!(
            r#"read -r state; echo "$0 ${{1-none}} $HOOKVAR ${{HOME-none}}|$state" > {}"#,
            out.display()
        );
        let s = spec(&format!(
            r#"{{"prestart":[{{"path":"/bin/sh","args":["myhook","-c",{},"first"],
                 "env":["HOOKVAR=set"]}}]}}"#,
            serde_json::to_string(&script).expect("quoted")
        ));
        run("prestart", &create_hooks(&s), &state(&s))
            .await
            .expect("hook ran");
        let written = std::fs::read_to_string(&out).expect("hook output");
        let _ = std::fs::remove_file(&out);
        let (head, state_json) = written.trim().split_once('|').expect("separator");
        // `sh -c SCRIPT first`: $0 is "first" and $1 unset; HOME is unset because the hook
        // gets only the spec's environment.
        assert_eq!(head, "first none set none");
        let parsed: serde_json::Value = serde_json::from_str(state_json).expect("state json");
        assert_eq!(parsed["pid"], 4242);
        assert_eq!(parsed["status"], "creating");
    }

    #[tokio::test]
    async fn a_failing_hook_is_an_error_with_its_stderr() {
        let s = spec(
            r#"{"createRuntime":[{"path":"/bin/sh","args":["sh","-c","echo broken >&2; exit 3"]}]}"#,
        );
        let err = run("createRuntime", &create_hooks(&s), &state(&s))
            .await
            .expect_err("fails");
        let text = err.to_string();
        assert!(text.contains("exit status: 3"), "{text}");
        assert!(text.contains("broken"), "{text}");
    }

    #[tokio::test]
    async fn a_hung_hook_is_killed_at_its_timeout() {
        let s = spec(
            r#"{"prestart":[{"path":"/bin/sh","args":["sh","-c","exec sleep 30"],"timeout":1}]}"#,
        );
        let started = std::time::Instant::now();
        let err = run("prestart", &create_hooks(&s), &state(&s))
            .await
            .expect_err("times out");
        assert!(matches!(err, HookError::Timeout { .. }), "{err}");
        assert!(started.elapsed() < Duration::from_secs(10));
    }

    #[tokio::test]
    async fn the_timeout_covers_a_hook_that_never_reads_its_state() {
        // More state than a pipe buffers (64 KiB), for a hook that never reads stdin.
        let big = format!(
            r#"{{"ociVersion":"1.0.2","annotations":{{"big":"{}"}},"hooks":{{"prestart":[{{"path":"/bin/sh","args":["sh","-c","exec sleep 30"],"timeout":1}}]}}}}"#,
            "x".repeat(256 * 1024)
        );
        let s: Spec = serde_json::from_str(&big).expect("spec");
        let started = std::time::Instant::now();
        let err = run("prestart", &create_hooks(&s), &state(&s))
            .await
            .expect_err("times out");
        assert!(matches!(err, HookError::Timeout { .. }), "{err}");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "held for {:?}",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn a_missing_hook_binary_is_named() {
        let s = spec(r#"{"prestart":[{"path":"/nonexistent/hook"}]}"#);
        let err = run("prestart", &create_hooks(&s), &state(&s))
            .await
            .expect_err("missing");
        assert!(err.to_string().contains("/nonexistent/hook"), "{err}");
    }
}
