//! ListProcesses, for `hako ps`: a container's processes as the guest lists them. The answer is
//! a hostile guest's, so it is decoded here by hand rather than by the generated client: no
//! more than `MAX_LISTED_PROCESSES` entries are kept whatever the message holds, no string is
//! allocated past its cap whatever length it declares, and what reaches a terminal is escaped.

use std::collections::HashMap;
use std::time::Duration;

use hako_protocol as pb;
use protobuf::rt::WireType;
use protobuf::CodedInputStream;

use super::{AgentError, TtrpcAgent};

const CALL: &str = "ListProcesses";
const SERVICE: &str = "hako.agent.v1.AgentService";

/// One process of a container, as the guest sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestProcess {
    /// In the container's PID namespace: what `ps` run in the container shows.
    pub pid: u32,
    /// The parent's, in the container's namespace; 0 for a parent outside the container, as
    /// `ps` in the container shows its init's.
    pub ppid: u32,
    /// In the guest's PID namespace, the agent's (its log names processes by these).
    pub guest_pid: u32,
    /// Effective uid, in the guest.
    pub uid: u32,
    /// The state letter of /proc/PID/stat, `?` for anything else.
    pub state: char,
    pub cpu: Duration,
    /// The arguments joined by spaces, escaped; `[name]` for a process without any (a zombie).
    pub command: String,
}

/// A container's processes, by guest pid.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ProcessList {
    pub processes: Vec<GuestProcess>,
    /// The container has more processes than listed.
    pub truncated: bool,
}

impl TtrpcAgent {
    /// The processes of `container_id`, bounded and escaped (`decode`).
    pub async fn list_processes(&self, container_id: &str) -> Result<ProcessList, AgentError> {
        use protobuf::Message;
        let req = pb::ListProcessesRequest {
            container_id: container_id.to_string(),
            ..Default::default()
        };
        let payload = req.write_to_bytes().map_err(|e| AgentError::Malformed {
            call: CALL,
            reason: format!("encoding the request: {e}"),
        })?;
        let request = ttrpc::Request {
            service: SERVICE.to_string(),
            method: CALL.to_string(),
            timeout_nano: self.call_timeout.as_nanos() as i64,
            payload,
            ..Default::default()
        };
        // ttrpc refuses a message over 4 MiB before reading it: the payload is at most that.
        let response = self.timed(CALL, self.raw.request(request)).await?;
        decode(&response.payload).map_err(|e| AgentError::Malformed {
            call: CALL,
            reason: e.to_string(),
        })
    }
}

/// A ListProcesses answer, entry by entry: entries past `MAX_LISTED_PROCESSES` are skipped
/// unread (and the list marked truncated), unknown fields too; a field of the wrong type
/// refuses the whole answer.
pub fn decode(payload: &[u8]) -> protobuf::Result<ProcessList> {
    let mut raw: Vec<pb::GuestProcess> = Vec::new();
    let mut truncated = false;
    let mut is = CodedInputStream::from_bytes(payload);
    while let Some(tag) = is.read_raw_tag_or_eof()? {
        let (field, wire) = unpack(tag)?;
        match (field, wire) {
            (2, WireType::LengthDelimited) if raw.len() < pb::MAX_LISTED_PROCESSES => {
                raw.push(decode_process(&mut is)?);
            }
            (2, WireType::LengthDelimited) => {
                truncated = true;
                is.skip_field(wire)?;
            }
            (3, WireType::Varint) => truncated |= is.read_bool()?,
            (2 | 3, _) => return Err(wrong_type(field)),
            _ => is.skip_field(wire)?,
        }
    }
    Ok(ProcessList::from_guest(raw, truncated))
}

/// One `GuestProcess`, its strings cut at their caps as they are read.
fn decode_process(is: &mut CodedInputStream<'_>) -> protobuf::Result<pb::GuestProcess> {
    let len = is.read_raw_varint32()?;
    let end = is.pos() + u64::from(len);
    let outer = is.push_limit(u64::from(len))?;
    let mut p = pb::GuestProcess::default();
    while !is.eof()? {
        let tag = is.read_raw_tag_or_eof()?.unwrap_or_default();
        let (field, wire) = unpack(tag)?;
        match (field, wire) {
            (1, WireType::Varint) => p.pid = is.read_uint32()?,
            (2, WireType::Varint) => p.ppid = is.read_uint32()?,
            (3, WireType::Varint) => p.ns_pid = is.read_uint32()?,
            (4, WireType::Varint) => p.uid = is.read_uint32()?,
            (5, WireType::LengthDelimited) => p.state = lossy(read_capped(is, 4)?),
            (6, WireType::Varint) => p.cpu_ms = is.read_uint64()?,
            (7, WireType::LengthDelimited) => p.comm = lossy(read_capped(is, pb::MAX_COMM)?),
            (8, WireType::LengthDelimited) => p.cmdline = read_capped(is, pb::MAX_CMDLINE)?,
            (1..=8, _) => return Err(wrong_type(field)),
            _ => is.skip_field(wire)?,
        }
    }
    // A slice's end reads as the limit's: an entry that claims more than the answer holds.
    if is.pos() != end {
        return Err(malformed("an entry longer than the answer"));
    }
    is.pop_limit(outer);
    Ok(p)
}

/// A length-delimited field's first `cap` bytes; the rest is skipped unread.
fn read_capped(is: &mut CodedInputStream<'_>, cap: usize) -> protobuf::Result<Vec<u8>> {
    let len = is.read_raw_varint32()?;
    let keep = len.min(u32::try_from(cap).unwrap_or(u32::MAX));
    let bytes = is.read_raw_bytes(keep)?;
    is.skip_raw_bytes(len - keep)?;
    Ok(bytes)
}

fn unpack(tag: u32) -> protobuf::Result<(u32, WireType)> {
    let wire = WireType::new(tag & 7).ok_or_else(|| malformed("an unknown wire type"))?;
    Ok((tag >> 3, wire))
}

fn wrong_type(field: u32) -> protobuf::Error {
    malformed(&format!("field {field} has the wrong wire type"))
}

fn malformed(what: &str) -> protobuf::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string()).into()
}

fn lossy(bytes: Vec<u8>) -> String {
    String::from_utf8_lossy(&bytes).into_owned()
}

/// For a table cell: escaped as `logs::escape` does, and newlines and tabs too.
fn cell(bytes: &[u8]) -> String {
    crate::logs::escape(bytes)
        .replace('\n', "\\x0a")
        .replace('\t', "\\x09")
}

impl ProcessList {
    /// The guest's entries (already cut to their caps) made into what can be shown: the
    /// parent in the container's namespace, the state checked, the command escaped.
    fn from_guest(mut raw: Vec<pb::GuestProcess>, truncated: bool) -> Self {
        raw.sort_by_key(|p| p.pid);
        let in_container: HashMap<u32, u32> = raw.iter().map(|p| (p.pid, p.ns_pid)).collect();
        let processes = raw
            .into_iter()
            .map(|p| {
                let mut state = p.state.chars();
                let state = match (state.next(), state.next()) {
                    (Some(c), None) if c.is_ascii_alphabetic() => c,
                    _ => '?',
                };
                let args: Vec<&[u8]> = p
                    .cmdline
                    .split(|&b| b == 0)
                    .filter(|a| !a.is_empty())
                    .collect();
                let command = if args.is_empty() {
                    format!("[{}]", cell(p.comm.as_bytes()))
                } else {
                    cell(&args.join(&b' '))
                };
                GuestProcess {
                    pid: p.ns_pid,
                    ppid: in_container.get(&p.ppid).copied().unwrap_or(0),
                    guest_pid: p.pid,
                    uid: p.uid,
                    state,
                    cpu: Duration::from_millis(p.cpu_ms),
                    command,
                }
            })
            .collect();
        Self {
            processes,
            truncated,
        }
    }

    /// A table as `ps -o pid,ppid,uid,stat,time,args` prints, with the guest pid beside.
    pub fn table(&self) -> String {
        let mut out = format!(
            "{:<7} {:<7} {:<9} {:<7} {:<4} {:<9} CMD\n",
            "PID", "PPID", "GUEST PID", "UID", "STAT", "TIME"
        );
        for p in &self.processes {
            out.push_str(&format!(
                "{:<7} {:<7} {:<9} {:<7} {:<4} {:<9} {}\n",
                p.pid,
                p.ppid,
                p.guest_pid,
                p.uid,
                p.state,
                cpu_time(p.cpu),
                p.command
            ));
        }
        out
    }
}

/// `[DD-]HH:MM:SS`, as ps shows CPU time.
fn cpu_time(cpu: Duration) -> String {
    let s = cpu.as_secs();
    let (days, h, m, s) = (s / 86_400, s / 3600 % 24, s / 60 % 60, s % 60);
    if days > 0 {
        format!("{days}-{h:02}:{m:02}:{s:02}")
    } else {
        format!("{h:02}:{m:02}:{s:02}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protobuf::Message;

    fn guest(pid: u32, ppid: u32, ns_pid: u32, cmdline: &[u8]) -> pb::GuestProcess {
        pb::GuestProcess {
            pid,
            ppid,
            ns_pid,
            uid: 0,
            state: "S".into(),
            cpu_ms: 1500,
            comm: "sleep".into(),
            cmdline: cmdline.to_vec(),
            ..Default::default()
        }
    }

    fn answer(processes: Vec<pb::GuestProcess>, truncated: bool) -> Vec<u8> {
        pb::ListProcessesResponse {
            processes,
            truncated,
            ..Default::default()
        }
        .write_to_bytes()
        .expect("encode")
    }

    #[test]
    fn an_answer_becomes_the_containers_own_view() {
        let bytes = answer(
            vec![
                guest(41, 39, 2, b"sh\0-c\0sleep 600\0"),
                guest(39, 1, 1, b"sleep\x00600\x00"),
                guest(44, 41, 3, b""),
            ],
            false,
        );
        let list = decode(&bytes).expect("decodes");
        let rows: Vec<(u32, u32, u32, &str)> = list
            .processes
            .iter()
            .map(|p| (p.pid, p.ppid, p.guest_pid, p.command.as_str()))
            .collect();
        assert_eq!(
            rows,
            [
                (1, 0, 39, "sleep 600"),
                (2, 1, 41, "sh -c sleep 600"),
                (3, 2, 44, "[sleep]"),
            ]
        );
        let table = list.table();
        let mut lines = table.lines();
        assert!(lines.next().expect("header").starts_with("PID "));
        let first: Vec<&str> = lines.next().expect("a row").split_whitespace().collect();
        assert_eq!(
            first,
            ["1", "0", "39", "0", "S", "00:00:01", "sleep", "600"]
        );
    }

    #[test]
    fn a_hostile_answer_is_cut_and_escaped() {
        let mut p = guest(39, 1, 1, &[]);
        p.cmdline = [b"evil\x1b]0;pwned\x07\n\tx\0".as_slice(), &[b'a'; 70_000]].concat();
        p.comm = "c".repeat(10_000);
        p.state = "S; rm -rf".into();
        let mut zombie = guest(40, 1, 2, b"");
        zombie.comm = "\x1b[2J".into();
        let mut many = vec![p, zombie];
        many.extend((0..pb::MAX_LISTED_PROCESSES as u32).map(|n| guest(100 + n, 1, 9, b"x\0")));
        let list = decode(&answer(many, false)).expect("decodes");
        assert_eq!(list.processes.len(), pb::MAX_LISTED_PROCESSES);
        assert!(
            list.truncated,
            "the entries past the cap are said to be left out"
        );
        let first = &list.processes[0];
        assert_eq!(first.state, '?');
        assert!(
            first
                .command
                .starts_with("evil\\x1b]0;pwned\\x07\\x0a\\x09x a"),
            "{:?}",
            &first.command[..40]
        );
        assert!(
            first.command.len() <= pb::MAX_CMDLINE + 64,
            "cut at the cap"
        );
        assert_eq!(list.processes[1].command, "[\\x1b[2J]");
        assert!(!list.table().contains('\x1b'));
    }

    #[test]
    fn garbage_is_refused_and_unknown_fields_skipped() {
        for bad in [
            &b"\x12\x05\x08"[..],    // an entry longer than the message
            b"\x12\x7f",             // the same, its length alone
            b"\x15\x00\x00\x00\x00", // processes as a fixed32
            b"\x12\x02\x2a\x01",     // state as a varint
            b"\x12\x03\x42\xff\xff", // a cmdline that says it is longer than it is
            b"\x0f",                 // wire type 7
        ] {
            assert!(decode(bad).is_err(), "{bad:?}");
        }
        // Field 9 of the answer and field 20 of an entry are not hako's: skipped.
        let mut bytes = answer(vec![guest(39, 1, 1, b"sleep\0")], true);
        bytes.extend_from_slice(b"\x48\x01");
        let list = decode(&bytes).expect("decodes");
        assert!(list.truncated);
        let entry = b"\x12\x07\x08\x05\xa0\x01\x03\x18\x01";
        let list = decode(entry).expect("decodes");
        assert_eq!((list.processes[0].guest_pid, list.processes[0].pid), (5, 1));
    }

    #[test]
    fn cpu_time_reads_as_ps_prints_it() {
        assert_eq!(cpu_time(Duration::from_millis(999)), "00:00:00");
        assert_eq!(cpu_time(Duration::from_secs(3 * 3600 + 62)), "03:01:02");
        assert_eq!(cpu_time(Duration::from_secs(2 * 86_400 + 5)), "2-00:00:05");
    }
}
