//! A container's resource limits against the VM that runs it. Under runc a limit caps a share
//! of the host; in a VM the cgroup in the guest would accept a limit larger than the VM and
//! quietly mean less (a container given `--memory 1g` in a 512 MiB VM was killed near 488 MiB,
//! `--cpus 2` on one vCPU ran on one). So a limit the VM cannot honour grows the VM when the
//! container boots its own VM, within `hypervisor.max_vcpus` and `max_memory_mib`, and is
//! refused otherwise, with a message that names the VM's size and the setting that raises it.
//!
//! A VM grown for a container keeps the configured size's spare room: the guest kernel and the
//! agent need memory of their own ([`GUEST_RESERVE_MIB`]). Grown sizes go up in steps
//! ([`MEMORY_STEP_MIB`]) so that the shapes a template is kept for stay few (ADR 14).

use oci_spec::runtime::LinuxResources;

use crate::config::HypervisorConfig;

/// What the guest kernel and agent keep of a VM's memory: a container's memory limit must fit
/// in the rest.
pub const GUEST_RESERVE_MIB: u64 = 64;
/// A VM grown for a memory limit is a multiple of this.
pub const MEMORY_STEP_MIB: u64 = 128;
/// The most vCPUs a cpuset may name (the configuration's own bound on vCPUs).
const MAX_CPU_INDEX: u32 = 63;
const MIB: u64 = 1024 * 1024;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SizingError {
    #[error("the container's memory limit ({limit_mib} MiB) does not fit in its VM: {vm}")]
    Memory { limit_mib: u64, vm: String },
    #[error("the container asks for {cpus} CPUs (--cpus, the CPU quota) and its VM cannot give them: {vm}")]
    Cpus { cpus: u32, vm: String },
    #[error("the container's cpuset names CPU {cpu} (--cpuset-cpus, cpuset.cpus) and its VM cannot have it: {vm}")]
    Cpuset { cpu: u32, vm: String },
    #[error("the container's cpuset {list:?} is not a list of CPU numbers below {max} such as 0-2,4", max = MAX_CPU_INDEX + 1)]
    CpusetList { list: String },
    #[error("the container's memory nodes {0:?} (--cpuset-mems, cpuset.mems) are not the VM's one node, 0")]
    Mems(String),
}

/// What a container's limits need of its VM.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Needs {
    /// The memory limit, rounded up to whole MiB.
    pub memory_mib: Option<u64>,
    /// The CPU quota in whole CPUs, rounded up.
    pub cpus: Option<u32>,
    /// The highest CPU the cpuset names.
    pub top_cpu: Option<u32>,
}

impl Needs {
    pub fn of(resources: Option<&LinuxResources>) -> Result<Needs, SizingError> {
        let Some(resources) = resources else {
            return Ok(Needs::default());
        };
        let mut needs = Needs::default();
        if let Some(limit) = resources.memory().as_ref().and_then(|m| m.limit()) {
            if limit > 0 {
                needs.memory_mib = Some((limit as u64).div_ceil(MIB));
            }
        }
        if let Some(cpu) = resources.cpu() {
            // runc's default period when a quota comes without one.
            let period = cpu.period().unwrap_or(100_000);
            if let Some(quota) = cpu.quota() {
                if quota > 0 && period > 0 {
                    let cpus = (quota as u64).div_ceil(period);
                    needs.cpus = Some(u32::try_from(cpus).unwrap_or(u32::MAX));
                }
            }
            if let Some(list) = cpu.cpus().as_deref().filter(|l| !l.trim().is_empty()) {
                needs.top_cpu = Some(top_cpu(list)?);
            }
            if let Some(mems) = cpu.mems().as_deref().filter(|m| !m.trim().is_empty()) {
                if mems.trim() != "0" {
                    return Err(SizingError::Mems(mems.to_string()));
                }
            }
        }
        Ok(needs)
    }

    /// What a Kubernetes pod's containers need together: kubelet sums their limits into the
    /// pod sandbox's resources (memory in bytes, the CPU quota and period in µs; 0 or less for
    /// none), which containerd gives a pause container as annotations (`of_pod`) and a
    /// sandboxer in the pod's config.
    pub fn of_pod_resources(memory: i64, quota: i64, period: i64) -> Needs {
        let positive = |n: i64| u64::try_from(n).ok().filter(|n| *n > 0);
        let period = positive(period).unwrap_or(100_000);
        Needs {
            memory_mib: positive(memory).map(|bytes| bytes.div_ceil(MIB)),
            cpus: positive(quota).map(|q| u32::try_from(q.div_ceil(period)).unwrap_or(u32::MAX)),
            top_cpu: None,
        }
    }

    /// `of_pod_resources`, from the annotations containerd's CRI gives a pause container.
    pub fn of_pod<'a>(annotations: impl IntoIterator<Item = (&'a String, &'a String)>) -> Needs {
        let (mut memory, mut quota, mut period) = (0, 0, 0);
        for (key, value) in annotations {
            let number = || value.trim().parse::<i64>().unwrap_or(0);
            match key.as_str() {
                "io.kubernetes.cri.sandbox-memory" => memory = number(),
                "io.kubernetes.cri.sandbox-cpu-quota" => quota = number(),
                "io.kubernetes.cri.sandbox-cpu-period" => period = number(),
                _ => {}
            }
        }
        Needs::of_pod_resources(memory, quota, period)
    }

    /// The vCPUs these limits need: enough for the quota, and for the cpuset's highest CPU.
    fn vcpus(&self) -> u32 {
        let for_cpuset = self.top_cpu.map_or(0, |top| top + 1);
        self.cpus.unwrap_or(0).max(for_cpuset)
    }
}

/// The highest CPU in a cpuset list ("0-2,4"), each number bounded.
fn top_cpu(list: &str) -> Result<u32, SizingError> {
    let bad = || SizingError::CpusetList {
        list: list.chars().take(64).collect(),
    };
    let number = |s: &str| -> Result<u32, SizingError> {
        let n: u32 = s.trim().parse().map_err(|_| bad())?;
        if n > MAX_CPU_INDEX {
            return Err(bad());
        }
        Ok(n)
    };
    let mut top = 0;
    for part in list.split(',') {
        let last = match part.split_once('-') {
            Some((from, to)) => {
                let (from, to) = (number(from)?, number(to)?);
                if from > to {
                    return Err(bad());
                }
                to
            }
            None => number(part)?,
        };
        top = top.max(last);
    }
    Ok(top)
}

/// Grows the configured VM, before it boots, to what the container that boots it needs.
pub fn grow(hv: &mut HypervisorConfig, needs: &Needs) -> Result<(), SizingError> {
    if let Some(limit_mib) = needs.memory_mib {
        let wanted = limit_mib + GUEST_RESERVE_MIB;
        if wanted > u64::from(hv.memory_mib) {
            let grown = wanted.div_ceil(MEMORY_STEP_MIB) * MEMORY_STEP_MIB;
            let max = hv.max_memory_mib();
            if grown > u64::from(max) {
                return Err(SizingError::Memory {
                    limit_mib,
                    vm: format!(
                        "it would need a VM of {grown} MiB ({GUEST_RESERVE_MIB} MiB of it the guest's own), \
                         and hypervisor.max_memory_mib in hako's configuration.toml allows {max} MiB"
                    ),
                });
            }
            // Within max_memory_mib, a u32.
            hv.memory_mib = grown as u32;
        }
    }
    let vcpus = needs.vcpus();
    if vcpus > hv.vcpus {
        let max = hv.max_vcpus();
        if vcpus > max {
            let vm = format!(
                "it would need {vcpus} vCPUs, and hypervisor.max_vcpus in hako's configuration.toml allows {max}"
            );
            return Err(match (needs.cpus, needs.top_cpu) {
                (Some(cpus), _) if cpus > max => SizingError::Cpus { cpus, vm },
                (_, Some(cpu)) => SizingError::Cpuset { cpu, vm },
                _ => SizingError::Cpus { cpus: vcpus, vm },
            });
        }
        hv.vcpus = vcpus;
    }
    Ok(())
}

/// Grows the configured VM, before it boots, towards what a Kubernetes pod's containers need
/// together, as far as the maxima allow: each container is checked against the VM when it
/// comes (`check`), and a pod whose containers share memory they would not all use at once
/// still starts.
pub fn grow_towards(hv: &mut HypervisorConfig, pod: &Needs) {
    let capped = Needs {
        memory_mib: pod.memory_mib.map(|m| {
            let room = u64::from(hv.max_memory_mib()).saturating_sub(GUEST_RESERVE_MIB);
            m.min(room)
        }),
        cpus: pod.cpus.map(|c| c.min(hv.max_vcpus())),
        top_cpu: None,
    };
    // Within the maxima, growing cannot fail; the configured size stays if it somehow did.
    let mut grown = hv.clone();
    if grow(&mut grown, &capped).is_ok() {
        *hv = grown;
    }
}

/// Checks a container against the VM its pod already runs in.
pub fn check(vcpus: u32, memory_mib: u32, needs: &Needs) -> Result<(), SizingError> {
    let raise = "give the pod a bigger VM when it starts (the annotations io.hako.vcpus and \
                 io.hako.memory_mib, within hypervisor.max_vcpus and max_memory_mib)";
    if let Some(limit_mib) = needs.memory_mib {
        if limit_mib + GUEST_RESERVE_MIB > u64::from(memory_mib) {
            return Err(SizingError::Memory {
                limit_mib,
                vm: format!(
                    "the pod's VM has {memory_mib} MiB, {GUEST_RESERVE_MIB} MiB of it the guest's own; {raise}"
                ),
            });
        }
    }
    let vm = format!("the pod's VM has {vcpus} vCPUs; {raise}");
    if let Some(cpus) = needs.cpus.filter(|c| *c > vcpus) {
        return Err(SizingError::Cpus { cpus, vm });
    }
    if let Some(cpu) = needs.top_cpu.filter(|c| *c >= vcpus) {
        return Err(SizingError::Cpuset { cpu, vm });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn needs(json: &str) -> Result<Needs, SizingError> {
        let resources: LinuxResources = serde_json::from_str(json).expect("valid resources");
        Needs::of(Some(&resources))
    }

    fn hv(vcpus: u32, memory_mib: u32, max: Option<(u32, u32)>) -> HypervisorConfig {
        HypervisorConfig {
            vcpus,
            memory_mib,
            max_vcpus: max.map(|m| m.0),
            max_memory_mib: max.map(|m| m.1),
            ..HypervisorConfig::default()
        }
    }

    #[test]
    fn limits_become_whole_mib_and_cpus() {
        let n = needs(
            r#"{"memory": {"limit": 1073741825}, "cpu": {"quota": 150000, "period": 100000, "cpus": "0-1,3"}}"#,
        )
        .expect("needs");
        assert_eq!(
            n,
            Needs {
                memory_mib: Some(1025),
                cpus: Some(2),
                top_cpu: Some(3)
            }
        );
        assert_eq!(n.vcpus(), 4);
        let none = needs(r#"{"memory": {"limit": -1}, "cpu": {"quota": -1, "period": 100000}}"#)
            .expect("unlimited");
        assert_eq!(none, Needs::default());
        assert_eq!(Needs::of(None), Ok(Needs::default()));
    }

    #[test]
    fn a_kubernetes_pod_needs_what_its_containers_need_together() {
        let annotations: std::collections::HashMap<String, String> = [
            ("io.kubernetes.cri.sandbox-memory", "1610612736"),
            ("io.kubernetes.cri.sandbox-cpu-quota", "250000"),
            ("io.kubernetes.cri.sandbox-cpu-period", "100000"),
            ("io.kubernetes.cri.sandbox-cpu-shares", "2560"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let pod = Needs::of_pod(&annotations);
        assert_eq!((pod.memory_mib, pod.cpus), (Some(1536), Some(3)));
        let garbage: std::collections::HashMap<String, String> = [
            ("io.kubernetes.cri.sandbox-memory", "-1"),
            (
                "io.kubernetes.cri.sandbox-cpu-quota",
                "999999999999999999999999",
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        assert_eq!(Needs::of_pod(&garbage), Needs::default());
    }

    #[test]
    fn a_pod_grows_its_vm_only_as_far_as_the_maxima() {
        let pod = Needs {
            memory_mib: Some(4096),
            cpus: Some(8),
            top_cpu: None,
        };
        let mut config = hv(1, 512, Some((2, 1024)));
        grow_towards(&mut config, &pod);
        assert_eq!((config.vcpus, config.memory_mib), (2, 1024));
        let mut config = hv(1, 512, None);
        grow_towards(&mut config, &pod);
        assert_eq!((config.vcpus, config.memory_mib), (1, 512));
    }

    #[test]
    fn bad_cpusets_and_other_memory_nodes_are_refused() {
        for list in ["1-", "a", "3-1", "64", "0,,1", "99999999999"] {
            let json = format!(r#"{{"cpu": {{"cpus": "{list}"}}}}"#);
            assert!(
                matches!(needs(&json), Err(SizingError::CpusetList { .. })),
                "{list}"
            );
        }
        assert_eq!(
            needs(r#"{"cpu": {"mems": "1"}}"#),
            Err(SizingError::Mems("1".to_string()))
        );
        assert!(needs(r#"{"cpu": {"mems": "0", "cpus": "63"}}"#).is_ok());
    }

    #[test]
    fn a_booting_vm_grows_within_the_maxima() {
        let mut config = hv(1, 512, Some((4, 2048)));
        let n = needs(
            r#"{"memory": {"limit": 1073741824}, "cpu": {"quota": 200000, "period": 100000}}"#,
        )
        .expect("needs");
        grow(&mut config, &n).expect("fits");
        // 1024 + 64, up to the next 128 MiB.
        assert_eq!((config.vcpus, config.memory_mib), (2, 1152));

        // A small limit leaves the configured shape, and so its template, alone.
        let mut config = hv(1, 512, Some((4, 2048)));
        let small = needs(r#"{"memory": {"limit": 268435456}}"#).expect("needs");
        grow(&mut config, &small).expect("fits");
        assert_eq!((config.vcpus, config.memory_mib), (1, 512));
    }

    #[test]
    fn a_booting_vm_past_the_maxima_is_refused_naming_the_setting() {
        let n = needs(r#"{"memory": {"limit": 1073741824}}"#).expect("needs");
        let err = grow(&mut hv(1, 512, None), &n).expect_err("past max_memory_mib");
        let text = err.to_string();
        assert!(
            text.contains("1024 MiB") && text.contains("max_memory_mib") && text.contains("512"),
            "{text}"
        );
        let n = needs(r#"{"cpu": {"cpus": "1"}}"#).expect("needs");
        let err = grow(&mut hv(1, 512, None), &n).expect_err("past max_vcpus");
        assert!(matches!(err, SizingError::Cpuset { cpu: 1, .. }), "{err}");
        assert!(err.to_string().contains("max_vcpus"), "{err}");
        let n = needs(r#"{"cpu": {"quota": 300000, "period": 100000}}"#).expect("needs");
        let err = grow(&mut hv(1, 512, Some((2, 512))), &n).expect_err("3 CPUs");
        assert!(matches!(err, SizingError::Cpus { cpus: 3, .. }), "{err}");
    }

    #[test]
    fn a_running_vm_takes_only_what_fits() {
        let fits = needs(r#"{"memory": {"limit": 469762048}, "cpu": {"quota": 100000, "period": 100000, "cpus": "0"}}"#)
            .expect("needs");
        assert_eq!(check(1, 512, &fits), Ok(()));
        let big = needs(r#"{"memory": {"limit": 470000000}}"#).expect("needs");
        let err = check(1, 512, &big).expect_err("449 MiB + the reserve");
        assert!(err.to_string().contains("io.hako.memory_mib"), "{err}");
        let cpus = needs(r#"{"cpu": {"quota": 200000, "period": 100000}}"#).expect("needs");
        assert!(matches!(
            check(1, 512, &cpus),
            Err(SizingError::Cpus { cpus: 2, .. })
        ));
        assert_eq!(check(2, 512, &cpus), Ok(()));
        let cpuset = needs(r#"{"cpu": {"cpus": "2"}}"#).expect("needs");
        assert!(matches!(
            check(2, 512, &cpuset),
            Err(SizingError::Cpuset { cpu: 2, .. })
        ));
    }
}
