//! JSON objects as their members in order, each value as its raw text: for reading an object
//! and writing it back changed in one member only, byte for byte otherwise (no key reordering,
//! no number reformatting). Used by the Segment parser and by enrichment.

use std::borrow::Cow;
use std::fmt;

use serde::de::{Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;

/// An object's members, borrowed from the input where no unescaping was needed.
pub struct Members<'a>(pub Vec<(Cow<'a, str>, &'a RawValue)>);

impl Members<'_> {
    /// The object's size as compact JSON text: its members' keys and values, their quotes,
    /// colons and commas, and the braces. Whitespace between members does not count (inside a
    /// value it does); a key with escapes counts as unescaped.
    pub fn compact_len(&self) -> usize {
        let members: usize = self
            .0
            .iter()
            .map(|(key, value)| key.len() + value.get().len() + 4)
            .sum();
        // Each member has a comma but the last; the braces.
        (members + 2).saturating_sub(usize::from(!self.0.is_empty()))
    }
}

/// A value that should be an object, read in one pass: its members, or which JSON type it
/// was instead (`"a string"`, `"an array"`, ...).
pub enum MaybeObject<'a> {
    Object(Members<'a>),
    Other(&'static str),
}

/// An object key, borrowed from the input unless it had escapes.
pub struct MemberKey<'a>(pub Cow<'a, str>);

impl<'de> Deserialize<'de> for MemberKey<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = MemberKey<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string key")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(MemberKey(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                Ok(MemberKey(Cow::Owned(v.to_string())))
            }
        }
        deserializer.deserialize_str(KeyVisitor)
    }
}

impl<'de> Deserialize<'de> for Members<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct MembersVisitor;
        impl<'de> Visitor<'de> for MembersVisitor {
            type Value = Members<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                read_members(map)
            }
        }
        deserializer.deserialize_map(MembersVisitor)
    }
}

fn read_members<'de, A: MapAccess<'de>>(mut map: A) -> Result<Members<'de>, A::Error> {
    let mut members = Vec::with_capacity(16);
    while let Some(MemberKey(key)) = map.next_key()? {
        let value: &'de RawValue = map.next_value()?;
        members.push((key, value));
    }
    Ok(Members(members))
}

impl<'de> Deserialize<'de> for MaybeObject<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct AnyVisitor;
        impl<'de> Visitor<'de> for AnyVisitor {
            type Value = MaybeObject<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                read_members(map).map(MaybeObject::Object)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(MaybeObject::Other("an array"))
            }
            fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
                Ok(MaybeObject::Other("a string"))
            }
            fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
                Ok(MaybeObject::Other("a boolean"))
            }
            fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
                Ok(MaybeObject::Other("a number"))
            }
            fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
                Ok(MaybeObject::Other("a number"))
            }
            fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
                Ok(MaybeObject::Other("a number"))
            }
            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(MaybeObject::Other("null"))
            }
        }
        deserializer.deserialize_any(AnyVisitor)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    fn kind_of(text: &str) -> Option<&'static str> {
        match serde_json::from_str::<MaybeObject<'_>>(text).unwrap() {
            MaybeObject::Object(_) => None,
            MaybeObject::Other(kind) => Some(kind),
        }
    }

    #[test]
    fn maybe_object_names_what_else_a_value_was() {
        assert_eq!(kind_of(r#"{"a": [1, {"b": 2}]}"#), None);
        assert_eq!(kind_of(r#""text""#), Some("a string"));
        assert_eq!(kind_of(r#"[1, [2, {"x": 3}], "y"]"#), Some("an array"));
        assert_eq!(kind_of("-1.5e3"), Some("a number"));
        assert_eq!(kind_of("18446744073709551615"), Some("a number"));
        assert_eq!(kind_of("true"), Some("a boolean"));
        assert_eq!(kind_of("null"), Some("null"));
        assert!(serde_json::from_str::<MaybeObject<'_>>("[1,").is_err());
    }

    #[test]
    fn compact_len_ignores_whitespace_between_members_only() {
        let padded = "{ \"a\" : 1 ,\n \"bb\" : { \"c\": 2 } }";
        let members: Members<'_> = serde_json::from_str(padded).unwrap();
        // Inside a value the whitespace counts: `{ "c": 2 }` is kept as sent.
        assert_eq!(members.compact_len(), r#"{"a":1,"bb":{ "c": 2 }}"#.len());
        let empty: Members<'_> = serde_json::from_str(" { } ").unwrap();
        assert_eq!(empty.compact_len(), 2);
    }

    proptest! {
        #[test]
        fn compact_len_of_compact_text_is_its_length(
            object in proptest::collection::btree_map("[a-z]{0,8}", any::<i64>(), 0..8)
        ) {
            let text = serde_json::to_string(&object).unwrap();
            let members: Members<'_> = serde_json::from_str(&text).unwrap();
            prop_assert_eq!(members.compact_len(), text.len());
        }
    }
}
