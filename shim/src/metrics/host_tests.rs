use std::fs;

use super::*;
use crate::daemon::Stat;
use crate::metrics::test_dir::TempDir;

const STAT: &str = "4242 (qemu) system-x86 (x)) S 1 4242 4242 0 -1 4194560 9 0 0 0 \
                    250 150 0 0 20 0 5 0 777 1000000 200 18446744073709551615\n";

const STATUS: &str = "Name:\tqemu\nVmPeak:\t  900 kB\nVmRSS:\t    5120 kB\nRssAnon:\t 100 kB\n";

const SMAPS: &str = "00400000-ffffffffff600000 ---p 00000000 00:00 0 [rollup]\n\
                     Rss:                8192 kB\nPss:                2048 kB\nPss_Anon:  1 kB\n";

#[test]
fn stat_fields_are_counted_after_the_last_parenthesis() {
    assert_eq!(
        parse_stat(STAT),
        Some(Stat {
            cpu_ticks: 400,
            start_time: 777
        })
    );
    for garbled in [
        "",
        "4242 qemu S 1",
        "4242 (qemu) S 1 2 3",
        "4242 (q) S 1 4242 4242 0 -1 0 9 0 0 0 x 150 0 0 20 0 5 0 777",
        "4242 (q) S 1 4242 4242 0 -1 0 9 0 0 0 18446744073709551615 1 0 0 20 0 5 0 777",
    ] {
        assert_eq!(parse_stat(garbled), None, "{garbled:?}");
    }
}

#[test]
fn kb_lines_are_read_in_bytes_and_anything_else_is_absent() {
    assert_eq!(parse_kb_line(STATUS, "VmRSS"), Some(5120 * 1024));
    assert_eq!(parse_kb_line(SMAPS, "Pss"), Some(2048 * 1024));
    // `Pss_Anon:` must not answer for `Pss:`.
    assert_eq!(parse_kb_line("Pss_Anon: 1 kB\n", "Pss"), None);
    for garbled in [
        "",
        "VmRSS:\n",
        "VmRSS: x kB\n",
        "VmRSS: 5 MB\n",
        "VmRSS: -5 kB\n",
        "VmRSS: 18446744073709551615 kB\n",
    ] {
        assert_eq!(parse_kb_line(garbled, "VmRSS"), None, "{garbled:?}");
    }
}

#[test]
fn pid_files_need_a_pid_and_a_start_time() {
    assert_eq!(parse_pid_file("4242 777\n"), Some((4242, 777)));
    for bad in ["", "4242", "1 777", "0 1", "x 777", "4242 x", "-3 7"] {
        assert_eq!(parse_pid_file(bad), None, "{bad:?}");
    }
}

#[test]
fn the_test_process_reads_as_the_shim() {
    let dir = TempDir::new("host-self");
    let readings = HostReader::new(dir.path()).read();
    assert_eq!(readings.len(), 1, "{readings:?}");
    let me = &readings[0];
    assert_eq!(me.process, HostProcess::Shim);
    assert!(me.cpu_seconds >= 0.0);
    assert!(me.rss_bytes.is_some_and(|b| b > 1024 * 1024), "{me:?}");
    // smaps_rollup needs Linux 4.14; every host hako supports has it.
    assert!(me.pss_bytes.is_some_and(|b| b > 0), "{me:?}");
}

/// A sandbox dir with `vmm.pid` and a fake `/proc/4242`.
fn fixture(pid_file: &str, stat: &str) -> (TempDir, HostReader) {
    let dir = TempDir::new("host-fixture");
    let proc_dir = dir.path().join("proc/4242");
    fs::create_dir_all(&proc_dir).expect("mkdir");
    fs::write(dir.path().join("vmm.pid"), pid_file).expect("pid file");
    fs::write(proc_dir.join("stat"), stat).expect("stat");
    fs::write(proc_dir.join("status"), STATUS).expect("status");
    fs::write(proc_dir.join("smaps_rollup"), SMAPS).expect("smaps");
    let reader = HostReader::with_proc(dir.path(), &dir.path().join("proc"));
    (dir, reader)
}

#[test]
fn fixture_process_is_read_and_pss_is_cached() {
    let (dir, reader) = fixture("4242 777\n", STAT);
    let now = Instant::now();
    let r = reader.read_one(HostProcess::Vmm, now).expect("read");
    assert_eq!(r.cpu_seconds, 400.0 / reader.clk_tck);
    assert_eq!(r.rss_bytes, Some(5120 * 1024));
    assert_eq!(r.pss_bytes, Some(2048 * 1024));
    let smaps = dir.path().join("proc/4242/smaps_rollup");
    fs::write(&smaps, "Pss: 1 kB\n").expect("smaps");
    let cached = reader.read_one(HostProcess::Vmm, now + Duration::from_secs(1));
    assert_eq!(cached.and_then(|r| r.pss_bytes), Some(2048 * 1024));
    let due = reader.read_one(HostProcess::Vmm, now + PSS_INTERVAL);
    assert_eq!(due.and_then(|r| r.pss_bytes), Some(1024));
}

#[test]
fn a_recycled_pid_is_not_reported() {
    let (_dir, reader) = fixture("4242 776\n", STAT);
    assert_eq!(reader.read_one(HostProcess::Vmm, Instant::now()), None);
}

#[test]
fn missing_and_oversized_files_make_values_absent() {
    let (dir, reader) = fixture("4242 777\n", STAT);
    let proc_dir = dir.path().join("proc/4242");
    fs::remove_file(proc_dir.join("smaps_rollup")).expect("rm");
    let big = format!("VmRSS: 1 kB\n{}", "x".repeat(MAX_PROC_FILE as usize));
    fs::write(proc_dir.join("status"), big).expect("status");
    let r = reader
        .read_one(HostProcess::Vmm, Instant::now())
        .expect("read");
    assert_eq!((r.rss_bytes, r.pss_bytes), (None, None));
    // No pid file (virtiofsd with 9p, no hako-vsock under Cloud Hypervisor): no reading.
    assert_eq!(
        reader.read_one(HostProcess::Virtiofsd, Instant::now()),
        None
    );
    fs::write(proc_dir.join("stat"), "garbage").expect("stat");
    assert_eq!(reader.read_one(HostProcess::Vmm, Instant::now()), None);
}

#[test]
fn samples_are_valid_for_the_snapshot() {
    let (_dir, reader) = fixture("4242 777\n", STAT);
    let samples = reader.samples();
    let families: Vec<_> = samples.iter().map(|s| s.family.as_str()).collect();
    assert!(
        families.contains(&"hako_host_process_pss_bytes"),
        "{families:?}"
    );
    crate::metrics::Snapshot::new(samples)
        .validate()
        .expect("valid");
}
