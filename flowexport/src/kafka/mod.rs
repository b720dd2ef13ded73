//! Kafka, one way for every command: the client configuration
//! ([`client`]), consumer-group membership and its metrics ([`group`]), and
//! the at-least-once Kafka → Kafka loop enrich and split run on
//! ([`bridge`]). The Kafka sink is [`crate::sink::kafka`].
pub(crate) mod bridge;
pub(crate) mod client;
pub(crate) mod group;
