use proptest::prelude::*;
use serde_json::{Value, json};
use service::deploy_config::parse;

use crate::{json, object_with};

const TOP: &[&str] = &["model", "backend", "num_gpus", "auto_scaling_config", "backend_config"];

fn scaling() -> impl Strategy<Value = Value> {
    (0..5i32, 0..5i32, 1..100i32, 0..3600i32, 1..64u32).prop_map(|(min, extra, target, keep, _)| {
        json!({
            "metric": "concurrency",
            "target": target,
            "min_instances": min,
            "max_instances": min + extra,
            "keep_alive": keep,
        })
    })
}

proptest! {
    /// Any JSON text, and any object built from the known fields with values of any type:
    /// parsed or refused, never a panic; a refusal says what is wrong.
    #[test]
    fn any_json_is_parsed_or_refused(v in prop_oneof![json(), object_with(TOP)], strict in any::<bool>()) {
        match parse(&v.to_string(), strict) {
            Ok(p) => prop_assert!(p.spec.num_gpus >= 0),
            Err(e) => prop_assert!(!e.is_empty()),
        }
    }

    /// Arbitrary text, not even JSON.
    #[test]
    fn any_text_is_refused_without_panic(s in any::<String>()) {
        let _ = parse(&s, true);
        let _ = parse(&s, false);
    }

    /// A well-formed file is read exactly; an unknown field is refused in strict mode and
    /// warned about otherwise, by name.
    #[test]
    fn well_formed_files_are_read_exactly(
        model in "[a-z][a-z0-9-]{0,20}/[a-z0-9.-]{1,20}",
        gpus in 1..8i32,
        scaling in scaling(),
        extra in "x_[a-z]{1,8}",
    ) {
        let file = json!({ "model": model, "backend": "vllm", "num_gpus": gpus, "auto_scaling_config": scaling });
        let p = parse(&file.to_string(), true).unwrap();
        prop_assert_eq!(&p.spec.model, &model);
        prop_assert_eq!(p.spec.num_gpus, gpus);
        let a = p.spec.auto_scaling_config.unwrap();
        prop_assert_eq!(i64::from(a.min_instances), scaling["min_instances"].as_i64().unwrap());
        prop_assert_eq!(i64::from(a.max_instances), scaling["max_instances"].as_i64().unwrap());
        prop_assert!(p.warnings.is_empty());

        let mut with_extra = file.clone();
        with_extra[&extra] = json!(1);
        let err = parse(&with_extra.to_string(), true).unwrap_err();
        prop_assert!(err.contains(&extra), "{}", err);
        let p = parse(&with_extra.to_string(), false).unwrap();
        prop_assert!(p.warnings.iter().any(|w| w.contains(&extra)));
    }

    /// A known field of the wrong type is refused naming it.
    #[test]
    fn a_field_of_the_wrong_type_is_named(field in prop::sample::select(&["num_gpus", "auto_scaling_config"]), bad in prop_oneof![Just(json!("x")), Just(json!([1])), Just(json!(true))]) {
        let mut file = json!({ "model": "m", "backend": "vllm", "num_gpus": 1 });
        file[field] = bad;
        let err = parse(&file.to_string(), false).unwrap_err();
        prop_assert!(err.contains(field), "{}", err);
    }
}
