//! The container's device rules, enforced as runc enforces them on cgroup v2: a
//! `BPF_PROG_TYPE_CGROUP_DEVICE` program attached to the container's cgroup decides every
//! open and mknod of a device node. The spec's `linux.resources.devices` are applied in order
//! to a deny-all start (an `a` rule resets to allow-all or deny-all), then runc's default
//! allow-list, so a spec cannot deny /dev/null: with no rules at all, a container can use only
//! the usual devices, and not, for instance, the guest's serial console.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

use oci_spec::runtime::{LinuxDeviceCgroup, LinuxDeviceType};

const ACC_MKNOD: u32 = 1;
const ACC_READ: u32 = 2;
const ACC_WRITE: u32 = 4;
const ACC_ALL: u32 = ACC_MKNOD | ACC_READ | ACC_WRITE;
const DEV_BLOCK: u32 = 1;
const DEV_CHAR: u32 = 2;
/// -1 in a rule: any major or minor.
const ANY: i64 = -1;

/// runc's default allow-list (libcontainer/specconv `AllowedDevices`): mknod of anything, and
/// the usual character devices.
const DEFAULTS: [(u32, i64, i64, u32); 11] = [
    (DEV_CHAR, ANY, ANY, ACC_MKNOD),
    (DEV_BLOCK, ANY, ANY, ACC_MKNOD),
    (DEV_CHAR, 1, 3, ACC_ALL),     // null
    (DEV_CHAR, 1, 8, ACC_ALL),     // random
    (DEV_CHAR, 1, 7, ACC_ALL),     // full
    (DEV_CHAR, 5, 0, ACC_ALL),     // tty
    (DEV_CHAR, 1, 5, ACC_ALL),     // zero
    (DEV_CHAR, 1, 9, ACC_ALL),     // urandom
    (DEV_CHAR, 136, ANY, ACC_ALL), // pts
    (DEV_CHAR, 5, 2, ACC_ALL),     // ptmx
    (DEV_CHAR, 10, 200, ACC_ALL),  // net/tun
];

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("device rule {0}: unknown access (only r, w, m)")]
    Access(String),
    #[error("loading the device filter: {0}")]
    Load(io::Error),
    #[error("attaching the device filter to {path}: {source}")]
    Attach { path: String, source: io::Error },
}

/// The rules after the emulation: the default, and the exceptions to it (type, major, minor
/// → access).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Rules {
    pub default_allow: bool,
    pub exceptions: BTreeMap<(u32, i64, i64), u32>,
}

fn access_bits(access: &str) -> Result<u32, DeviceError> {
    access.chars().try_fold(0, |bits, c| match c {
        'r' => Ok(bits | ACC_READ),
        'w' => Ok(bits | ACC_WRITE),
        'm' => Ok(bits | ACC_MKNOD),
        _ => Err(DeviceError::Access(access.to_string())),
    })
}

impl Rules {
    /// Applies one rule as runc's emulator does.
    fn apply(&mut self, kind: Option<u32>, major: i64, minor: i64, access: u32, allow: bool) {
        let Some(kind) = kind else {
            // Type `a`: everything allowed, or nothing.
            self.default_allow = allow;
            self.exceptions.clear();
            return;
        };
        let key = (kind, major, minor);
        if allow != self.default_allow {
            *self.exceptions.entry(key).or_insert(0) |= access;
        } else if let Some(bits) = self.exceptions.get_mut(&key) {
            *bits &= !access;
            if *bits == 0 {
                self.exceptions.remove(&key);
            }
        }
    }

    /// Whether every device is allowed (a privileged container).
    pub fn allows_every_device(&self) -> bool {
        self.default_allow && self.exceptions.is_empty()
    }

    /// The spec's rules in order, then the default allow-list.
    pub fn from_spec(rules: &[LinuxDeviceCgroup]) -> Result<Rules, DeviceError> {
        let mut out = Rules::default();
        for rule in rules {
            let kind = match rule.typ() {
                None | Some(LinuxDeviceType::A) => None,
                Some(LinuxDeviceType::B) => Some(DEV_BLOCK),
                // c, u (unbuffered char) and p (fifo) are character devices to the kernel's
                // filter; fifos never reach it.
                Some(_) => Some(DEV_CHAR),
            };
            let access = match rule.access() {
                Some(a) if !a.is_empty() => access_bits(a)?,
                _ => ACC_ALL,
            };
            out.apply(
                kind,
                rule.major().unwrap_or(ANY),
                rule.minor().unwrap_or(ANY),
                access,
                rule.allow(),
            );
        }
        for (kind, major, minor, access) in DEFAULTS {
            out.apply(Some(kind), major, minor, access, true);
        }
        Ok(out)
    }

    /// The BPF program: load the type, access, major and minor from the context, then one
    /// block per exception (first match returns), then the default.
    pub fn program(&self) -> Vec<u64> {
        let mut code = vec![
            ldx_w(2, 1, 0),
            alu32_imm(AND, 2, 0xffff),
            ldx_w(3, 1, 0),
            alu32_imm(RSH, 3, 16),
            ldx_w(4, 1, 4),
            ldx_w(5, 1, 8),
        ];
        let verdict = if self.default_allow { 0 } else { 1 };
        for (&(kind, major, minor), &access) in &self.exceptions {
            let mut block = Vec::new();
            // Each jump's offset is filled in once the block's length is known.
            block.push((JNE_IMM, 2, kind as i32));
            if access != ACC_ALL {
                block.push((MOV32_REG, 1, 3));
                block.push((AND32_IMM, 1, access as i32));
                block.push((JNE_REG, 1, 3));
            }
            if major != ANY {
                block.push((JNE_IMM, 4, major as i32));
            }
            if minor != ANY {
                block.push((JNE_IMM, 5, minor as i32));
            }
            let len = block.len() + 2;
            for (i, (op, dst, value)) in block.iter().enumerate() {
                let skip = (len - i - 1) as i16;
                code.push(match *op {
                    JNE_IMM => jne_imm(*dst, *value, skip),
                    JNE_REG => jne_reg(*dst, *value as u8, skip),
                    MOV32_REG => mov32_reg(*dst, *value as u8),
                    _ => alu32_imm(AND, *dst, *value),
                });
            }
            code.push(mov32_imm(0, verdict));
            code.push(exit());
        }
        code.push(mov32_imm(0, if self.default_allow { 1 } else { 0 }));
        code.push(exit());
        code
    }
}

// Block-building pseudo-ops.
const JNE_IMM: u8 = 0;
const JNE_REG: u8 = 1;
const MOV32_REG: u8 = 2;
const AND32_IMM: u8 = 3;
// eBPF opcodes.
const AND: u8 = 0x50;
const RSH: u8 = 0x70;

fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> u64 {
    (code as u64)
        | ((dst as u64 & 0xf) << 8)
        | ((src as u64 & 0xf) << 12)
        | ((off as u16 as u64) << 16)
        | ((imm as u32 as u64) << 32)
}
/// `dst = *(u32 *)(src + off)`.
fn ldx_w(dst: u8, src: u8, off: i16) -> u64 {
    insn(0x61, dst, src, off, 0)
}
/// `dst op= imm` (32-bit ALU, `op` AND or RSH).
fn alu32_imm(op: u8, dst: u8, imm: i32) -> u64 {
    insn(0x04 | op, dst, 0, 0, imm)
}
fn mov32_imm(dst: u8, imm: i32) -> u64 {
    insn(0xb4, dst, 0, 0, imm)
}
fn mov32_reg(dst: u8, src: u8) -> u64 {
    insn(0xbc, dst, src, 0, 0)
}
/// `if dst != imm goto +off`.
fn jne_imm(dst: u8, imm: i32, off: i16) -> u64 {
    insn(0x55, dst, 0, off, imm)
}
/// `if dst != src goto +off`.
fn jne_reg(dst: u8, src: u8, off: i16) -> u64 {
    insn(0x5d, dst, src, off, 0)
}
fn exit() -> u64 {
    insn(0x95, 0, 0, 0, 0)
}

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_PROG_DETACH: libc::c_long = 9;
const BPF_PROG_TYPE_CGROUP_DEVICE: u32 = 15;
const BPF_CGROUP_DEVICE: u32 = 6;
const BPF_F_ALLOW_MULTI: u32 = 2;

fn bpf(cmd: libc::c_long, attr: &mut [u64; 16]) -> io::Result<i64> {
    // SAFETY: `attr` is a live, zero-padded `union bpf_attr` of the size passed; the kernel
    // reads (and for some commands writes) only within it.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.as_mut_ptr(),
            std::mem::size_of::<[u64; 16]>(),
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Loads `program` as a cgroup device program.
fn load(program: &[u64]) -> io::Result<OwnedFd> {
    let license = c"Apache";
    let mut attr = [0u64; 16];
    // prog_type, insn_cnt, insns, license.
    attr[0] = u64::from(BPF_PROG_TYPE_CGROUP_DEVICE) | ((program.len() as u64) << 32);
    attr[1] = program.as_ptr() as u64;
    attr[2] = license.as_ptr() as u64;
    let fd = bpf(BPF_PROG_LOAD, &mut attr)?;
    // SAFETY: the kernel returned a fresh descriptor for the program.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// The filter attached to one container's cgroup; replacing it detaches the old one.
pub struct DeviceFilter {
    program: OwnedFd,
}

/// Loads the program for `rules` and attaches it to the cgroup `dir`, then detaches
/// `previous` (an update): the cgroup is never without a filter.
pub fn attach(
    dir: &Path,
    rules: &[LinuxDeviceCgroup],
    previous: Option<DeviceFilter>,
) -> Result<DeviceFilter, DeviceError> {
    let program = Rules::from_spec(rules)?.program();
    let loaded = load(&program).map_err(DeviceError::Load)?;
    let attach_err = |source| DeviceError::Attach {
        path: dir.display().to_string(),
        source,
    };
    let cgroup = std::fs::File::open(dir).map_err(attach_err)?;
    let mut attr = [0u64; 16];
    // target_fd, attach_bpf_fd, attach_type, attach_flags.
    attr[0] = cgroup.as_raw_fd() as u64 | ((loaded.as_raw_fd() as u64) << 32);
    attr[1] = u64::from(BPF_CGROUP_DEVICE) | (u64::from(BPF_F_ALLOW_MULTI) << 32);
    bpf(BPF_PROG_ATTACH, &mut attr).map_err(attach_err)?;
    if let Some(old) = previous {
        let mut attr = [0u64; 16];
        attr[0] = cgroup.as_raw_fd() as u64 | ((old.program.as_raw_fd() as u64) << 32);
        attr[1] = u64::from(BPF_CGROUP_DEVICE);
        if let Err(e) = bpf(BPF_PROG_DETACH, &mut attr) {
            log::warn!("detaching the old device filter of {}: {e}", dir.display());
        }
    }
    Ok(DeviceFilter { program: loaded })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs a program of the opcodes `Rules::program` uses on one access, as the kernel would.
    fn run(program: &[u64], kind: u32, major: i64, minor: i64, access: u32) -> u32 {
        let ctx = [kind | (access << 16), major as u32, minor as u32];
        let mut r = [0u32; 11];
        let mut pc = 0usize;
        loop {
            let insn = program[pc];
            let (op, dst, src) = (
                insn & 0xff,
                ((insn >> 8) & 0xf) as usize,
                ((insn >> 12) & 0xf) as usize,
            );
            let off = ((insn >> 16) & 0xffff) as u16 as i16;
            let imm = (insn >> 32) as u32;
            pc += 1;
            match op {
                0x61 => r[dst] = ctx[off as usize / 4],
                0x54 => r[dst] &= imm,
                0x74 => r[dst] >>= imm,
                0xb4 => r[dst] = imm,
                0xbc => r[dst] = r[src],
                0x55 if r[dst] != imm => pc = (pc as i64 + i64::from(off)) as usize,
                0x5d if r[dst] != r[src] => pc = (pc as i64 + i64::from(off)) as usize,
                0x55 | 0x5d => {}
                0x95 => return r[0],
                other => panic!("unexpected opcode {other:#x}"),
            }
        }
    }

    fn allows(rules: &Rules, kind: u32, major: i64, minor: i64, access: u32) -> bool {
        run(&rules.program(), kind, major, minor, access) == 1
    }

    fn rule(json: &str) -> LinuxDeviceCgroup {
        serde_json::from_str(json).expect("rule")
    }

    #[test]
    fn deny_all_then_the_defaults() {
        let rules = Rules::from_spec(&[rule(r#"{"allow": false, "access": "rwm"}"#)]).expect("ok");
        assert!(!rules.default_allow);
        assert!(
            allows(&rules, DEV_CHAR, 1, 3, ACC_READ | ACC_WRITE),
            "/dev/null"
        );
        assert!(allows(&rules, DEV_CHAR, 136, 7, ACC_READ), "a pty");
        assert!(
            allows(&rules, DEV_CHAR, 4, 64, ACC_MKNOD),
            "mknod of anything"
        );
        assert!(
            !allows(&rules, DEV_CHAR, 4, 64, ACC_WRITE),
            "not the serial console"
        );
        assert!(!allows(&rules, DEV_BLOCK, 8, 0, ACC_READ), "not a disk");
        // No rules at all: the same.
        assert_eq!(Rules::from_spec(&[]).expect("ok"), rules);
    }

    #[test]
    fn privileged_allows_everything_and_specs_cannot_deny_the_defaults() {
        let all = Rules::from_spec(&[rule(r#"{"allow": true, "type": "a", "access": "rwm"}"#)])
            .expect("ok");
        assert!(all.default_allow && all.exceptions.is_empty());
        assert!(allows(&all, DEV_BLOCK, 8, 0, ACC_READ | ACC_WRITE));
        let denied = Rules::from_spec(&[
            rule(r#"{"allow": true, "type": "c", "major": 4, "minor": 64, "access": "rw"}"#),
            rule(r#"{"allow": false, "type": "c", "major": 4, "minor": 64, "access": "w"}"#),
            rule(r#"{"allow": false, "type": "c", "major": 1, "minor": 3, "access": "rwm"}"#),
        ])
        .expect("ok");
        assert!(allows(&denied, DEV_CHAR, 4, 64, ACC_READ));
        assert!(!allows(&denied, DEV_CHAR, 4, 64, ACC_WRITE));
        assert!(
            allows(&denied, DEV_CHAR, 1, 3, ACC_WRITE),
            "the defaults come last"
        );
        assert!(Rules::from_spec(&[rule(r#"{"allow": true, "access": "rx"}"#)]).is_err());
    }

    #[test]
    fn the_program_has_the_kernels_layout() {
        let rules = Rules::from_spec(&[]).expect("ok");
        let program = rules.program();
        // Six loads, a block per exception, the default.
        assert_eq!(program[0] & 0xff, 0x61);
        assert_eq!(*program.last().expect("exit") & 0xff, 0x95);
        assert_eq!(program[program.len() - 2], mov32_imm(0, 0), "default deny");
        // Every jump lands inside the program.
        for (i, insn) in program.iter().enumerate() {
            if matches!(insn & 0xff, 0x55 | 0x5d) {
                let off = ((insn >> 16) & 0xffff) as u16 as i16;
                assert!(i as i64 + 1 + i64::from(off) < program.len() as i64);
            }
        }
    }
}
