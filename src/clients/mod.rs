//! Layer 2: clients of the outside world (PostgreSQL pools, Kafka admin and consumers, the
//! Kubernetes Lease, the HTTP endpoints). They know nothing of the operator or the relay.

pub mod amqp_probe;
pub mod broker;
pub mod cache;
pub mod consumer_lag;
pub mod db;
pub mod http;
pub mod kafka;
pub mod leader;
pub mod nats_admin;
pub mod rabbitmq_admin;
