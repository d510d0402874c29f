//! A container's spec on its way to the guest, and the one case where its size is not hako's
//! problem: arguments and environment so large that the guest kernel's exec would refuse them
//! (E2BIG) anyway. runc creates such a container and its process fails at exec; hako must do the
//! same, though the spec may be too large for the agent channel (`MAX_GUEST_SPEC`). Then the
//! guest gets a stand-in process the kernel refuses just as surely (`stand_in`), so the process
//! fails at exec in the guest exactly as the real one would. A spec the kernel would accept but
//! the channel cannot carry is refused at create, naming both sizes: the one thing hako cannot do
//! as runc does.
//!
//! The limits are the guest kernel's (fs/exec.c; the guest is x86-64 with 4 KiB pages). Every
//! size here comes from a tenant's spec, already bounded by the bundle's config.json; nothing
//! here makes more of it than a second copy of the process cut down to a few strings.

use oci_spec::runtime::{PosixRlimitType, Process, Spec};

use super::pod::MAX_GUEST_SPEC;
use super::spec::check_env;
use super::SandboxError;

/// The longest one argument or environment string may be, its NUL included: MAX_ARG_STRLEN,
/// 32 pages.
pub const MAX_ARG_STRLEN: u64 = 32 * 4096;
/// The least room exec gives the strings and their pointers, whatever the stack limit: ARG_MAX,
/// 32 pages.
const ARG_MAX: u64 = 32 * 4096;
/// The most room: three quarters of _STK_LIM.
const MOST: u64 = 6 << 20;
/// A guest process's stack soft limit when its spec sets none: _STK_LIM, the kernel's default,
/// which the agent and everything it starts keep.
pub const DEFAULT_STACK: u64 = 8 << 20;
const POINTER: u64 = 8;
/// The environment entry of the stand-in process: one byte longer than MAX_ARG_STRLEN allows
/// with its NUL, which exec refuses whatever else it is given.
const REFUSED_NAME: &str = "HAKO_REFUSED_AS_TOO_LONG=";

/// How much room exec gives the strings and their pointers under a stack soft limit
/// (`bprm_stack_limits`): a quarter of the stack, at most 6 MiB, at least ARG_MAX.
pub fn exec_room(stack_soft: u64) -> u64 {
    (stack_soft / 4).clamp(ARG_MAX, MOST)
}

/// The process's stack soft limit in the guest: the last RLIMIT_STACK of its spec (the agent
/// sets them in order), else the guest's default.
fn stack_soft(process: &Process) -> u64 {
    process
        .rlimits()
        .iter()
        .flatten()
        .rfind(|r| r.typ() == PosixRlimitType::RlimitStack)
        .map_or(DEFAULT_STACK, |r| r.soft())
}

/// What exec of `process` would have to fit: its strings with their NULs and pointers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExecSize {
    /// The strings and their pointers, in bytes.
    pub bytes: u64,
    /// The longest string with its NUL.
    pub longest: u64,
    /// The room exec gives them.
    pub room: u64,
}

impl ExecSize {
    pub fn of(process: &Process) -> Self {
        let args = process.args().as_deref().unwrap_or_default();
        let env = process.env().as_deref().unwrap_or_default();
        let lengths = args.iter().chain(env).map(|s| s.len() as u64 + 1);
        let (strings, longest) = lengths.fold((0u64, 0u64), |(sum, longest), len| {
            (sum.saturating_add(len), longest.max(len))
        });
        // Exec counts argv as one pointer at least (it adds an empty argument to none).
        let pointers = (args.len().max(1) as u64 + env.len() as u64).saturating_mul(POINTER);
        Self {
            bytes: strings.saturating_add(pointers),
            longest,
            room: exec_room(stack_soft(process)),
        }
    }

    /// Whether exec refuses these strings (E2BIG) whatever program path they run and whatever
    /// the agent adds (a `HOME`): both only add to them.
    pub fn refused(&self) -> bool {
        self.longest > MAX_ARG_STRLEN || self.bytes > self.room
    }
}

/// Whether the agent would take this process's strings as they are: a string with a NUL, or an
/// environment entry that is not KEY=VALUE, fails Create in the guest (as under runc), which a
/// stand-in must not turn into a failed exec.
fn well_formed(process: &Process) -> bool {
    let args = process.args().as_deref().unwrap_or_default();
    let env = process.env().as_deref().unwrap_or_default();
    !args.is_empty() && args.iter().all(|a| !a.contains('\0')) && check_env(env).is_ok()
}

/// A process exec refuses as surely as `process`, small enough for the channel: its command
/// alone (the agent resolves it, as runc does, before exec fails: a missing one fails Create
/// either way), the `PATH` it is resolved in, and one environment entry too long for exec. Its
/// cut-down arguments and environment cannot matter: the process never runs.
fn stand_in(process: &Process) -> Process {
    let args = process.args().as_deref().unwrap_or_default();
    let env = process.env().as_deref().unwrap_or_default();
    let mut small = process.clone();
    small.set_args(Some(args.iter().take(1).cloned().collect()));
    // The agent looks the command up in the first PATH, as it would in the real environment.
    let mut kept: Vec<String> = env
        .iter()
        .find(|e| e.starts_with("PATH="))
        .cloned()
        .into_iter()
        .collect();
    let filler = MAX_ARG_STRLEN as usize - REFUSED_NAME.len();
    kept.push(format!("{REFUSED_NAME}{}", "x".repeat(filler)));
    small.set_env(Some(kept));
    small
}

fn encode(spec: &Spec) -> Result<Vec<u8>, SandboxError> {
    serde_json::to_vec(spec)
        .map_err(|e| SandboxError::SpecTooLarge(format!("cannot encode it: {e}")))
}

/// The spec as the guest gets it: as it is when the channel carries it; with a stand-in process
/// when only a process exec would refuse makes it too large; else refused.
pub fn guest_spec_json(spec: &mut Spec) -> Result<Vec<u8>, SandboxError> {
    let json = encode(spec)?;
    if json.len() <= MAX_GUEST_SPEC {
        return Ok(json);
    }
    let too_large = |extra: String| {
        SandboxError::SpecTooLarge(format!(
            "it is {} bytes; hako passes at most {MAX_GUEST_SPEC} bytes to the guest{extra}",
            json.len()
        ))
    };
    let Some(process) = spec.process().as_ref() else {
        return Err(too_large(String::new()));
    };
    let size = ExecSize::of(process);
    if !size.refused() || !well_formed(process) {
        return Err(too_large(format!(
            ", and its process's arguments and environment ({} bytes with their pointers, the \
             longest string {} bytes) are within what the guest kernel's exec accepts ({} bytes \
             under its stack limit, {MAX_ARG_STRLEN} for one string), so they must reach it (is \
             the environment or the set of annotations that large on purpose?)",
            size.bytes, size.longest, size.room
        )));
    }
    let small = stand_in(process);
    spec.set_process(Some(small));
    let json = encode(spec)?;
    if json.len() > MAX_GUEST_SPEC {
        return Err(too_large(format!(
            " even without its process's arguments and environment ({} bytes, which exec would \
             refuse anyway)",
            size.bytes
        )));
    }
    Ok(json)
}

#[cfg(test)]
mod tests {
    use super::*;
    use oci_spec::runtime::{PosixRlimitBuilder, ProcessBuilder, SpecBuilder};
    use std::os::unix::process::CommandExt;

    fn process(args: &[&str], env: Vec<String>) -> Process {
        ProcessBuilder::default()
            .args(args.iter().map(|a| a.to_string()).collect::<Vec<_>>())
            .env(env)
            .build()
            .expect("process")
    }

    fn with_stack(mut p: Process, softs: &[u64]) -> Process {
        let rlimits = softs
            .iter()
            .map(|soft| {
                PosixRlimitBuilder::default()
                    .typ(PosixRlimitType::RlimitStack)
                    .soft(*soft)
                    .hard(u64::MAX)
                    .build()
                    .expect("rlimit")
            })
            .collect::<Vec<_>>();
        p.set_rlimits(Some(rlimits));
        p
    }

    /// An environment whose strings take exactly `bytes` with their NULs, in entries exec takes
    /// one by one, and how many entries that is.
    fn env_of(bytes: u64) -> Vec<String> {
        let mut env = Vec::new();
        let mut left = bytes;
        while left > 0 {
            // Distinct keys: an environment keeps one entry a key.
            let key = format!("E{}", env.len());
            let len = left.min(100_000).max(key.len() as u64 + 2);
            let value = "v".repeat(len as usize - key.len() - 2);
            env.push(format!("{key}={value}"));
            left -= len;
        }
        env
    }

    /// `args` and an environment whose size as exec counts it is `bytes` (at least a few KiB).
    fn sized(args: &[&str], bytes: u64) -> Process {
        let arg_bytes: u64 = args.iter().map(|a| a.len() as u64 + 1).sum();
        // Entries first with a guess at their count, then the exact strings for that count.
        let guess = env_of(bytes).len() as u64;
        let pointers = (args.len() as u64 + guess) * POINTER;
        let env = env_of(bytes - arg_bytes - pointers);
        assert_eq!(env.len() as u64, guess, "the count settles");
        let p = process(args, env);
        assert_eq!(ExecSize::of(&p).bytes, bytes);
        p
    }

    #[test]
    fn exec_room_follows_the_stack_limit_within_its_bounds() {
        assert_eq!(exec_room(DEFAULT_STACK), 2 << 20);
        assert_eq!(exec_room(0), ARG_MAX, "never below ARG_MAX");
        assert_eq!(exec_room(4 * ARG_MAX - 4), ARG_MAX);
        assert_eq!(exec_room(4 * ARG_MAX + 4), ARG_MAX + 1);
        assert_eq!(exec_room(24 << 20), 6 << 20);
        assert_eq!(exec_room(u64::MAX), 6 << 20, "unlimited");
    }

    #[test]
    fn the_total_decides_at_the_byte() {
        let room = exec_room(DEFAULT_STACK);
        assert!(!ExecSize::of(&sized(&["sh", "-c", "x"], room)).refused());
        assert!(ExecSize::of(&sized(&["sh", "-c", "x"], room + 1)).refused());
    }

    #[test]
    fn one_string_decides_at_the_byte() {
        let entry = |len: u64| format!("K={}", "v".repeat(len as usize - 3));
        // `len` with its NUL.
        let p = process(&["sh"], vec![entry(MAX_ARG_STRLEN)]);
        assert_eq!(ExecSize::of(&p).longest, MAX_ARG_STRLEN);
        assert!(!ExecSize::of(&p).refused());
        let p = process(&["sh"], vec![entry(MAX_ARG_STRLEN + 1)]);
        assert!(ExecSize::of(&p).refused());
        let p = process(&["sh", &"a".repeat(MAX_ARG_STRLEN as usize)], Vec::new());
        assert!(ExecSize::of(&p).refused(), "an argument too");
    }

    #[test]
    fn the_specs_last_stack_limit_sets_the_room() {
        let p = sized(&["sh"], 3 << 20);
        assert!(
            ExecSize::of(&p).refused(),
            "over 2 MiB under the default 8 MiB stack"
        );
        let big = with_stack(p.clone(), &[64 << 20]);
        assert_eq!(ExecSize::of(&big).room, 6 << 20);
        assert!(!ExecSize::of(&big).refused());
        let last_small = with_stack(p, &[64 << 20, 8 << 20]);
        assert!(ExecSize::of(&last_small).refused());
    }

    #[test]
    fn pointers_count_even_for_empty_strings() {
        // 2 MiB of pointers alone, with one-byte strings: 16 bytes an entry with its NUL...
        let env = vec!["K=".to_string(); (2 << 20) / 11 + 1];
        assert!(ExecSize::of(&process(&["sh"], env)).refused());
    }

    /// The model against a real kernel's exec (this host's, which counts as the guest's does):
    /// at the room, less the program's own path, exec runs; a byte more is E2BIG; and the
    /// stand-in is always E2BIG.
    #[test]
    fn a_real_exec_agrees() {
        let exec = |p: &Process| {
            let args = p.args().clone().unwrap_or_default();
            let mut cmd = std::process::Command::new(&args[0]);
            cmd.args(&args[1..]).env_clear();
            for entry in p.env().iter().flatten() {
                let (key, value) = entry.split_once('=').expect("KEY=VALUE");
                cmd.env(key, value);
            }
            let stack = libc::rlimit {
                rlim_cur: DEFAULT_STACK,
                rlim_max: libc::RLIM_INFINITY,
            };
            // SAFETY: setrlimit is async-signal-safe and reads only the struct, copied in.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::setrlimit(libc::RLIMIT_STACK, &stack) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
            cmd.stdout(std::process::Stdio::null());
            cmd.status().map_err(|e| e.raw_os_error())
        };
        let program = "/bin/true";
        let room = exec_room(DEFAULT_STACK) - (program.len() as u64 + 1);
        let fits = sized(&[program], room);
        assert!(exec(&fits).is_ok_and(|s| s.success()), "{:?}", exec(&fits));
        let over = sized(&[program], room + 1);
        assert_eq!(exec(&over).err(), Some(Some(libc::E2BIG)));

        // One string: MAX_ARG_STRLEN with its NUL is taken, a byte more is not.
        let entry = |len: u64| vec![format!("K={}", "v".repeat(len as usize - 3))];
        let longest = process(&[program], entry(MAX_ARG_STRLEN));
        assert!(exec(&longest).is_ok_and(|s| s.success()));
        assert!(!ExecSize::of(&longest).refused());
        let too_long = process(&[program], entry(MAX_ARG_STRLEN + 1));
        assert_eq!(exec(&too_long).err(), Some(Some(libc::E2BIG)));
        assert!(ExecSize::of(&too_long).refused());

        let small = stand_in(&process(&[program], vec!["PATH=/bin".into()]));
        assert!(ExecSize::of(&small).refused());
        assert_eq!(exec(&small).err(), Some(Some(libc::E2BIG)));
    }

    fn spec_with(process: Process) -> Spec {
        let mut spec = SpecBuilder::default().build().expect("spec");
        spec.set_process(Some(process));
        spec
    }

    #[test]
    fn a_spec_the_channel_carries_goes_as_it_is() {
        let p = sized(&["sh"], 3 << 20);
        let mut spec = spec_with(p.clone());
        let json = guest_spec_json(&mut spec).expect("carried");
        let sent: Spec = serde_json::from_slice(&json).expect("json");
        assert_eq!(
            sent.process().as_ref(),
            Some(&p),
            "refused by exec, but the guest's to find"
        );
    }

    #[test]
    fn an_environment_exec_refuses_gets_a_stand_in_that_fits() {
        let mut env = vec!["HOME=/root".to_string(), "PATH=/usr/bin:/bin".to_string()];
        env.extend(env_of(5 << 20));
        env.push("PATH=/second".to_string());
        let mut spec = spec_with(process(&["sh", "-c", "true"], env));
        let json = guest_spec_json(&mut spec).expect("a stand-in");
        assert!(json.len() <= MAX_GUEST_SPEC);
        let sent: Spec = serde_json::from_slice(&json).expect("json");
        let sent = sent.process().clone().expect("process");
        assert_eq!(sent.args().as_deref(), Some(&["sh".to_string()][..]));
        let env = sent.env().clone().unwrap_or_default();
        assert_eq!(
            env[0], "PATH=/usr/bin:/bin",
            "the PATH the command is found in"
        );
        assert_eq!(env.len(), 2);
        assert!(ExecSize::of(&sent).refused());
    }

    #[test]
    fn what_exec_would_take_but_the_channel_cannot_carry_is_refused_with_both_sizes() {
        let p = with_stack(sized(&["sh"], 5 << 20), &[u64::MAX]);
        let err = guest_spec_json(&mut spec_with(p)).expect_err("too large");
        let text = err.to_string();
        assert!(
            text.contains(&format!("at most {MAX_GUEST_SPEC} bytes")),
            "{text}"
        );
        assert!(
            text.contains(&format!("({} bytes under its stack limit", 6 << 20)),
            "{text}"
        );
        assert!(text.contains(&format!("({} bytes with", 5 << 20)), "{text}");
    }

    #[test]
    fn a_malformed_environment_is_not_turned_into_a_failed_exec() {
        let mut env = env_of(5 << 20);
        env.push("NOEQUALS".to_string());
        let err = guest_spec_json(&mut spec_with(process(&["sh"], env))).expect_err("refused");
        assert!(err.to_string().contains("within what"), "{err}");
    }

    #[test]
    fn what_else_makes_a_spec_too_large_is_refused() {
        let mut spec = spec_with(sized(&["sh"], 3 << 20));
        let mut annotations = std::collections::HashMap::new();
        annotations.insert("big".to_string(), "a".repeat(MAX_GUEST_SPEC));
        spec.set_annotations(Some(annotations));
        let err = guest_spec_json(&mut spec).expect_err("too large");
        assert!(err.to_string().contains("even without"), "{err}");
    }
}
