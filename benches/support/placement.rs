//! Where a bench's processes run, shared by the benches that compare placements.

/// `Shared`: everything on every core, as a one-machine install has it. `Split`: PostgreSQL and
/// the writers on the first core, the relay (or whatever publishes) and the broker on the second,
/// as a deployment has them (the relay in its own pod, the broker on its own machines).
/// `BrokerApart`: the broker alone on the second core, everything else on the first (the
/// broker on machines of its own, the relay and the service sharing theirs).
#[derive(Clone, Copy, PartialEq, Debug)]
pub enum Placement {
    Shared,
    Split,
    BrokerApart,
}

impl Placement {
    pub fn describe(self) -> &'static str {
        match self {
            Placement::Shared => "every process on both cores",
            Placement::Split => "PostgreSQL and the writers on core 0, the relay and the broker on core 1",
            Placement::BrokerApart => "the broker alone on core 1, PostgreSQL, the writers and the relay on core 0",
        }
    }

    /// The cores of the side that publishes (the relay, a producer).
    pub fn publisher_cpus(self) -> Vec<usize> {
        match self {
            Placement::Shared => all_cpus(),
            Placement::Split => vec![1],
            Placement::BrokerApart => vec![0],
        }
    }

    /// The relay needs a runtime of its own, on its own cores.
    pub fn own_runtime(self) -> bool {
        self == Placement::Split
    }
}

fn all_cpus() -> Vec<usize> {
    (0..std::thread::available_parallelism().map_or(2, |n| n.get()).max(2)).collect()
}

/// Pin one thread (or process: a pid is its main thread's id) to `cpus`; with `all_threads`,
/// each of its threads. Threads created later inherit the mask of the thread that creates them.
pub fn pin(pid: i32, cpus: &[usize], all_threads: bool) {
    let tids: Vec<i32> = if all_threads {
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .collect()
    } else {
        vec![pid]
    };
    for tid in tids {
        // SAFETY: a zeroed cpu_set_t is the empty set; CPU_SET writes inside it.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            for &c in cpus {
                libc::CPU_SET(c, &mut set);
            }
            libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set);
        }
    }
}

/// Every process named `comm` (PostgreSQL's postmaster and backends, tansu), pinned with all
/// its threads.
fn pin_processes(comm: &str, cpus: &[usize]) {
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|p| p.parse::<i32>().ok()) else {
            continue;
        };
        if std::fs::read_to_string(entry.path().join("comm")).is_ok_and(|c| c.trim() == comm) {
            pin(pid, cpus, true);
        }
    }
}

/// Place the processes for `placement`; `Shared` undoes a `Split`. PostgreSQL's backends started
/// later inherit the postmaster's mask.
pub fn place(placement: Placement) {
    let all = all_cpus();
    let (db, broker): (&[usize], &[usize]) = match placement {
        Placement::Shared => (&all, &all),
        Placement::Split | Placement::BrokerApart => (&[0], &[1]),
    };
    pin_processes("postgres", db);
    pin_processes("tansu", broker);
    // This process's threads so far are the writers' runtime.
    pin(std::process::id() as i32, db, true);
}

/// A runtime for the relay whose threads (and the producer's, which they start) run on the
/// publisher's cores.
pub fn relay_runtime(placement: Placement) -> tokio::runtime::Runtime {
    let cpus = placement.publisher_cpus();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .on_thread_start(move || pin(0, &cpus, false))
        .build()
        .unwrap()
}

/// `make()` run on a thread of the publisher's cores: a Kafka client made there keeps its
/// librdkafka threads there.
#[allow(dead_code)] // benches/relay.rs; benches/throughput.rs runs no producer of its own when split
pub fn on_publisher<T: Send + 'static>(placement: Placement, make: impl FnOnce() -> T + Send + 'static) -> T {
    let cpus = placement.publisher_cpus();
    std::thread::spawn(move || {
        pin(0, &cpus, false);
        make()
    })
    .join()
    .unwrap()
}
