use kvstore::names::{
    MAX_ADDRESS, MAX_ID, MAX_MODEL_NAME, validate_address, validate_id, validate_model_name,
    validate_token,
};
use kvstore::{Error, Keys};
use proptest::prelude::*;

type Check = fn(&'static str, &str) -> kvstore::Result<()>;

/// Field, validator, longest accepted, characters allowed besides ASCII letters and digits.
const CHECKS: [(&str, Check, usize, &str); 4] = [
    ("model", validate_model_name, MAX_MODEL_NAME, "._-/"),
    ("id", validate_id, MAX_ID, "._-"),
    ("token", validate_token, 64, "_-"),
    ("address", validate_address, MAX_ADDRESS, ".:[]_-"),
];

proptest! {
    /// Whatever the string, each validator answers without panicking; a refusal names the
    /// field, and nothing accepted holds more than its grammar allows (so no hash-tag brace,
    /// whitespace or control character can reach a key) or exceeds its length.
    #[test]
    fn any_string_is_judged_and_refusals_name_the_field(s in any::<String>()) {
        for (field, check, max, extra) in CHECKS {
            match check(field, &s) {
                Ok(()) => {
                    prop_assert!(!s.is_empty() && s.chars().count() <= max);
                    prop_assert!(
                        s.chars().all(|c| c.is_ascii_alphanumeric() || extra.contains(c)),
                        "{} accepted {:?}", field, s
                    );
                }
                Err(Error::Invalid { field: f, reason }) => {
                    prop_assert_eq!(f, field);
                    prop_assert!(!reason.is_empty());
                }
                Err(other) => prop_assert!(false, "{field}: not an invalid-argument error: {other}"),
            }
        }
    }

    /// Every name of the documented grammar is accepted and keyed under the namespace's tag.
    #[test]
    fn names_of_the_grammar_are_accepted(s in "[A-Za-z0-9][A-Za-z0-9._/-]{0,199}") {
        prop_assert!(validate_model_name("model", &s).is_ok());
        let keys = Keys::new("ns").unwrap();
        let key = keys.deployment(&s);
        let ok = key.starts_with("{ns}:") && key.ends_with(&s);
        prop_assert!(ok, "key {}", key);
    }

    /// Namespaces: refused (naming the field) or usable as a hash tag.
    #[test]
    fn any_namespace_is_refused_or_a_clean_hash_tag(s in any::<String>()) {
        if let Ok(keys) = Keys::new(&s) {
            let root_ok = keys.root() == format!("{{{s}}}:");
            let no_braces = !s.contains(['{', '}']);
            prop_assert!(root_ok && no_braces, "namespace {:?}", s);
        }
    }
}
