use proptest::prelude::*;
use prost::Message;
use sllm_api::v1 as pb;

fn spec() -> impl Strategy<Value = pb::DeploymentSpec> {
    let scaling = (any::<String>(), any::<f64>(), any::<i32>(), any::<i32>(), any::<i32>())
        .prop_map(|(metric, target, min, max, keep)| pb::AutoScalingConfig {
            metric,
            target,
            min_instances: min,
            max_instances: max,
            keep_alive: keep,
        });
    (
        prop_oneof![any::<String>(), "[a-z][a-z0-9/-]{0,20}"],
        prop_oneof![any::<String>(), Just("vllm".to_string())],
        any::<i32>(),
        prop::option::of(scaling),
    )
        .prop_map(|(model, backend, num_gpus, auto_scaling_config)| pb::DeploymentSpec {
            model,
            backend,
            num_gpus,
            auto_scaling_config,
            backend_config: None,
        })
}

proptest! {
    /// Any deploy spec: accepted only if kvstore's own validation passes, else refused with
    /// INVALID_ARGUMENT naming a field under `spec`.
    #[test]
    fn any_spec_is_accepted_valid_or_refused_naming_the_field(s in spec()) {
        match service::convert::spec_from_pb(Some(&s)) {
            Ok(k) => prop_assert!(k.validate().is_ok()),
            Err(status) => {
                prop_assert_eq!(status.code(), tonic::Code::InvalidArgument);
                prop_assert!(status.message().starts_with("invalid spec"), "{}", status.message());
            }
        }
    }

    /// Arbitrary bytes off the wire: every message a client or worker sends decodes or is
    /// refused, and a decoded worker report converts or is refused naming its field.
    #[test]
    fn any_bytes_decode_or_are_refused(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = pb::GenerateRequest::decode(bytes.as_slice());
        let _ = pb::DeployRequest::decode(bytes.as_slice()).map(|d| service::convert::spec_from_pb(d.spec.as_ref()));
        let _ = pb::AttachUp::decode(bytes.as_slice());
        if let Ok(m) = pb::WorkerMessage::decode(bytes.as_slice())
            && let Some(pb::worker_message::Body::Register(r)) = m.body
            && let Some(inv) = r.inventory
        {
            if let Err(s) = service::convert::inventory_from_pb(&inv) {
                prop_assert!(s.message().contains("inventory."), "{}", s.message());
            }
            if let Err(s) = service::convert::running_from_pb(&inv.running) {
                prop_assert!(s.message().contains("inventory.running["), "{}", s.message());
            }
        }
    }

    /// backend_config: JSON objects survive the trip through protobuf's Struct.
    #[test]
    fn backend_config_round_trips(m in prop::collection::btree_map("[a-z_]{1,8}", prop_oneof![
        any::<bool>().prop_map(serde_json::Value::from),
        (-1_000_000i64..1_000_000).prop_map(serde_json::Value::from),
        "[ -~]{0,16}".prop_map(serde_json::Value::from),
    ], 0..8)) {
        let v = serde_json::Value::Object(m.into_iter().collect());
        let back = service::convert::struct_to_json(&service::convert::json_to_struct(&v));
        prop_assert_eq!(back, v);
    }
}
