//! One object per table. The table is claimed in the database (`schema::claim`) once it is
//! migrated; a table held by another object that still exists is a ResourceConflict, and this
//! object leaves it alone: no purge, no relay, no topics, and its cleanup drops nothing. A holder
//! that no longer exists in this cluster (deleted with deletionPolicy Retain) is taken over.

use k8s_openapi::{api::core::v1::Namespace, apimachinery::pkg::apis::meta::v1::ObjectMeta};
use kube::{api::Api, Resource, ResourceExt};
use sqlx::PgConnection;

use super::{deps::db_reason, Context};
use crate::{
    core::sql::QualifiedName,
    crd::{InboxTable, OutboxRelay},
    operator::conditions::{condition, Cond, Reason},
    tables::schema::{self, Claimed, Owner, OWNERS_TABLE},
};

/// The cluster's identity: the kube-system namespace's uid (the usual cluster id).
static CLUSTER: tokio::sync::OnceCell<String> = tokio::sync::OnceCell::const_new();

async fn cluster(ctx: &Context) -> Result<String, kube::Error> {
    let id = CLUSTER
        .get_or_try_init(|| async {
            let ns: Api<Namespace> = Api::all(ctx.client.clone());
            Ok::<_, kube::Error>(ns.get_metadata("kube-system").await?.uid().unwrap_or_default())
        })
        .await?;
    Ok(id.clone())
}

/// `obj` as a table owner.
pub async fn me<K: Resource<DynamicType = ()>>(ctx: &Context, obj: &K) -> Result<Owner, Cond> {
    // Not a conflict: nothing is stopped for it, the claim is tried again at the next reconcile.
    let cluster = cluster(ctx).await.map_err(|e| {
        Cond::unknown(
            condition::SCHEMA_READY,
            Reason::DatabaseError,
            format!("cannot read the cluster's identity (namespace kube-system) to claim the table: {e}"),
        )
    })?;
    Ok(Owner {
        cluster,
        kind: K::kind(&()).into_owned(),
        namespace: obj.namespace().unwrap_or_default(),
        name: obj.name_any(),
        uid: obj.uid().unwrap_or_default(),
    })
}

/// Claim `table` for `obj`, taking it over from a holder that no longer exists here.
pub async fn claim<K: Resource<DynamicType = ()>>(
    ctx: &Context,
    conn: &mut PgConnection,
    table: &QualifiedName,
    manage: bool,
    obj: &K,
    location: &str,
) -> Result<(), Cond> {
    let me = me(ctx, obj).await?;
    let failed = |e: sqlx::Error| {
        Cond::no(
            condition::SCHEMA_READY,
            db_reason(&e),
            format!("{location}: cannot record the owner of {table}: {e}"),
        )
    };
    let holder = match schema::claim(conn, table, &me, manage).await.map_err(failed)? {
        Claimed::Ours | Claimed::Untracked => return Ok(()),
        Claimed::Held(h) => h,
    };
    let gone = holder.cluster == me.cluster && !exists(ctx, &holder).await.unwrap_or(true);
    if gone && schema::take_over(conn, table, &me, &holder).await.map_err(failed)? {
        tracing::info!(%table, from = %holder.describe(), "took over a table whose owner no longer exists");
        return Ok(());
    }
    Err(conflict(table, &holder, &me))
}

/// The object still exists (by name; metadata only, so a malformed one counts too).
async fn exists(ctx: &Context, o: &Owner) -> Result<bool, kube::Error> {
    let found = match o.kind.as_str() {
        "InboxTable" => Api::<InboxTable>::namespaced(ctx.client.clone(), &o.namespace)
            .get_metadata_opt(&o.name)
            .await?
            .is_some(),
        "OutboxRelay" => Api::<OutboxRelay>::namespaced(ctx.client.clone(), &o.namespace)
            .get_metadata_opt(&o.name)
            .await?
            .is_some(),
        _ => true,
    };
    Ok(found)
}

/// SchemaReady when another object holds the table. Pure.
pub fn conflict(table: &QualifiedName, holder: &Owner, me: &Owner) -> Cond {
    let whose = if holder.cluster == me.cluster {
        format!("{}, which claimed it first", holder.describe())
    } else {
        format!("{} of another cluster (kube-system uid {})", holder.describe(), holder.cluster)
    };
    let release = if holder.cluster == me.cluster {
        String::new()
    } else {
        format!(
            "; if that object is gone, release the table with: delete from {} where table_schema = '{}' and table_name = '{}'",
            schema::owners_table(&table.schema),
            table.schema.as_str(),
            table.table.as_str()
        )
    };
    Cond::no(
        condition::SCHEMA_READY,
        Reason::ResourceConflict,
        format!(
            "{table} is managed by {whose}; this object leaves it alone (no purge, no relay, no cleanup). \
             Delete one of the two, or point spec.database at another table{release}"
        ),
    )
}

/// The object lost its table to another the last time it looked (SchemaReady said so): until a
/// claim says otherwise it runs nothing and cleans nothing up.
pub fn was_conflicted(conditions: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition]) -> bool {
    conditions.iter().any(lost)
}

/// A previous SchemaReady that said another object holds the table.
fn lost(c: &k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition) -> bool {
    c.type_ == condition::SCHEMA_READY && Reason::parse(&c.reason) == Some(Reason::ResourceConflict)
}

/// SchemaReady of an object that lost its table and cannot claim again now (its database is
/// away, its Secret gone): still the conflict, with what keeps it from looking again, so nothing
/// runs for it and its cleanup touches nothing until a claim says otherwise. Pure.
pub fn sticky(previous: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition], now: Cond) -> Cond {
    const SINCE: &str = " (cannot claim again now: ";
    if now.status == crate::operator::conditions::Status::True || now.reason == Reason::ResourceConflict {
        return now;
    }
    match previous.iter().find(|c| lost(c)) {
        Some(c) => {
            let base = c.message.split(SINCE).next().unwrap_or_default();
            Cond::no(
                condition::SCHEMA_READY,
                Reason::ResourceConflict,
                format!("{base}{SINCE}{})", now.message),
            )
        }
        None => now,
    }
}

/// The table's owner when it is another object than `obj`: its cleanup must not touch the table.
pub async fn other_owner<K: Resource<DynamicType = ()>>(
    ctx: &Context,
    conn: &mut PgConnection,
    table: &QualifiedName,
    obj: &K,
) -> Result<Option<Owner>, String> {
    let me = me(ctx, obj).await.map_err(|c| c.message)?;
    let holder = schema::holder(conn, table)
        .await
        .map_err(|e| format!("cannot read the owner of {table} from {OWNERS_TABLE}: {e}"))?;
    Ok(holder.filter(|h| !h.same_object(&me)))
}

/// Who holds a child object named as `obj`'s (`<name>-relay`) when `obj` does not control it
/// (no ownerReference with its uid and controller true): its controller, or that it was made
/// outside lockstep. None when it is `obj`'s. Pure.
pub fn foreign_holder(meta: &ObjectMeta, uid: &str) -> Option<String> {
    let refs = meta.owner_references.as_deref().unwrap_or_default();
    if refs.iter().any(|o| o.controller == Some(true) && o.uid == uid) {
        return None;
    }
    Some(match refs.iter().find(|o| o.controller == Some(true)) {
        Some(o) => format!("controlled by {} {} (uid {})", o.kind, o.name, o.uid),
        None => "created outside lockstep".to_owned(),
    })
}

/// RelayAvailable when `<kind> ns/name` is not this object's: nothing is applied over it. Pure.
pub fn foreign_child(kind: &str, ns: &str, name: &str, holder: &str) -> Cond {
    Cond::no(
        condition::RELAY_AVAILABLE,
        Reason::ResourceConflict,
        format!(
            "{kind} {ns}/{name} exists and is not this OutboxRelay's ({holder}); lockstep neither changes nor deletes it. \
             Delete or rename it, or give this OutboxRelay another name"
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::operator::conditions::Status;

    fn owner(cluster: &str, name: &str) -> Owner {
        Owner {
            cluster: cluster.into(),
            kind: "InboxTable".into(),
            namespace: "shop".into(),
            name: name.into(),
            uid: format!("uid-{name}"),
        }
    }

    #[test]
    fn a_lost_table_stays_lost_until_a_claim_says_otherwise() {
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
        let t = crate::tables::schema::qualified("billing", "inbox");
        let lost = conflict(&t, &owner("c1", "first"), &owner("c1", "second"));
        let previous = vec![Condition {
            type_: lost.type_.into(),
            status: "False".into(),
            reason: lost.reason.as_str().into(),
            message: lost.message.clone(),
            last_transition_time: Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
            observed_generation: None,
        }];
        let down = Cond::no(condition::SCHEMA_READY, Reason::DatabaseUnreachable, "db:5432/x: refused");
        let c = sticky(&previous, down.clone());
        assert_eq!(c.reason, Reason::ResourceConflict);
        assert!(
            c.message.starts_with(&lost.message) && c.message.ends_with("(cannot claim again now: db:5432/x: refused)"),
            "{}",
            c.message
        );
        // Said again, the reason is not repeated.
        let mut again = previous.clone();
        again[0].message = c.message.clone();
        assert_eq!(sticky(&again, down.clone()).message, c.message);
        let ok = Cond::yes(condition::SCHEMA_READY, Reason::SchemaUpToDate, "ok");
        assert_eq!(sticky(&previous, ok.clone()), ok, "a claim that succeeds ends it");
        assert_eq!(sticky(&[], down.clone()), down);
    }

    #[test]
    fn a_conflict_names_the_holder_and_how_to_resolve_it() {
        let t = crate::tables::schema::qualified("billing", "inbox");
        let c = conflict(&t, &owner("c1", "first"), &owner("c1", "second"));
        assert_eq!((c.status, c.reason), (Status::False, Reason::ResourceConflict));
        assert_eq!(
            c.message,
            r#""billing"."inbox" is managed by InboxTable shop/first, which claimed it first; this object leaves it alone (no purge, no relay, no cleanup). Delete one of the two, or point spec.database at another table"#
        );
        let c = conflict(&t, &owner("c2", "first"), &owner("c1", "second"));
        assert!(
            c.message.contains("InboxTable shop/first of another cluster (kube-system uid c2)"),
            "{}",
            c.message
        );
        assert!(
            c.message.ends_with(
                r#"release the table with: delete from "billing"."lockstep_owners" where table_schema = 'billing' and table_name = 'inbox'"#
            ),
            "{}",
            c.message
        );
    }

    #[test]
    fn a_child_is_ours_only_under_our_controller_reference() {
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
        let r = |uid: &str, controller| OwnerReference {
            api_version: "lockstep.dev/v1alpha1".into(),
            kind: "OutboxRelay".into(),
            name: "orders".into(),
            uid: uid.into(),
            controller,
            block_owner_deletion: None,
        };
        let meta = |refs: Vec<OwnerReference>| ObjectMeta {
            owner_references: Some(refs),
            ..ObjectMeta::default()
        };
        assert_eq!(foreign_holder(&meta(vec![r("u1", Some(true))]), "u1"), None);
        assert_eq!(
            foreign_holder(&ObjectMeta::default(), "u1").as_deref(),
            Some("created outside lockstep")
        );
        assert_eq!(
            foreign_holder(&meta(vec![r("u1", None)]), "u1").as_deref(),
            Some("created outside lockstep"),
            "an owner reference that does not control it is not ours"
        );
        assert_eq!(
            foreign_holder(&meta(vec![r("u0", Some(true))]), "u1").as_deref(),
            Some("controlled by OutboxRelay orders (uid u0)")
        );
        let c = foreign_child("Deployment", "shop", "orders-relay", "created outside lockstep");
        assert_eq!((c.status, c.reason), (Status::False, Reason::ResourceConflict));
        assert!(
            c.message
                .starts_with("Deployment shop/orders-relay exists and is not this OutboxRelay's (created outside lockstep)"),
            "{}",
            c.message
        );
    }
}
