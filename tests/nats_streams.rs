//! The stream plan carried out against a real nats-server: created, drift found and reverted
//! (ignored settings kept), a storage change refused, a consumer's backlog read.

mod common;

use std::{collections::BTreeMap, time::Duration};

use lockstep::{
    crd::{DesiredStream, Discard, StreamStorage},
    operator::policy::streams::{plan, Action},
};

async fn apply(a: &lockstep::clients::nats_admin::NatsAdmin, d: &DesiredStream) -> lockstep::operator::policy::streams::Plan {
    let observed: BTreeMap<_, _> = a
        .describe(&d.name)
        .await
        .unwrap()
        .map(|o| (d.name.clone(), o))
        .into_iter()
        .collect();
    let p = plan(std::slice::from_ref(d), &observed);
    for action in &p.actions {
        match action {
            Action::Create(d) => a.create(d).await.unwrap(),
            Action::Update(d) => a.update(d).await.unwrap(),
        }
    }
    p
}

#[tokio::test]
async fn streams_are_created_kept_to_the_spec_and_refused_what_the_server_cannot_change() {
    let a = common::broker::nats_admin().await;
    let name = common::unique("streams").replace('.', "_");
    let mut d = DesiredStream {
        name: name.clone(),
        subjects: vec![format!("{name}.>")],
        storage: StreamStorage::File,
        replicas: 1,
        max_age: Duration::from_secs(86400),
        duplicate_window: Duration::from_secs(120),
        discard: Discard::Old,
        max_bytes: None,
        ignore: Default::default(),
    };
    assert!(a.describe(&name).await.unwrap().is_none());
    assert_eq!(apply(&a, &d).await.actions.len(), 1, "created");
    assert!(apply(&a, &d).await.actions.is_empty(), "as the spec wants it");

    // Someone shortens maxAge and the dedup window: reported and reverted.
    let mut changed = d.clone();
    (changed.max_age, changed.duplicate_window) = (Duration::from_secs(3600), Duration::from_secs(10));
    a.update(&changed).await.unwrap();
    let p = apply(&a, &d).await;
    assert_eq!(p.drift[&name], ["maxAge: 1h -> 1d", "duplicateWindow: 10s -> 2m"]);
    let o = a.describe(&name).await.unwrap().unwrap();
    assert_eq!((o.max_age, o.duplicate_window), (d.max_age, d.duplicate_window));

    // Owned elsewhere: kept as the server has it.
    a.update(&changed).await.unwrap();
    d.ignore.insert("maxAge".into());
    apply(&a, &d).await;
    let o = a.describe(&name).await.unwrap().unwrap();
    assert_eq!((o.max_age, o.duplicate_window), (Duration::from_secs(3600), d.duplicate_window));

    // Storage is fixed once the stream exists: refused, nothing sent to the server.
    d.storage = StreamStorage::Memory;
    let p = apply(&a, &d).await;
    assert!(p.actions.is_empty() && p.refusals.len() == 1, "{p:?}");
    assert_eq!(a.describe(&name).await.unwrap().unwrap().storage, StreamStorage::File);

    // A durable consumer's backlog: three messages not yet delivered.
    let js = async_nats::jetstream::new(async_nats::connect(common::env("NATS_URL")).await.unwrap());
    for i in 0..3 {
        js.publish(format!("{name}.x"), format!("{i}").into()).await.unwrap().await.unwrap();
    }
    let stream = js.get_stream(&name).await.unwrap();
    stream
        .create_consumer(async_nats::jetstream::consumer::pull::Config {
            durable_name: Some("c".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    let b = a.consumer_backlog(&name, "c").await.unwrap();
    assert_eq!((b.pending, b.ack_pending), (3, 0));
    a.delete(&name).await.unwrap();
}
