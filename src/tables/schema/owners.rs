//! Which object manages a table: one row per table in `lockstep_owners`, beside the migration
//! history in the table's schema. Two objects naming one table (any namespaces, any clusters)
//! would otherwise both purge it, the shorter retention winning silently, or both run relays with
//! their own routing; the first to claim it owns it and the others are told they conflict.

use sqlx::PgConnection;

use crate::core::sql::{Ident, QualifiedName};

pub const OWNERS_TABLE: &str = "lockstep_owners";

/// An object that manages a table. `cluster` tells clusters apart (the kube-system namespace's uid).
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Owner {
    pub cluster: String,
    pub kind: String,
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

impl Owner {
    /// The same object by identity, even if it was deleted and created again (its uid changed).
    pub fn same_object(&self, other: &Owner) -> bool {
        (&self.cluster, &self.kind, &self.namespace, &self.name) == (&other.cluster, &other.kind, &other.namespace, &other.name)
    }

    pub fn describe(&self) -> String {
        format!("{} {}/{}", self.kind, self.namespace, self.name)
    }
}

/// Who holds a table after a claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claimed {
    /// The claimant owns it (it did already, or claimed it now).
    Ours,
    /// Another object owns it.
    Held(Owner),
    /// There is no owners table and the claimant may not create one (manageSchema false).
    Untracked,
}

pub fn owners_table(schema: &Ident) -> QualifiedName {
    QualifiedName {
        schema: schema.clone(),
        table: Ident::parse(OWNERS_TABLE).expect("valid"),
    }
}

/// The owners table of a schema (the schema exists: migrations made it). Pure.
pub fn owners_ddl(schema: &Ident) -> String {
    let owners = owners_table(schema);
    format!(
        "create table if not exists {owners} (
             table_schema text not null,
             table_name text not null,
             cluster text not null,
             kind text not null,
             namespace text not null,
             name text not null,
             uid text not null,
             claimed_at timestamptz not null default now(),
             primary key (table_schema, table_name)
         )"
    )
}

/// The owners table of `schema` exists (it is made only where lockstep manages a table), read as
/// `drop::in_catalog` reads it, before the `create table if not exists` of a claim.
async fn owners_exist(conn: &mut PgConnection, schema: &Ident) -> Result<bool, sqlx::Error> {
    super::drop::in_catalog(conn, schema.as_str(), OWNERS_TABLE).await
}

/// Claim `t` for `me` unless another object holds it. With `manage` false the owners table is
/// used when it exists and never created.
pub async fn claim(conn: &mut PgConnection, t: &QualifiedName, me: &Owner, manage: bool) -> Result<Claimed, sqlx::Error> {
    // Held by `me` already (every refresh after the first): read only, no DDL, no write.
    if let Ok(Some(h)) = holder(conn, t).await {
        if h == *me {
            return Ok(Claimed::Ours);
        }
    }
    let owners = owners_table(&t.schema);
    if manage {
        sqlx::Executor::execute(&mut *conn, owners_ddl(&t.schema).as_str()).await?;
    } else if !owners_exist(conn, &t.schema).await? {
        return Ok(Claimed::Untracked);
    }
    // One statement: of two objects claiming at once, exactly one row wins.
    let inserted = sqlx::query(&format!(
        "insert into {owners} (table_schema, table_name, cluster, kind, namespace, name, uid)
         values ($1, $2, $3, $4, $5, $6, $7) on conflict (table_schema, table_name) do nothing"
    ))
    .bind(t.schema.as_str())
    .bind(t.table.as_str())
    .bind(&me.cluster)
    .bind(&me.kind)
    .bind(&me.namespace)
    .bind(&me.name)
    .bind(&me.uid)
    .execute(&mut *conn)
    .await;
    match inserted {
        Ok(_) => {}
        // A role that only uses tables (manageSchema false) may read the owners but not write.
        Err(e) if !manage && crate::clients::db::is_permission_denied(&e) => {}
        Err(e) => return Err(e),
    }
    let Some(holder) = holder(conn, t).await? else {
        return Ok(Claimed::Untracked);
    };
    if !holder.same_object(me) {
        return Ok(Claimed::Held(holder));
    }
    // Deleted and created again under its name: the new object carries on, unless another object
    // moved the row first.
    if holder.uid != me.uid && !take_over(conn, t, me, &holder).await? {
        return Ok(match self::holder(conn, t).await? {
            Some(h) if !h.same_object(me) => Claimed::Held(h),
            _ => Claimed::Ours,
        });
    }
    Ok(Claimed::Ours)
}

/// The object recorded as the table's owner, if any.
pub async fn holder(conn: &mut PgConnection, t: &QualifiedName) -> Result<Option<Owner>, sqlx::Error> {
    if !owners_exist(conn, &t.schema).await? {
        return Ok(None);
    }
    let owners = owners_table(&t.schema);
    sqlx::query_as(&format!(
        "select cluster, kind, namespace, name, uid from {owners} where table_schema = $1 and table_name = $2"
    ))
    .bind(t.schema.as_str())
    .bind(t.table.as_str())
    .fetch_optional(&mut *conn)
    .await
}

/// Move the table from `from` (gone) to `me`; false when someone else moved it first.
pub async fn take_over(conn: &mut PgConnection, t: &QualifiedName, me: &Owner, from: &Owner) -> Result<bool, sqlx::Error> {
    let owners = owners_table(&t.schema);
    let moved = sqlx::query(&format!(
        "update {owners} set cluster = $3, kind = $4, namespace = $5, name = $6, uid = $7, claimed_at = now()
         where table_schema = $1 and table_name = $2 and uid = $8"
    ))
    .bind(t.schema.as_str())
    .bind(t.table.as_str())
    .bind(&me.cluster)
    .bind(&me.kind)
    .bind(&me.namespace)
    .bind(&me.name)
    .bind(&me.uid)
    .bind(&from.uid)
    .execute(&mut *conn)
    .await?;
    Ok(moved.rows_affected() == 1)
}

/// Forget the owner of a dropped table (inside the drop's transaction).
pub async fn forget(conn: &mut PgConnection, t: &QualifiedName) -> Result<(), sqlx::Error> {
    let owners = owners_table(&t.schema);
    if owners_exist(conn, &t.schema).await? {
        sqlx::query(&format!("delete from {owners} where table_schema = $1 and table_name = $2"))
            .bind(t.schema.as_str())
            .bind(t.table.as_str())
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner(cluster: &str, ns: &str, name: &str, uid: &str) -> Owner {
        Owner {
            cluster: cluster.into(),
            kind: "InboxTable".into(),
            namespace: ns.into(),
            name: name.into(),
            uid: uid.into(),
        }
    }

    #[test]
    fn an_object_created_again_is_the_same_owner_and_another_cluster_is_not() {
        let a = owner("c1", "shop", "orders", "u1");
        assert!(a.same_object(&owner("c1", "shop", "orders", "u2")));
        assert!(!a.same_object(&owner("c2", "shop", "orders", "u1")));
        assert!(!a.same_object(&owner("c1", "billing", "orders", "u1")));
        assert!(!a.same_object(&Owner {
            kind: "OutboxRelay".into(),
            ..a.clone()
        }));
        assert_eq!(a.describe(), "InboxTable shop/orders");
    }

    #[test]
    fn the_owners_table_lives_in_the_tables_schema() {
        let ddl = owners_ddl(&Ident::parse("billing").unwrap());
        assert!(
            ddl.starts_with(r#"create table if not exists "billing"."lockstep_owners" ("#),
            "{ddl}"
        );
        assert!(ddl.contains("primary key (table_schema, table_name)"), "{ddl}");
    }
}
