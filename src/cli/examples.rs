//! The examples each `lockstep <command> --help` ends with (pinned: every command has some).

pub const OPERATOR: &str = "Examples:
  # In a cluster: the Helm chart runs this (charts/lockstep). Outside one, against KUBECONFIG:
  lockstep operator --leader-election=false --watch-namespace=shop
  # Relays of OutboxRelays without spec.relay.image run this image:
  lockstep operator --relay-image=registry.example/lockstep:0.1.0";

pub const RELAY: &str = "Examples:
  DATABASE_URL=postgres://relay@db:5432/shop lockstep relay --bootstrap-servers=kafka:9092
  # A topic per aggregate type, the key column aggregateid, SASL from a mounted Secret:
  lockstep relay --database-url-file=/secrets/db/url --topic='orders.{aggregatetype}' \\
    --key=aggregateid --kafka-config-dir=/secrets/kafka
  # Only verify the tables (the role may not create them):
  lockstep relay --manage-schema=false --schema=billing --table=outbox";

pub const REPLAY: &str = "Examples:
  # Replay two dead-lettered events, after fixing what made the broker refuse them:
  lockstep replay --database-url-file=/secrets/db/url --table=outbox --id=7f9c... --id=0a12...
  # Replay every dead-lettered event:
  lockstep replay --all";

pub const CHAOS: &str = "Examples:
  lockstep chaos --database-url=postgres://postgres@127.0.0.1:5432/postgres \\
    --bootstrap-servers=127.0.0.1:9092 --events=10000 --faults=5
  # With broker faults (scripts/chaos does this against the test environment):
  lockstep chaos --broker-pause='kill -STOP 1234' --broker-resume='kill -CONT 1234' ...

Exit status: 0 every committed effect applied once in per-key order, 1 the run found a violation,
2 the run could not be carried out.";

pub const CRDS: &str = "Examples:
  lockstep crds > crds.yaml
  lockstep crds --apply          # server-side apply to KUBECONFIG's cluster, wait for Established
  lockstep crds --out crds/ && lockstep crds --helm charts/lockstep/templates/crds";

pub const DOCTOR: &str = "Examples:
  # Before creating an OutboxRelay: the database URL and Kafka settings it would use.
  lockstep doctor --database-url-file=/secrets/db/url --schema=billing --table=outbox \\
    --bootstrap-servers=kafka:9092 --kafka-config-dir=/secrets/kafka --topic=orders
  # An InboxTable whose role may not create tables, with its consumer group:
  lockstep doctor --for=inbox-table --table=inbox --manage-schema=false --group=billing
  # Machine-readable:
  lockstep doctor --output=json

Exit status: 0 no check failed (warnings allowed), 1 a check failed, 2 the checks could not run.";

pub const COMPLETIONS: &str = "Examples:
  lockstep completions bash > /etc/bash_completion.d/lockstep
  lockstep completions zsh > \"${fpath[1]}/_lockstep\"
  lockstep completions fish > ~/.config/fish/completions/lockstep.fish";
