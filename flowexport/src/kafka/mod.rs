//! Kafka, one way for every command: the client configuration
//! ([`client`]), consumer-group membership and its metrics ([`group`]), and
//! the at-least-once Kafka → Kafka loop enrich and split run on
//! ([`bridge`]); the delivery callback every producer shares ([`delivery`]).
//! The Kafka sink is [`crate::sink::kafka`].
pub(crate) mod bridge;
pub(crate) mod client;
pub(crate) mod delivery;
pub(crate) mod group;
