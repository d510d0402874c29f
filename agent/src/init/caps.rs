//! The OCI process's capability sets, applied in the container's init before exec.

use std::collections::HashSet;
use std::str::FromStr;

use caps::{CapSet, Capability, CapsHashSet};
use oci_spec::runtime::{Capabilities, LinuxCapabilities};

use super::InitError;

fn to_set(names: Option<&Capabilities>) -> CapsHashSet {
    names
        .map(|set| {
            set.iter()
                .filter_map(|c| {
                    let name = c.to_string();
                    let name = if name.starts_with("CAP_") {
                        name
                    } else {
                        format!("CAP_{name}")
                    };
                    Capability::from_str(&name).ok()
                })
                .collect()
        })
        .unwrap_or_default()
}

fn err(what: &str, e: caps::errors::CapsError) -> InitError {
    InitError::Caps(format!("{what}: {e}"))
}

/// Drops everything not in the bounding set (needs CAP_SETPCAP, so before the user switch).
pub fn drop_bounding(c: &LinuxCapabilities) -> Result<(), InitError> {
    let keep = to_set(c.bounding().as_ref());
    for cap in caps::all() {
        if !keep.contains(&cap) && caps::has_cap(None, CapSet::Bounding, cap).unwrap_or(false) {
            caps::drop(None, CapSet::Bounding, cap).map_err(|e| err("bounding set", e))?;
        }
    }
    Ok(())
}

/// Sets effective, permitted, inheritable and ambient sets exactly (after the user switch).
pub fn apply(c: &LinuxCapabilities) -> Result<(), InitError> {
    let permitted = to_set(c.permitted().as_ref());
    let effective: HashSet<_> = to_set(c.effective().as_ref())
        .intersection(&permitted)
        .copied()
        .collect();
    let inheritable = to_set(c.inheritable().as_ref());
    // Order matters: effective must stay within permitted at every step.
    caps::set(None, CapSet::Effective, &effective).map_err(|e| err("effective set", e))?;
    caps::set(None, CapSet::Permitted, &permitted).map_err(|e| err("permitted set", e))?;
    caps::set(None, CapSet::Inheritable, &inheritable).map_err(|e| err("inheritable set", e))?;
    let ambient: CapsHashSet = to_set(c.ambient().as_ref())
        .into_iter()
        .filter(|cap| permitted.contains(cap) && inheritable.contains(cap))
        .collect();
    caps::clear(None, CapSet::Ambient).map_err(|e| err("ambient set", e))?;
    for cap in ambient {
        caps::raise(None, CapSet::Ambient, cap).map_err(|e| err("ambient set", e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_with_or_without_prefix() {
        let c: LinuxCapabilities = serde_json::from_str(
            r#"{"bounding": ["CAP_CHOWN", "CAP_NET_RAW"], "permitted": ["CAP_KILL"]}"#,
        )
        .expect("valid");
        let bounding = to_set(c.bounding().as_ref());
        assert!(bounding.contains(&Capability::CAP_CHOWN));
        assert!(bounding.contains(&Capability::CAP_NET_RAW));
        assert_eq!(to_set(c.permitted().as_ref()).len(), 1);
        assert!(to_set(None).is_empty());
    }
}
