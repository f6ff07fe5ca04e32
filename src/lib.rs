//! The sllm v1 API: messages, gRPC clients and servers generated from `proto/sllm/v1`, and the
//! encoded descriptor set that every service registers for reflection.
//!
//! This crate holds no logic beyond small conversions between protobuf types; it must never
//! depend on a service or on Redis.

#![allow(clippy::large_enum_variant)]

/// Generated code for package `sllm.v1`.
pub mod v1 {
    #![allow(missing_docs, clippy::all)]
    tonic::include_proto!("sllm.v1");
}

pub mod backend_config;
pub mod json;

/// Encoded `FileDescriptorSet` of every sllm proto, comments included, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/sllm_descriptor.bin"));
