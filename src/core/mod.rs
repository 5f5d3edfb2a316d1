//! Layer 0: pure building blocks with no I/O, shared by every other layer. Nothing here imports
//! another layer.

pub mod amqp_settings;
pub mod duration;
pub mod event_headers;
pub mod kafka_settings;
pub mod nats_settings;
pub mod quantity;
pub mod redacted;
pub mod routing;
pub mod sql;
pub mod stamp;
pub mod validation;
