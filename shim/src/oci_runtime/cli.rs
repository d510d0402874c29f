//! The command line podman and conmon speak to an OCI runtime, parsed as runc (urfave/cli)
//! parses it: global flags, a command, its flags, then its arguments. Flags take one or two
//! dashes and `--flag value` or `--flag=value`; flag parsing stops at the first argument.

use std::path::PathBuf;

/// Where state lives when `--root` is not given. Podman 4.3 calls `state` without the
/// runtime flags the user configured, so this default must be the one in use.
pub const DEFAULT_ROOT: &str = "/run/hako-runtime";

/// The flags every command takes, before the command's name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Global {
    pub root: PathBuf,
    /// Where errors go besides stderr (conmon's `--log`).
    pub log: Option<PathBuf>,
    /// `--log-format json`: one JSON object per message, as runc writes them.
    pub log_json: bool,
    pub debug: bool,
}

impl Default for Global {
    fn default() -> Self {
        Global {
            root: PathBuf::from(DEFAULT_ROOT),
            log: None,
            log_json: false,
            debug: false,
        }
    }
}

/// One command and what it names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Create {
        id: String,
        bundle: PathBuf,
        pid_file: Option<PathBuf>,
        console_socket: Option<PathBuf>,
    },
    Start {
        id: String,
    },
    State {
        id: String,
    },
    Kill {
        id: String,
        signal: u32,
        all: bool,
    },
    Delete {
        id: String,
        force: bool,
    },
    Exec {
        id: String,
        process: PathBuf,
        pid_file: Option<PathBuf>,
        console_socket: Option<PathBuf>,
        tty: bool,
    },
    Pause {
        id: String,
    },
    Resume {
        id: String,
    },
    Update {
        id: String,
        /// A file holding the LinuxResources JSON; `-` for stdin.
        resources: PathBuf,
    },
    Ps {
        id: String,
        json: bool,
    },
    Features,
    Version,
    Help,
    /// Internal: the per-sandbox server `create` starts.
    Server {
        socket: PathBuf,
        log: PathBuf,
    },
    /// Internal: the process conmon waits on for a container's init or one exec.
    Keep {
        socket: PathBuf,
        id: String,
        exec_id: String,
        dir: PathBuf,
    },
}

/// A command line that cannot be run. runc exits 3 for an unknown command and 1 otherwise.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UsageError {
    #[error("No help topic for '{0}'")]
    UnknownCommand(String),
    #[error("flag provided but not defined: {0}")]
    UnknownFlag(String),
    #[error("flag needs an argument: {0}")]
    MissingValue(String),
    #[error("{flag}: {reason}")]
    BadValue { flag: String, reason: String },
    #[error("\"{command}\" requires {wanted}")]
    Arguments {
        command: &'static str,
        wanted: &'static str,
    },
    #[error("{0}")]
    Refused(String),
}

impl UsageError {
    pub fn exit_code(&self) -> i32 {
        match self {
            UsageError::UnknownCommand(_) => 3,
            _ => 1,
        }
    }
}

/// A flag's name without its dashes and its inline value, if `arg` is a flag at all.
fn split_flag(arg: &str) -> Option<(&str, Option<&str>)> {
    let name = arg
        .strip_prefix("--")
        .or_else(|| arg.strip_prefix('-'))
        .filter(|n| !n.is_empty())?;
    Some(match name.split_once('=') {
        Some((n, v)) => (n, Some(v)),
        None => (name, None),
    })
}

/// Walks one level of flags: `on_flag(name, value source)` for each, then the arguments left.
struct Flags<'a> {
    args: &'a [String],
    at: usize,
}

impl<'a> Flags<'a> {
    fn new(args: &'a [String]) -> Self {
        Flags { args, at: 0 }
    }

    /// The next flag, or `None` at the first argument (or `--`).
    fn next_flag(&mut self) -> Option<(&'a str, Option<&'a str>)> {
        let arg = self.args.get(self.at)?;
        if arg == "--" {
            self.at += 1;
            return None;
        }
        let flag = split_flag(arg)?;
        self.at += 1;
        Some(flag)
    }

    /// The value of a flag that takes one: inline, or the next argument.
    fn value(&mut self, name: &str, inline: Option<&'a str>) -> Result<&'a str, UsageError> {
        if let Some(v) = inline {
            return Ok(v);
        }
        let v = self
            .args
            .get(self.at)
            .ok_or_else(|| UsageError::MissingValue(format!("-{name}")))?;
        self.at += 1;
        Ok(v)
    }

    fn rest(&self) -> &'a [String] {
        &self.args[self.at..]
    }
}

/// A boolean flag's value: bare means true; `=false` is allowed, as urfave takes it.
fn boolean(name: &str, inline: Option<&str>) -> Result<bool, UsageError> {
    match inline {
        None | Some("true") | Some("1") => Ok(true),
        Some("false") | Some("0") => Ok(false),
        Some(other) => Err(UsageError::BadValue {
            flag: format!("-{name}"),
            reason: format!("invalid boolean value {other:?}"),
        }),
    }
}

/// Parses a whole command line (without the program's name).
pub fn parse(args: &[String]) -> Result<(Global, Command), UsageError> {
    let mut global = Global::default();
    let mut flags = Flags::new(args);
    while let Some((name, inline)) = flags.next_flag() {
        match name {
            "root" => global.root = PathBuf::from(flags.value(name, inline)?),
            "log" => global.log = Some(PathBuf::from(flags.value(name, inline)?)),
            "log-format" => {
                global.log_json = match flags.value(name, inline)? {
                    "json" => true,
                    "text" => false,
                    other => {
                        return Err(UsageError::BadValue {
                            flag: "-log-format".to_string(),
                            reason: format!("unknown log format {other:?}"),
                        })
                    }
                }
            }
            "debug" => global.debug = boolean(name, inline)?,
            // conmon adds it for create when podman uses systemd; hako places the VM's cgroup
            // from the spec's cgroupsPath in either form.
            "systemd-cgroup" => {
                boolean(name, inline)?;
            }
            "rootless" => {
                let value = inline.unwrap_or("auto");
                if value == "true" {
                    return Err(UsageError::Refused(ROOTLESS.to_string()));
                }
            }
            "version" | "v" => return Ok((global, Command::Version)),
            "help" | "h" => return Ok((global, Command::Help)),
            _ => return Err(UsageError::UnknownFlag(format!("-{name}"))),
        }
    }
    if global.root.as_os_str().is_empty() || !global.root.is_absolute() {
        return Err(UsageError::BadValue {
            flag: "-root".to_string(),
            reason: "must be an absolute path".to_string(),
        });
    }
    let rest = flags.rest();
    let Some((name, args)) = rest.split_first() else {
        return Ok((global, Command::Help));
    };
    let command = parse_command(name, args)?;
    Ok((global, command))
}

/// Why rootless use is refused, in one sentence.
pub const ROOTLESS: &str =
    "hako-runtime runs each container in a VM and needs root: rootless podman is not supported";

fn parse_command(name: &str, args: &[String]) -> Result<Command, UsageError> {
    let mut flags = Flags::new(args);
    let mut bundle = None;
    let mut pid_file = None;
    let mut console_socket = None;
    let mut process = None;
    let mut resources = None;
    let mut socket = None;
    let mut log = None;
    let mut dir = None;
    let mut exec_id = String::new();
    let mut all = false;
    let mut force = false;
    let mut tty = false;
    let mut json = false;
    while let Some((flag, inline)) = flags.next_flag() {
        match (name, flag) {
            ("create", "bundle" | "b") => bundle = Some(flags.value(flag, inline)?),
            ("create" | "exec", "pid-file") => pid_file = Some(flags.value(flag, inline)?),
            ("create" | "exec", "console-socket") => {
                console_socket = Some(flags.value(flag, inline)?)
            }
            ("create" | "exec", "preserve-fds") => {
                let n = flags.value(flag, inline)?;
                if n != "0" {
                    return Err(UsageError::Refused(format!(
                        "--preserve-fds {n}: a VM cannot take the host's file descriptors"
                    )));
                }
            }
            // Keyrings and pivot_root are the guest's business: the guest always pivots and
            // gives each container a keyring of its own.
            ("create", "no-pivot" | "no-new-keyring") => {
                boolean(flag, inline)?;
            }
            ("exec", "process" | "p") => process = Some(flags.value(flag, inline)?),
            ("exec", "detach" | "d") => {
                if !boolean(flag, inline)? {
                    return Err(UsageError::Refused(
                        "exec runs detached only: its pid file names the process to wait on"
                            .to_string(),
                    ));
                }
            }
            ("exec", "tty" | "t") => tty = boolean(flag, inline)?,
            ("kill", "all" | "a") => all = boolean(flag, inline)?,
            ("delete", "force" | "f") => force = boolean(flag, inline)?,
            ("update", "resources" | "r") => resources = Some(flags.value(flag, inline)?),
            ("ps", "format" | "f") => {
                json = match flags.value(flag, inline)? {
                    "json" => true,
                    "table" => false,
                    other => {
                        return Err(UsageError::BadValue {
                            flag: "-format".to_string(),
                            reason: format!("unknown format {other:?}"),
                        })
                    }
                }
            }
            ("__server", "socket") | ("__keep", "socket") => {
                socket = Some(flags.value(flag, inline)?)
            }
            ("__server", "log") => log = Some(flags.value(flag, inline)?),
            ("__keep", "dir") => dir = Some(flags.value(flag, inline)?),
            ("__keep", "exec") => exec_id = flags.value(flag, inline)?.to_string(),
            _ if KNOWN.contains(&name) => return Err(UsageError::UnknownFlag(format!("-{flag}"))),
            _ => return Err(UsageError::UnknownCommand(name.to_string())),
        }
    }
    let rest = flags.rest();
    let id = |command: &'static str| -> Result<String, UsageError> {
        match rest {
            [id] => Ok(id.clone()),
            _ => Err(UsageError::Arguments {
                command,
                wanted: "exactly 1 argument(s)",
            }),
        }
    };
    let path = |value: Option<&str>, flag: &str| -> Result<PathBuf, UsageError> {
        value
            .map(PathBuf::from)
            .ok_or_else(|| UsageError::MissingValue(format!("-{flag}")))
    };
    Ok(match name {
        "create" => Command::Create {
            id: id("create")?,
            // runc's default bundle is the working directory.
            bundle: bundle
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(".")),
            pid_file: pid_file.map(PathBuf::from),
            console_socket: console_socket.map(PathBuf::from),
        },
        "start" => Command::Start { id: id("start")? },
        "state" => Command::State { id: id("state")? },
        "kill" => {
            let (id, signal) = match rest {
                [id] => (id.clone(), 15),
                [id, signal] => (id.clone(), parse_signal(signal)?),
                _ => {
                    return Err(UsageError::Arguments {
                        command: "kill",
                        wanted: "a minimum of 1 and a maximum of 2 argument(s)",
                    })
                }
            };
            Command::Kill { id, signal, all }
        }
        "delete" => Command::Delete {
            id: id("delete")?,
            force,
        },
        "exec" => Command::Exec {
            id: id("exec")?,
            process: path(process, "process").map_err(|_| {
                UsageError::Refused(
                    "exec needs --process: a command line after the id is not supported"
                        .to_string(),
                )
            })?,
            pid_file: pid_file.map(PathBuf::from),
            console_socket: console_socket.map(PathBuf::from),
            tty,
        },
        "pause" => Command::Pause { id: id("pause")? },
        "resume" => Command::Resume { id: id("resume")? },
        "update" => Command::Update {
            id: id("update")?,
            resources: path(resources, "resources")?,
        },
        "ps" => Command::Ps {
            id: id("ps")?,
            json,
        },
        "features" => Command::Features,
        "__server" => Command::Server {
            socket: path(socket, "socket")?,
            log: path(log, "log")?,
        },
        "__keep" => Command::Keep {
            socket: path(socket, "socket")?,
            id: id("__keep")?,
            exec_id,
            dir: path(dir, "dir")?,
        },
        "help" => Command::Help,
        _ => return Err(UsageError::UnknownCommand(name.to_string())),
    })
}

/// The commands this parser knows (an unknown flag on one of them is a flag error).
const KNOWN: [&str; 14] = [
    "create", "start", "state", "kill", "delete", "exec", "pause", "resume", "update", "ps",
    "features", "help", "__server", "__keep",
];

/// A signal as runc takes it: a number, or a name with or without `SIG`, in any case.
pub fn parse_signal(text: &str) -> Result<u32, UsageError> {
    let bad = || UsageError::BadValue {
        flag: "signal".to_string(),
        reason: format!("unknown signal {text:?}"),
    };
    if let Ok(n) = text.parse::<u32>() {
        return (1..=64).contains(&n).then_some(n).ok_or_else(bad);
    }
    let upper = text.to_ascii_uppercase();
    let name = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    name.parse::<nix::sys::signal::Signal>()
        .map(|s| s as u32)
        .map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(line: &str) -> Vec<String> {
        line.split_whitespace().map(str::to_string).collect()
    }

    fn ok(line: &str) -> (Global, Command) {
        parse(&args(line)).unwrap_or_else(|e| panic!("{line}: {e}"))
    }

    #[test]
    fn conmons_create_with_podmans_global_flags() {
        let (g, c) = ok(
            "--systemd-cgroup --log-format=json --log /run/x/oci-log create \
             --bundle /b --pid-file /run/x/pidfile --no-pivot --no-new-keyring \
             --preserve-fds 0 --console-socket /tmp/c.sock abc",
        );
        assert_eq!(g.log, Some(PathBuf::from("/run/x/oci-log")));
        assert!(g.log_json);
        assert_eq!(g.root, PathBuf::from(DEFAULT_ROOT));
        assert_eq!(
            c,
            Command::Create {
                id: "abc".into(),
                bundle: "/b".into(),
                pid_file: Some("/run/x/pidfile".into()),
                console_socket: Some("/tmp/c.sock".into()),
            }
        );
    }

    #[test]
    fn conmons_exec_in_both_generations() {
        // conmon 2.1.6 passes --tty; 2.1.11 and later do not.
        for line in [
            "exec --pid-file /e/exec_pid --process /e/p.json --detach --tty \
             --console-socket /tmp/s abc",
            "--root=/r exec -pid-file=/e/exec_pid -process /e/p.json -d abc",
        ] {
            let (_, c) = ok(line);
            let Command::Exec {
                id,
                process,
                pid_file,
                ..
            } = c
            else {
                panic!("{line}: {c:?}")
            };
            assert_eq!(id, "abc");
            assert_eq!(process, PathBuf::from("/e/p.json"));
            assert_eq!(pid_file, Some(PathBuf::from("/e/exec_pid")));
        }
    }

    #[test]
    fn podmans_direct_calls() {
        assert_eq!(
            ok("kill abc 9").1,
            Command::Kill {
                id: "abc".into(),
                signal: 9,
                all: false
            }
        );
        assert_eq!(
            ok("kill --all abc SIGUSR1").1,
            Command::Kill {
                id: "abc".into(),
                signal: 10,
                all: true
            }
        );
        assert_eq!(
            ok("kill abc").1,
            Command::Kill {
                id: "abc".into(),
                signal: 15,
                all: false
            }
        );
        assert_eq!(
            ok("delete --force abc").1,
            Command::Delete {
                id: "abc".into(),
                force: true
            }
        );
        assert_eq!(
            ok("update --resources=/tmp/podman123 abc").1,
            Command::Update {
                id: "abc".into(),
                resources: "/tmp/podman123".into()
            }
        );
        assert_eq!(ok("state abc").1, Command::State { id: "abc".into() });
        assert_eq!(ok("--version").1, Command::Version);
        assert_eq!(
            ok("ps --format json abc").1,
            Command::Ps {
                id: "abc".into(),
                json: true
            }
        );
    }

    #[test]
    fn errors_are_runcs() {
        let err = |line: &str| parse(&args(line)).expect_err(line);
        // podman probes checkpoint support with `checkpoint --help`: it must fail.
        let e = err("checkpoint --help");
        assert_eq!(e, UsageError::UnknownCommand("checkpoint".into()));
        assert_eq!(e.exit_code(), 3);
        assert_eq!(e.to_string(), "No help topic for 'checkpoint'");
        assert_eq!(
            err("--bogus state x"),
            UsageError::UnknownFlag("-bogus".into())
        );
        assert_eq!(err("state --bogus x").exit_code(), 1);
        assert_eq!(
            err("state").to_string(),
            "\"state\" requires exactly 1 argument(s)"
        );
        assert!(matches!(
            err("kill abc NOSUCH"),
            UsageError::BadValue { .. }
        ));
        assert!(matches!(err("kill abc 65"), UsageError::BadValue { .. }));
        assert!(matches!(err("--root"), UsageError::MissingValue(_)));
        assert!(matches!(
            err("--root relative state x"),
            UsageError::BadValue { .. }
        ));
        assert!(matches!(
            err("create --preserve-fds 2 x"),
            UsageError::Refused(_)
        ));
        assert!(matches!(
            err("--rootless=true state x"),
            UsageError::Refused(_)
        ));
        assert!(matches!(
            err("exec --pid-file p x sh"),
            UsageError::Arguments { .. }
        ));
    }

    #[test]
    fn signals_by_number_and_name() {
        assert_eq!(parse_signal("9"), Ok(9));
        assert_eq!(parse_signal("KILL"), Ok(9));
        assert_eq!(parse_signal("sigterm"), Ok(15));
        assert_eq!(parse_signal("SIGWINCH"), Ok(28));
        assert!(parse_signal("0").is_err());
        assert!(parse_signal("").is_err());
    }
}
