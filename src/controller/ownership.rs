//! One object per table. The table is claimed in the database (`schema::claim`) once it is
//! migrated; a table held by another object that still exists is a ResourceConflict, and this
//! object leaves it alone: no purge, no relay, no topics, and its cleanup drops nothing. A holder
//! that no longer exists in this cluster (deleted with deletionPolicy Retain) is taken over.

use k8s_openapi::api::core::v1::Namespace;
use kube::{api::Api, Resource, ResourceExt};
use sqlx::PgConnection;

use super::{deps::db_reason, Context};
use crate::{
    conditions::{condition, reason, Cond},
    crd::{InboxTable, OutboxRelay},
    schema::{self, Claimed, Owner, OWNERS_TABLE},
    sql::QualifiedName,
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
    let cluster = cluster(ctx).await.map_err(|e| {
        Cond::unknown(
            condition::SCHEMA_READY,
            reason::RESOURCE_CONFLICT,
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
        reason::RESOURCE_CONFLICT,
        format!(
            "{table} is managed by {whose}; this object leaves it alone (no purge, no relay, no cleanup). \
             Delete one of the two, or point spec.database at another table{release}"
        ),
    )
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conditions::Status;

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
    fn a_conflict_names_the_holder_and_how_to_resolve_it() {
        let t = crate::schema::qualified("billing", "inbox");
        let c = conflict(&t, &owner("c1", "first"), &owner("c1", "second"));
        assert_eq!((c.status, c.reason), (Status::False, reason::RESOURCE_CONFLICT));
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
}
