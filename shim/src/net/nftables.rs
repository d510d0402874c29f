//! nf_tables over netlink, in-process: the little of it that port forwarding needs (`forward`),
//! where the shim once piped a script into `nsenter nft -f -`. A change is one batch, atomic as
//! `nft -f` makes it; every message in it asks for an acknowledgement, and the first error the
//! kernel reports fails the whole (the kernel then applies none of it).
//!
//! Encoded here rather than through a crate: the `nftables` crate spawns `nft`, `rustables` is
//! GPL-3.0 (hako is Apache-2.0), `nftnl` binds the C libnftnl; and hako sends five messages.

use std::path::Path;
use std::time::Duration;

use nix::sys::socket::{setsockopt, sockopt};
use nix::sys::time::TimeVal;
use rtnetlink::sys::{protocols::NETLINK_NETFILTER, Socket};

use super::namespace::on_thread_in;
use super::NetError;

const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
pub const NLM_F_CREATE: u16 = 0x400;
pub const NLM_F_APPEND: u16 = 0x800;
const NLA_F_NESTED: u16 = 0x8000;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFT_MSG_GETGEN: u16 = 16;
const AF_UNSPEC: u8 = 0;
pub const NFPROTO_IPV4: u8 = 2;
/// The kernel answers a batch while it is being sent; only a wedged kernel makes this wait.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// The nf_tables messages hako sends (NFT_MSG_*).
#[derive(Debug, Clone, Copy)]
pub enum Kind {
    NewTable = 0,
    DelTable = 2,
    NewChain = 3,
    NewRule = 6,
}

/// Netlink attributes, encoded as they are added.
#[derive(Debug, Default, Clone)]
pub struct Attrs(Vec<u8>);

impl Attrs {
    pub fn new() -> Self {
        Self::default()
    }

    fn put(mut self, kind: u16, payload: &[u8]) -> Self {
        // An attribute is a few hundred bytes at most: its length always fits.
        let len = (4 + payload.len()) as u16;
        self.0.extend_from_slice(&len.to_ne_bytes());
        self.0.extend_from_slice(&kind.to_ne_bytes());
        self.0.extend_from_slice(payload);
        self.0.resize(align(self.0.len()), 0);
        self
    }

    /// A NUL-terminated string, as nf_tables takes names.
    pub fn string(self, kind: u16, value: &str) -> Self {
        self.put(kind, &[value.as_bytes(), &[0]].concat())
    }

    /// A 32-bit number, in network byte order, as nf_tables takes them all.
    pub fn u32(self, kind: u16, value: u32) -> Self {
        self.put(kind, &value.to_be_bytes())
    }

    pub fn bytes(self, kind: u16, value: &[u8]) -> Self {
        self.put(kind, value)
    }

    pub fn nested(self, kind: u16, inner: Attrs) -> Self {
        self.put(kind | NLA_F_NESTED, &inner.0)
    }
}

fn align(n: usize) -> usize {
    (n + 3) & !3
}

/// One atomic change of one family's ruleset.
#[derive(Debug)]
pub struct Batch {
    family: u8,
    /// (kind, extra flags, attributes, what it does in words for errors).
    messages: Vec<(Kind, u16, Attrs, String)>,
}

impl Batch {
    pub fn new(family: u8) -> Self {
        Self {
            family,
            messages: Vec::new(),
        }
    }

    /// Adds a message; `operation` names it in errors ("adding table ip hako_portforward").
    pub fn push(&mut self, kind: Kind, flags: u16, attrs: Attrs, operation: impl Into<String>) {
        self.messages.push((kind, flags, attrs, operation.into()));
    }

    /// BATCH_BEGIN (sequence number 0), the messages (1 to n), BATCH_END.
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let batch_id = NFNL_SUBSYS_NFTABLES;
        encode(
            &mut out,
            NFNL_MSG_BATCH_BEGIN,
            0,
            0,
            AF_UNSPEC,
            batch_id,
            &[],
        );
        let mut seq = 0;
        for (kind, flags, attrs, _) in &self.messages {
            seq += 1;
            let kind = (NFNL_SUBSYS_NFTABLES << 8) | *kind as u16;
            encode(
                &mut out,
                kind,
                flags | NLM_F_ACK,
                seq,
                self.family,
                0,
                &attrs.0,
            );
        }
        encode(
            &mut out,
            NFNL_MSG_BATCH_END,
            0,
            seq + 1,
            AF_UNSPEC,
            batch_id,
            &[],
        );
        out
    }

    /// What the message with sequence number `seq` does; the batch header is 0.
    fn operation(&self, seq: u32) -> &str {
        let at = (seq as usize).checked_sub(1);
        match at.and_then(|at| self.messages.get(at)) {
            Some((_, _, _, operation)) => operation,
            None => "starting the batch",
        }
    }
}

/// An nlmsghdr and nfgenmsg, then `attrs` (already aligned).
fn encode(
    out: &mut Vec<u8>,
    kind: u16,
    flags: u16,
    seq: u32,
    family: u8,
    res_id: u16,
    attrs: &[u8],
) {
    let len = (16 + 4 + attrs.len()) as u32;
    out.extend_from_slice(&len.to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(&(flags | NLM_F_REQUEST).to_ne_bytes());
    out.extend_from_slice(&seq.to_ne_bytes());
    out.extend_from_slice(&0u32.to_ne_bytes());
    out.extend_from_slice(&[family, 0]);
    out.extend_from_slice(&res_id.to_be_bytes());
    out.extend_from_slice(attrs);
}

/// Applies `batch` to the ruleset of the namespace at `netns`.
pub fn apply_in(netns: &Path, batch: Batch) -> Result<(), NetError> {
    on_thread_in(netns, "nf_tables", move || {
        let socket = open(batch.operation(1))?;
        let sent = socket.send(&batch.encode(), 0);
        sent.map_err(|e| failed(batch.operation(1), e.to_string()))?;
        let seqs: Vec<u32> = (1..=batch.messages.len() as u32).collect();
        await_acks(&socket, &seqs).map_err(|(seq, reason)| failed(batch.operation(seq), reason))
    })
}

/// Whether the kernel speaks nf_tables to this process, here: it answers a request for the
/// ruleset's generation, which changes nothing. For `hako check`.
pub fn available() -> Result<(), NetError> {
    let operation = "asking for the ruleset's generation";
    let socket = open(operation)?;
    let mut request = Vec::new();
    let kind = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETGEN;
    encode(&mut request, kind, NLM_F_ACK, 1, AF_UNSPEC, 0, &[]);
    let sent = socket.send(&request, 0);
    sent.map_err(|e| failed(operation, e.to_string()))?;
    await_acks(&socket, &[1]).map_err(|(_, reason)| failed(operation, reason))
}

fn open(operation: &str) -> Result<Socket, NetError> {
    let socket = Socket::new(NETLINK_NETFILTER).map_err(|e| {
        failed(
            operation,
            format!("opening a netfilter netlink socket: {e}"),
        )
    })?;
    let timeout = TimeVal::new(ANSWER_TIMEOUT.as_secs() as _, 0);
    setsockopt(&socket, sockopt::ReceiveTimeout, &timeout)
        .map_err(|e| failed(operation, format!("setting a receive timeout: {e}")))?;
    Ok(socket)
}

fn failed(operation: &str, reason: String) -> NetError {
    NetError::Netlink {
        operation: format!("nf_tables: {operation}"),
        reason,
    }
}

/// Waits until the kernel acknowledged each of `seqs`; the first error it reports, with the
/// sequence number of the message it refused.
fn await_acks(socket: &Socket, seqs: &[u32]) -> Result<(), (u32, String)> {
    let mut waiting = seqs.to_vec();
    while let Some(&next) = waiting.first() {
        let (datagram, _) = socket.recv_from_full().map_err(|e| {
            let reason = match e.kind() {
                std::io::ErrorKind::WouldBlock => format!("no answer in {ANSWER_TIMEOUT:?}"),
                _ => e.to_string(),
            };
            (next, reason)
        })?;
        for (seq, code) in acks(&datagram) {
            if code != 0 {
                let errno = std::io::Error::from_raw_os_error(code.saturating_neg());
                return Err((seq, errno.to_string()));
            }
            waiting.retain(|s| *s != seq);
        }
    }
    Ok(())
}

/// The acknowledgements in a datagram: (sequence number, error code, 0 for success). Other
/// messages (the generation a GETGEN asked for) and anything truncated are passed over.
fn acks(datagram: &[u8]) -> Vec<(u32, i32)> {
    let mut found = Vec::new();
    let mut at = 0;
    while let Some(header) = datagram.get(at..at + 16) {
        let word = |i: usize| [header[i], header[i + 1], header[i + 2], header[i + 3]];
        let len = u32::from_ne_bytes(word(0)) as usize;
        if len < 16 || at + len > datagram.len() {
            break;
        }
        let kind = u16::from_ne_bytes([header[4], header[5]]);
        let seq = u32::from_ne_bytes(word(8));
        if kind == NLMSG_ERROR {
            if let Some(code) = datagram.get(at + 16..at + 20) {
                found.push((
                    seq,
                    i32::from_ne_bytes([code[0], code[1], code[2], code[3]]),
                ));
            }
        }
        at += align(len);
    }
    found
}

/// Expressions of a rule, each working on register 1 (NFT_REG_1), as `nft` compiles them.
pub mod expr {
    use super::Attrs;

    const NFTA_EXPR_NAME: u16 = 1;
    const NFTA_EXPR_DATA: u16 = 2;
    const NFTA_DATA_VALUE: u16 = 1;
    const NFT_REG_1: u32 = 1;

    fn expression(name: &str, data: Attrs) -> Attrs {
        Attrs::new()
            .string(NFTA_EXPR_NAME, name)
            .nested(NFTA_EXPR_DATA, data)
    }

    /// Where a payload expression reads (NFT_PAYLOAD_*_HEADER).
    #[derive(Debug, Clone, Copy)]
    pub enum Base {
        Network = 1,
        Transport = 2,
    }

    /// Loads `len` bytes at `offset` past the `base` header.
    pub fn payload(base: Base, offset: u32, len: u32) -> Attrs {
        let data = Attrs::new()
            .u32(1, NFT_REG_1) // NFTA_PAYLOAD_DREG
            .u32(2, base as u32) // NFTA_PAYLOAD_BASE
            .u32(3, offset) // NFTA_PAYLOAD_OFFSET
            .u32(4, len); // NFTA_PAYLOAD_LEN
        expression("payload", data)
    }

    /// How `cmp` compares (NFT_CMP_*).
    #[derive(Debug, Clone, Copy)]
    pub enum Cmp {
        Eq = 0,
        Neq = 1,
    }

    /// Goes on with the rule only when the register compares so with `value`.
    pub fn cmp(op: Cmp, value: &[u8]) -> Attrs {
        let data = Attrs::new()
            .u32(1, NFT_REG_1) // NFTA_CMP_SREG
            .u32(2, op as u32) // NFTA_CMP_OP
            .nested(3, Attrs::new().bytes(NFTA_DATA_VALUE, value)); // NFTA_CMP_DATA
        expression("cmp", data)
    }

    /// Loads the packet's layer 4 protocol (NFT_META_L4PROTO).
    pub fn l4proto() -> Attrs {
        let data = Attrs::new()
            .u32(1, NFT_REG_1) // NFTA_META_DREG
            .u32(2, 16); // NFTA_META_KEY: NFT_META_L4PROTO
        expression("meta", data)
    }

    /// Loads `value`.
    pub fn immediate(value: &[u8]) -> Attrs {
        let data = Attrs::new()
            .u32(1, NFT_REG_1) // NFTA_IMMEDIATE_DREG
            .nested(2, Attrs::new().bytes(NFTA_DATA_VALUE, value)); // NFTA_IMMEDIATE_DATA
        expression("immediate", data)
    }

    /// Redirects to this host, to the port in the register (`redirect to :PORT`).
    pub fn redirect_to_port() -> Attrs {
        const NF_NAT_RANGE_PROTO_SPECIFIED: u32 = 1 << 1;
        let data = Attrs::new()
            .u32(1, NFT_REG_1) // NFTA_REDIR_REG_PROTO_MIN
            .u32(3, NF_NAT_RANGE_PROTO_SPECIFIED); // NFTA_REDIR_FLAGS
        expression("redir", data)
    }
}

/// A table's attributes (NFTA_TABLE_NAME).
pub fn table(name: &str) -> Attrs {
    Attrs::new().string(1, name)
}

/// A base chain of `chain_type` ("nat", "filter") on `hook` (NF_INET_*), with policy accept.
pub fn base_chain(table: &str, name: &str, chain_type: &str, hook: u32, priority: i32) -> Attrs {
    const NF_ACCEPT: u32 = 1;
    let hook = Attrs::new()
        .u32(1, hook) // NFTA_HOOK_HOOKNUM
        .u32(2, priority as u32); // NFTA_HOOK_PRIORITY, two's complement as the kernel reads it
    Attrs::new()
        .string(1, table) // NFTA_CHAIN_TABLE
        .string(3, name) // NFTA_CHAIN_NAME
        .nested(4, hook) // NFTA_CHAIN_HOOK
        .u32(5, NF_ACCEPT) // NFTA_CHAIN_POLICY
        .string(7, chain_type) // NFTA_CHAIN_TYPE
}

/// A rule of `expressions`, in order, at the end of `chain`.
pub fn rule(table: &str, chain: &str, expressions: Vec<Attrs>) -> Attrs {
    const NFTA_LIST_ELEM: u16 = 1;
    let list = expressions
        .into_iter()
        .fold(Attrs::new(), |list, e| list.nested(NFTA_LIST_ELEM, e));
    Attrs::new()
        .string(1, table) // NFTA_RULE_TABLE
        .string(2, chain) // NFTA_RULE_CHAIN
        .nested(4, list) // NFTA_RULE_EXPRESSIONS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_are_aligned_and_nested_ones_flagged() {
        let attrs = Attrs::new()
            .string(1, "ab")
            .nested(4, Attrs::new().u32(2, 6));
        assert_eq!(
            attrs.0,
            [
                7, 0, 1, 0, b'a', b'b', 0, 0, // "ab\0", padded to 4
                12, 0, 4, 0x80, // nested
                8, 0, 2, 0, 0, 0, 0, 6, // big-endian 6
            ]
        );
    }

    #[test]
    fn acks_are_read_by_sequence_and_garbage_passed_over() {
        let ack = |seq: u32, code: i32| {
            let mut m = 36u32.to_ne_bytes().to_vec();
            m.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
            m.extend_from_slice(&[0, 0]);
            m.extend_from_slice(&seq.to_ne_bytes());
            m.extend_from_slice(&[0; 4]);
            m.extend_from_slice(&code.to_ne_bytes());
            m.extend_from_slice(&[0; 16]);
            m
        };
        let datagram = [ack(1, 0), ack(2, -libc::ENOENT)].concat();
        assert_eq!(acks(&datagram), [(1, 0), (2, -libc::ENOENT)]);
        assert_eq!(acks(&datagram[..40]), [(1, 0)], "a cut message is not read");
        assert!(acks(&[1, 2, 3]).is_empty());
        let mut batch = Batch::new(NFPROTO_IPV4);
        batch.push(Kind::DelTable, 0, table("t"), "deleting table ip t");
        assert_eq!(batch.operation(1), "deleting table ip t");
        assert_eq!(batch.operation(0), "starting the batch");
    }
}
