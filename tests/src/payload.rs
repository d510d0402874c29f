//! What the stream tests make containers print: files of every size that crosses a buffer
//! (the guest's pipes and channel, the vsock credit, the shim's reads, the FIFOs), each line
//! numbered so that a byte out of place shows, one file for stdout and one for stderr. The
//! container only `cat`s them from a read-only volume, so the guest's CPU is not what is
//! measured.

#![allow(clippy::unwrap_used)] // Test harness: a failed step should fail the test loudly.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// 0, 1, a page and one byte short, a page, the agent's chunk, twice it, 1 MiB and 64 MiB.
pub const SIZES: [usize; 8] = [
    0,
    1,
    4095,
    4096,
    32 * 1024,
    64 * 1024,
    1024 * 1024,
    64 * 1024 * 1024,
];

/// Lines of this many bytes, the newline included.
const LINE: usize = 1000;

/// `size` bytes of numbered lines of `stream`'s ("out" or "err"), cut mid-line if need be.
pub fn payload(stream: &str, size: usize) -> Vec<u8> {
    let mut data = Vec::with_capacity(size + LINE);
    let mut n = 0u64;
    while data.len() < size {
        let head = format!("{stream} {n:010} ");
        data.extend_from_slice(head.as_bytes());
        let fill = b"abcdefghijklmnopqrstuvwxyz"[(n % 26) as usize];
        data.extend(std::iter::repeat_n(fill, LINE - 1 - head.len()));
        data.push(b'\n');
        n += 1;
    }
    data.truncate(size);
    data
}

/// What the payload looks like again after one or more terminals (each line discipline's
/// ONLCR adds a `\r` before every `\n`, and ctr's own terminal may add another): the output
/// without its carriage returns, and without the lines ctr itself logs onto the same terminal
/// (`ERRO[0000] failed to resize tty, using default size`, when a process ends before ctr
/// sizes its terminal, under runc as under hako).
pub fn from_a_terminal(output: &[u8]) -> Vec<u8> {
    // The payload has no escape character: from one to the end of its line is ctr's, wherever
    // on a line it starts.
    let mut out = Vec::with_capacity(output.len());
    let mut in_ctr_log = false;
    for b in output {
        match b {
            0x1b => in_ctr_log = true,
            b'\n' if in_ctr_log => in_ctr_log = false,
            _ if in_ctr_log => {}
            b'\r' => {}
            _ => out.push(*b),
        }
    }
    out
}

/// A directory per size holding `out` and `err`, made once per test binary under the build
/// tree (reproducible, so a later binary rewrites the same bytes).
pub fn payload_dir(size: usize) -> PathBuf {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    let root = ROOT.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .unwrap()
            .join("target/e2e-payloads");
        for size in SIZES {
            let dir = root.join(size.to_string());
            fs::create_dir_all(&dir).unwrap();
            for stream in ["out", "err"] {
                let file = dir.join(stream);
                let wanted = payload(stream, size);
                if fs::read(&file).ok().as_deref() != Some(&wanted[..]) {
                    fs::write(&file, &wanted).unwrap();
                }
            }
        }
        root
    });
    root.join(size.to_string())
}

/// The shell line a container runs: both files at once, stdout and stderr interleaved, then
/// exit 3; with a terminal (one stream) only `out`.
pub fn script(terminal: bool) -> &'static str {
    if terminal {
        "cat /data/out; exit 3"
    } else {
        "cat /data/out & cat /data/err >&2; wait; exit 3"
    }
}

/// Where the first difference is, for a failure message that does not print 64 MiB.
pub fn first_difference(got: &[u8], want: &[u8]) -> String {
    if got == want {
        return "equal".to_string();
    }
    let at = got
        .iter()
        .zip(want)
        .position(|(a, b)| a != b)
        .unwrap_or(got.len().min(want.len()));
    let show = |d: &[u8]| {
        String::from_utf8_lossy(&d[at.saturating_sub(20)..(at + 20).min(d.len())]).into_owned()
    };
    format!(
        "{} bytes, {} wanted; first difference at byte {at}: got {:?}, want {:?}",
        got.len(),
        want.len(),
        show(got),
        show(want)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_have_their_size_and_numbered_lines() {
        for size in [0, 1, 999, 1000, 1001, 4096] {
            let p = payload("out", size);
            assert_eq!(p.len(), size);
        }
        let p = payload("err", 3000);
        assert!(p.starts_with(b"err 0000000000 aaa"));
        assert_eq!(&p[999..1000], b"\n");
        assert!(p[1000..].starts_with(b"err 0000000001 bbb"));
        assert_eq!(
            from_a_terminal(b"a\r\r\n\x1b[31mERRO\x1b[0m[0000] failed\r\nb\r\nc"),
            b"a\nb\nc"
        );
        assert_eq!(from_a_terminal(b"o\x1b[31mERRO\x1b[0m[0000] x\n"), b"o");
        assert!(first_difference(b"abc", b"abd").contains("byte 2"));
    }
}
