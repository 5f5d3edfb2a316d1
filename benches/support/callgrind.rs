//! Instructions a child process of the bench runs, counted by valgrind's callgrind (`perf stat`
//! reports `<not supported>` on these VMs): the bench runs itself again with INSTR_CHILD = mode.

use std::process::Command;

/// Instructions of one child run of `mode` publishing `n` events, with `env` set.
pub fn counted(mode: &str, n: u64, env: &[(&str, &str)]) -> u64 {
    let out = std::env::temp_dir().join(format!("lockstep-callgrind-{}", uuid::Uuid::new_v4().simple()));
    let status = Command::new("valgrind")
        .args(["--tool=callgrind", "--quiet"])
        .arg(format!("--callgrind-out-file={}", out.display()))
        .arg(std::env::current_exe().unwrap())
        .env("INSTR_CHILD", mode)
        .env("INSTR_N", n.to_string())
        .envs(env.iter().copied())
        .status()
        .expect("valgrind (apt-get install valgrind)");
    assert!(status.success(), "{mode} under callgrind: {status}");
    let text = std::fs::read_to_string(&out).unwrap();
    // Kept for callgrind_annotate when asked.
    match std::env::var("BENCH_CALLGRIND_KEEP") {
        Ok(dir) => {
            let kept = std::path::Path::new(&dir).join(format!("callgrind.{mode}.{n}.{}", std::process::id()));
            let _ = std::fs::create_dir_all(&dir).and_then(|_| std::fs::rename(&out, &kept));
        }
        Err(_) => {
            let _ = std::fs::remove_file(&out);
        }
    }
    text.lines()
        .find_map(|l| l.strip_prefix("summary: ").or_else(|| l.strip_prefix("totals: ")))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("callgrind's summary line")
}
