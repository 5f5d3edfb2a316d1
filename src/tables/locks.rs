//! The relay's lock contract: the advisory lock key of an outbox table and the setting that marks a
//! lock session as a relay's. The relay takes them, the operator and the doctor look for them.

use crate::core::sql::{advisory_key, QualifiedName};

/// The session-local setting that marks a lock session as this relay's (`relay::fence`): a pooler
/// that hands the session to another client, or this client another session, cannot keep it.
pub const MARKER: &str = "lockstep.relay_session";

/// The advisory lock key of an outbox table.
pub fn lock_key(t: &QualifiedName) -> i64 {
    advisory_key(&format!("lockstep-relay:{}.{}", t.schema.as_str(), t.table.as_str()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tables::schema;

    #[test]
    fn lock_key_is_exact_and_not_the_migration_key() {
        let t = schema::qualified("public", "outbox");
        assert_eq!(lock_key(&t), -5365579470686561255);
        assert_ne!(lock_key(&t), schema::lock_key(&t));
    }
}
