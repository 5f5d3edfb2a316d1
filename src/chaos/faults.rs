//! The processes a chaos run starts (relays, consumers) and the faults it injects into them and
//! into the servers (through the user's shell commands).

use std::{net::SocketAddr, process::Stdio};

use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
};

use super::{verify::Claims, ChaosArgs, Run};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    RelayKill,
    ConsumerKill,
    /// A pause (SIGSTOP-like) or a restart, alternately, as the commands allow.
    Broker,
    DatabaseRestart,
}

struct Proc {
    child: Child,
    metrics: Option<SocketAddr>,
}

pub struct Faults {
    args: ChaosArgs,
    run: Run,
    exe: std::path::PathBuf,
    relays: Vec<Proc>,
    consumers: Vec<Proc>,
    kinds: Vec<Fault>,
    turn: usize,
    rng: u64,
    started: u32,
    pub relay_kills: u32,
    pub consumer_kills: u32,
    pub broker_pauses: u32,
    pub broker_restarts: u32,
    pub database_restarts: u32,
    pub exited: u32,
    /// Claims counted by consumers already killed.
    gone: Claims,
}

impl Faults {
    pub fn start(args: &ChaosArgs, run: &Run) -> anyhow::Result<Self> {
        let mut kinds = vec![Fault::RelayKill, Fault::ConsumerKill];
        if args.broker_pause.is_some() || args.broker_restart.is_some() {
            kinds.push(Fault::Broker);
        }
        let mut f = Faults {
            args: args.clone(),
            run: run.clone(),
            exe: std::env::current_exe()?,
            relays: Vec::new(),
            consumers: Vec::new(),
            kinds,
            turn: 0,
            rng: 0x9E37_79B9_7F4A_7C15,
            started: 0,
            relay_kills: 0,
            consumer_kills: 0,
            broker_pauses: 0,
            broker_restarts: 0,
            database_restarts: 0,
            exited: 0,
            gone: Claims::default(),
        };
        for _ in 0..args.relays {
            let p = f.spawn_relay()?;
            f.relays.push(p);
        }
        Ok(f)
    }

    /// Consumers start once their metrics address is known.
    pub async fn start_consumers(&mut self) -> anyhow::Result<()> {
        for i in 0..self.args.consumers {
            let p = self.spawn_consumer(i).await?;
            self.consumers.push(p);
        }
        Ok(())
    }

    pub fn kinds(&self) -> &[Fault] {
        &self.kinds
    }

    pub fn next_kind(&mut self) -> Fault {
        let k = self.kinds[self.turn % self.kinds.len()];
        self.turn += 1;
        k
    }

    /// Every enabled kind happened `n` times at least (the database restart once, if asked).
    pub fn reached(&self, n: u32) -> bool {
        let broker = self.broker_pauses + self.broker_restarts;
        self.kinds.iter().all(|k| match k {
            Fault::RelayKill => self.relay_kills >= n,
            Fault::ConsumerKill => self.consumer_kills >= n,
            Fault::Broker => broker >= n,
            Fault::DatabaseRestart => true,
        }) && (self.args.database_restart.is_none() || self.database_restarts >= 1)
    }

    fn random(&mut self, below: usize) -> usize {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        (self.rng % below.max(1) as u64) as usize
    }

    /// Inject one fault; false when it could not be (the command failed, a process would not start).
    pub async fn inject(&mut self, fault: Fault) -> bool {
        let r = match fault {
            Fault::RelayKill => self.kill_relay().await,
            Fault::ConsumerKill => self.kill_consumer().await,
            Fault::Broker => self.broker().await,
            Fault::DatabaseRestart => {
                let r = shell(self.args.database_restart.as_deref().unwrap_or("true")).await;
                self.database_restarts += u32::from(r.is_ok());
                r
            }
        };
        match r {
            Ok(()) => true,
            Err(e) => {
                eprintln!("chaos: {fault:?} failed: {e}");
                false
            }
        }
    }

    async fn kill_relay(&mut self) -> anyhow::Result<()> {
        let i = self.random(self.relays.len());
        self.relays[i].child.kill().await?; // SIGKILL, then reaped
        self.relay_kills += 1;
        self.relays[i] = self.spawn_relay()?;
        Ok(())
    }

    async fn kill_consumer(&mut self) -> anyhow::Result<()> {
        let i = self.random(self.consumers.len());
        // What it counted so far; claims it commits between this scrape and the kill are lost to
        // the printed ratios (not to the checks, which count effects in the database).
        if let Some(addr) = self.consumers[i].metrics {
            self.gone.add(&Claims::scrape(addr).await.unwrap_or_default());
        }
        self.consumers[i].child.kill().await?;
        self.consumer_kills += 1;
        self.consumers[i] = self.spawn_consumer(i).await?;
        Ok(())
    }

    async fn broker(&mut self) -> anyhow::Result<()> {
        let pause = match (&self.args.broker_pause, &self.args.broker_restart) {
            (Some(_), Some(_)) => (self.broker_pauses + self.broker_restarts).is_multiple_of(2),
            (Some(_), None) => true,
            _ => false,
        };
        if pause {
            shell(self.args.broker_pause.as_deref().unwrap_or("true")).await?;
            let held = std::time::Duration::from_millis(1000 + self.random(2000) as u64);
            tokio::time::sleep(held).await;
            let resume = self.args.broker_resume.as_deref().unwrap_or("true");
            if shell(resume).await.is_err() {
                // A broker left paused would fail the run for a reason of the run's own.
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                shell(resume).await?;
            }
            self.broker_pauses += 1;
        } else {
            shell(self.args.broker_restart.as_deref().unwrap_or("true")).await?;
            self.broker_restarts += 1;
        }
        Ok(())
    }

    pub fn summary(&self) -> String {
        format!(
            "relay SIGKILLs {}, consumer SIGKILLs {}, broker pauses {} and restarts {}, database restarts {}; processes that exited by themselves {}",
            self.relay_kills, self.consumer_kills, self.broker_pauses, self.broker_restarts, self.database_restarts, self.exited
        )
    }

    /// Start again a relay or consumer that exited by itself (a consumer gives up when the broker
    /// is away at its start, say), and count it: the run reports it rather than waiting for
    /// effects nobody is applying.
    pub async fn restart_exited(&mut self) -> anyhow::Result<()> {
        for i in 0..self.relays.len() {
            if let Some(st) = self.relays[i].child.try_wait()? {
                eprintln!("chaos: relay exited by itself ({st}); started again");
                self.exited += 1;
                self.relays[i] = self.spawn_relay()?;
            }
        }
        for i in 0..self.consumers.len() {
            if let Some(st) = self.consumers[i].child.try_wait()? {
                eprintln!("chaos: consumer exited by itself ({st}); started again");
                self.exited += 1;
                self.consumers[i] = self.spawn_consumer(i).await?;
            }
        }
        Ok(())
    }

    /// Claims over every consumer that ran: the killed ones' last scrape plus the running ones.
    pub async fn scrape_all(&self) -> Claims {
        let mut total = self.gone.clone();
        for c in &self.consumers {
            if let Some(addr) = c.metrics {
                total.add(&Claims::scrape(addr).await.unwrap_or_default());
            }
        }
        total
    }

    pub async fn stop(&mut self) {
        for p in self.relays.iter_mut().chain(self.consumers.iter_mut()) {
            let _ = p.child.kill().await;
        }
    }

    fn log(&mut self, what: &str) -> anyhow::Result<std::fs::File> {
        self.started += 1;
        Ok(std::fs::File::create(
            self.args.work_dir.join(format!("{what}-{}.log", self.started)),
        )?)
    }

    fn command(&mut self, what: &str) -> anyhow::Result<Command> {
        let mut c = Command::new(&self.exe);
        c.env("DATABASE_URL", &self.args.database_url)
            .env("KAFKA_BOOTSTRAP_SERVERS", &self.args.bootstrap_servers)
            .env("NATS_URL", &self.args.nats_url)
            .env("AMQP_URL", &self.args.amqp_url)
            .env("LOCKSTEP_AMQP_EXCHANGE", super::amqp_consumer::EXCHANGE)
            .env("LOCKSTEP_BROKER", format!("{:?}", self.args.broker).to_lowercase())
            .env("RUST_LOG", "info,sqlx=warn")
            .stderr(self.log(what)?)
            .kill_on_drop(true);
        Ok(c)
    }

    fn spawn_relay(&mut self) -> anyhow::Result<Proc> {
        let mut c = self.command("relay")?;
        c.args([
            "relay",
            "--schema",
            &self.run.schema,
            "--table",
            "outbox",
            "--topic",
            &self.run.topic,
        ])
        .args(["--metrics-addr", "127.0.0.1:0", "--poll-interval", "200ms"])
        .stdout(Stdio::null());
        Ok(Proc {
            child: c.spawn()?,
            metrics: None,
        })
    }

    async fn spawn_consumer(&mut self, i: usize) -> anyhow::Result<Proc> {
        let partitions: Vec<String> = (0..self.args.partitions)
            .filter(|p| *p as usize % self.args.consumers == i)
            .map(|p| p.to_string())
            .collect();
        let mut c = self.command("consumer")?;
        let broker = format!("{:?}", self.args.broker).to_lowercase();
        c.args([
            "chaos-consumer",
            "--broker",
            &broker,
            "--schema",
            &self.run.schema,
            "--topic",
            &self.run.topic,
        ])
        .args(["--group", &self.run.group, "--partitions", &partitions.join(",")])
        .stdout(Stdio::piped());
        let mut child = c.spawn()?;
        let out = child.stdout.take().ok_or_else(|| anyhow::anyhow!("no stdout"))?;
        let mut lines = BufReader::new(out).lines();
        let first = tokio::time::timeout(std::time::Duration::from_secs(30), lines.next_line()).await;
        let metrics = match first {
            Ok(Ok(Some(l))) => l.strip_prefix("metrics ").and_then(|a| a.trim().parse().ok()),
            _ => None,
        };
        Ok(Proc { child, metrics })
    }
}

/// Run a user's fault command; its failure is reported, not fatal.
async fn shell(cmd: &str) -> anyhow::Result<()> {
    let st = Command::new("sh").arg("-c").arg(cmd).status().await?;
    anyhow::ensure!(st.success(), "`{cmd}` exited with {st}");
    Ok(())
}
