//! IPFIX information elements (IANA's registry; NetFlow v9 field types use
//! the same numbers for these), by name: one table for the decoder
//! (`netflow`) and the encoder (`export`).

/// octetDeltaCount (v9 IN_BYTES).
pub const OCTET_DELTA_COUNT: u16 = 1;
/// packetDeltaCount (v9 IN_PKTS).
pub const PACKET_DELTA_COUNT: u16 = 2;
pub const PROTOCOL_IDENTIFIER: u16 = 4;
pub const IP_CLASS_OF_SERVICE: u16 = 5;
/// tcpControlBits (2 bytes in IPFIX, RFC 7125; v9 TCP_FLAGS, 1 byte).
pub const TCP_CONTROL_BITS: u16 = 6;
pub const SOURCE_TRANSPORT_PORT: u16 = 7;
pub const SOURCE_IPV4_ADDRESS: u16 = 8;
pub const INGRESS_INTERFACE: u16 = 10;
pub const DESTINATION_TRANSPORT_PORT: u16 = 11;
pub const DESTINATION_IPV4_ADDRESS: u16 = 12;
pub const EGRESS_INTERFACE: u16 = 14;
pub const BGP_SOURCE_AS_NUMBER: u16 = 16;
pub const BGP_DESTINATION_AS_NUMBER: u16 = 17;
/// flowEndSysUpTime (v9 LAST_SWITCHED).
pub const FLOW_END_SYS_UP_TIME: u16 = 21;
/// flowStartSysUpTime (v9 FIRST_SWITCHED).
pub const FLOW_START_SYS_UP_TIME: u16 = 22;
pub const SOURCE_IPV6_ADDRESS: u16 = 27;
pub const DESTINATION_IPV6_ADDRESS: u16 = 28;
/// icmpTypeCodeIPv4 (v9 ICMP_TYPE, for both families).
pub const ICMP_TYPE_CODE_IPV4: u16 = 32;
/// samplingInterval (RFC 7270; v9 SAMPLING_INTERVAL).
pub const SAMPLING_INTERVAL: u16 = 34;
/// samplingAlgorithm (RFC 7270; v9 SAMPLING_ALGORITHM: 1 deterministic,
/// 2 random).
pub const SAMPLING_ALGORITHM: u16 = 35;
/// samplerRandomInterval (RFC 7270).
pub const SAMPLER_RANDOM_INTERVAL: u16 = 50;
pub const SOURCE_MAC_ADDRESS: u16 = 56;
pub const POST_DESTINATION_MAC_ADDRESS: u16 = 57;
pub const VLAN_ID: u16 = 58;
pub const IP_VERSION: u16 = 60;
pub const FLOW_DIRECTION: u16 = 61;
pub const DESTINATION_MAC_ADDRESS: u16 = 80;
pub const OCTET_TOTAL_COUNT: u16 = 85;
pub const PACKET_TOTAL_COUNT: u16 = 86;
pub const ICMP_TYPE_CODE_IPV6: u16 = 139;
pub const OBSERVATION_DOMAIN_ID: u16 = 149;
pub const FLOW_START_SECONDS: u16 = 150;
pub const FLOW_END_SECONDS: u16 = 151;
pub const FLOW_START_MILLISECONDS: u16 = 152;
pub const FLOW_END_MILLISECONDS: u16 = 153;
pub const FLOW_START_MICROSECONDS: u16 = 154;
pub const FLOW_END_MICROSECONDS: u16 = 155;
pub const FLOW_START_NANOSECONDS: u16 = 156;
pub const FLOW_END_NANOSECONDS: u16 = 157;
pub const FLOW_START_DELTA_MICROSECONDS: u16 = 158;
pub const FLOW_END_DELTA_MICROSECONDS: u16 = 159;
pub const SYSTEM_INIT_TIME_MILLISECONDS: u16 = 160;
pub const ICMP_TYPE_IPV4: u16 = 176;
pub const ICMP_CODE_IPV4: u16 = 177;
pub const ICMP_TYPE_IPV6: u16 = 178;
pub const ICMP_CODE_IPV6: u16 = 179;
pub const DOT1Q_VLAN_ID: u16 = 243;
pub const SELECTOR_ID: u16 = 302;
pub const SELECTOR_ALGORITHM: u16 = 304;
pub const SAMPLING_PACKET_INTERVAL: u16 = 305;
pub const SAMPLING_PACKET_SPACE: u16 = 306;
pub const SAMPLING_SIZE: u16 = 309;
pub const SAMPLING_POPULATION: u16 = 310;
pub const SAMPLING_PROBABILITY: u16 = 311;
/// layer2SegmentId (RFC 7133): an overlay segment, the encapsulation type
/// in the top octet (0x01 VXLAN, 0x02 NVGRE), the id below.
pub const LAYER2_SEGMENT_ID: u16 = 351;

/// NetFlow v9 options scope field type "System" (RFC 3954), not an IE.
pub const V9_SCOPE_SYSTEM: u16 = 1;
