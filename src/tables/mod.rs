//! Layer 3: the database contract shared by the operator and the relay: table layouts and their
//! migrations, bucket codes, lock keys, and the SQL both sides run against those tables.

pub mod buckets;
pub mod identity;
pub mod lag;
pub mod locks;
pub mod purge;
pub mod replay;
pub mod schema;
