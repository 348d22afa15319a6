//! JSON objects as their members in order, each value as its raw text: for reading an object
//! and writing it back changed in one member only, byte for byte otherwise (no key reordering,
//! no number reformatting). Used by the Segment parser and by enrichment. [`MergeBase`] merges
//! an event's own object over a batch-level one in time linear in both.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::fmt;

use serde::de::{Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;

/// An object's members, borrowed from the input where no unescaping was needed.
pub struct Members<'a>(pub Vec<(Cow<'a, str>, &'a RawValue)>);

impl Members<'_> {
    /// The object's size as compact JSON text: its members' keys and values, their quotes,
    /// colons and commas, and the braces. Whitespace between members does not count (inside a
    /// value it does); a key counts as serde_json escapes it.
    pub fn compact_len(&self) -> usize {
        let members: usize = self
            .0
            .iter()
            .map(|(key, value)| escaped_len(key) + value.get().len() + 2)
            .sum();
        // Each member has a comma but the last; the braces.
        (members + 2).saturating_sub(usize::from(!self.0.is_empty()))
    }
}

/// A batch-level object (Segment's batch `context` or `integrations`) that each event's own
/// object is merged over, shallowly, the event's members winning (Segment's rule). Read once per
/// batch; merging one event's object then costs time linear in that object and the base.
pub struct MergeBase<'a> {
    members: Vec<(Cow<'a, str>, &'a RawValue)>,
    /// For each distinct key, the index of its last member (a repeated key: the last one wins).
    last: HashMap<Cow<'a, str>, usize>,
    /// Compact size of the distinct members, each with its quotes, colon and a comma.
    distinct_len: usize,
}

impl<'a> MergeBase<'a> {
    /// Reads `text`, which must be a JSON object.
    pub fn parse(text: &'a str) -> Result<MergeBase<'a>, serde_json::Error> {
        let Members(members) = serde_json::from_str(text)?;
        let mut last = HashMap::with_capacity(members.len());
        for (index, (key, _)) in members.iter().enumerate() {
            last.insert(key.clone(), index);
        }
        let distinct_len = last
            .values()
            .map(|&index| member_len(&members[index]))
            .sum();
        Ok(MergeBase {
            members,
            last,
            distinct_len,
        })
    }

    /// Its members, repeated ones included.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// The base members an object with `own_keys` does not override, each once.
    fn inherited<'s>(
        &'s self,
        own_keys: &'s HashSet<&str>,
    ) -> impl Iterator<Item = &'s (Cow<'a, str>, &'a RawValue)> + 's {
        self.members
            .iter()
            .enumerate()
            .filter(move |(index, (key, _))| {
                self.last.get(key) == Some(index) && !own_keys.contains(key.as_ref())
            })
            .map(|(_, member)| member)
    }

    /// Compact size of the merged object: `own` (an object's text, its members read into
    /// `own_members`) with the members of the base it does not override.
    pub fn merged_len(&self, own: Option<(&str, &Members<'_>)>) -> usize {
        let Some((own_text, own_members)) = own else {
            return (self.distinct_len + 2).saturating_sub(usize::from(!self.last.is_empty()));
        };
        let own_keys = key_set(own_members);
        let overridden: usize = own_keys
            .iter()
            .filter_map(|key| self.last.get(*key))
            .map(|&index| member_len(&self.members[index]))
            .sum();
        let inherited = self.distinct_len - overridden;
        // Each inherited member brings its comma, but the first one after an empty own object.
        let extra_comma = own_members.0.is_empty() && inherited > 0;
        (own_text.len() + inherited).saturating_sub(usize::from(extra_comma))
    }

    /// The merged object's text. `own` must be a JSON object's text (as stored by the parser);
    /// one this cannot read (a key with a lone surrogate escape) is returned as it is.
    pub fn merge(&self, own: Option<&str>) -> String {
        let own_members: Option<Members<'_>> = own.and_then(|text| serde_json::from_str(text).ok());
        let (own_text, own_members) = match (own, own_members) {
            (Some(text), Some(members)) => (text.trim(), members),
            (Some(text), None) => return text.to_string(),
            (None, _) => ("{}", Members(Vec::new())),
        };
        let own_keys = key_set(&own_members);
        let mut out = String::with_capacity(own_text.len() + self.distinct_len + 2);
        // The own object as sent, without its closing brace.
        out.push_str(own_text.strip_suffix('}').unwrap_or("{"));
        let mut first = own_members.0.is_empty();
        for (key, value) in self.inherited(&own_keys) {
            if !first {
                out.push(',');
            }
            first = false;
            out.push_str(&serde_json::Value::String(key.to_string()).to_string());
            out.push(':');
            out.push_str(value.get());
        }
        out.push('}');
        out
    }
}

fn member_len((key, value): &(Cow<'_, str>, &RawValue)) -> usize {
    escaped_len(key) + value.get().len() + 2
}

/// Length of `text` as a JSON string, quotes included, escaped as serde_json writes it.
pub fn escaped_len(text: &str) -> usize {
    let escapes: usize = text
        .bytes()
        .map(|byte| match byte {
            b'"' | b'\\' | b'\n' | b'\r' | b'\t' | 0x08 | 0x0c => 1,
            0..=0x1f => 5,
            _ => 0,
        })
        .sum();
    text.len() + escapes + 2
}

fn key_set<'m>(members: &'m Members<'_>) -> HashSet<&'m str> {
    members.0.iter().map(|(key, _)| key.as_ref()).collect()
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

/// `value` serialised as a JSON object, without its braces: members to splice into another
/// object (empty for an empty object, or a value that is not an object).
pub fn object_members<T: serde::Serialize>(value: &T) -> String {
    let text = serde_json::to_string(value).unwrap_or_default();
    match text.strip_prefix('{').and_then(|t| t.strip_suffix('}')) {
        Some(members) => members.to_string(),
        None => String::new(),
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

    #[test]
    fn merge_base_keeps_own_members_and_adds_the_rest_once() {
        let base = MergeBase::parse(r#"{"a": 1, "b": {"x": 2}, "a": 3, "c": "z"}"#).unwrap();
        assert_eq!(
            base.merge(Some(r#"{"b":false,"d":[1]}"#)),
            r#"{"b":false,"d":[1],"a":3,"c":"z"}"#
        );
        assert_eq!(base.merge(None), r#"{"b":{"x": 2},"a":3,"c":"z"}"#);
        assert_eq!(base.merge(Some("{}")), r#"{"b":{"x": 2},"a":3,"c":"z"}"#);
        let empty = MergeBase::parse("{}").unwrap();
        assert_eq!(empty.merge(Some(r#"{"k":1}"#)), r#"{"k":1}"#);
        assert_eq!(empty.merge(None), "{}");
    }

    #[test]
    fn keys_count_as_escaped_and_unreadable_own_objects_are_kept() {
        let base = MergeBase::parse("{\"a\\u0001\\n\": 1}").unwrap();
        let merged = base.merge(None);
        assert_eq!(merged, "{\"a\\u0001\\n\":1}");
        assert_eq!(base.merged_len(None), merged.len());
        let padded: Members<'_> = serde_json::from_str("{\"q\\\"\": 1}").unwrap();
        assert_eq!(padded.compact_len(), "{\"q\\\"\":1}".len());
        // An own object with a lone surrogate key: exported as it came.
        let own = "{\"\\ud800\": 1}";
        assert_eq!(base.merge(Some(own)), own);
    }

    proptest! {
        #[test]
        fn merged_len_is_the_merged_texts_length(
            base in proptest::collection::vec(("[a-d]{1,2}", any::<i32>()), 0..6),
            own in proptest::option::of(proptest::collection::btree_map("[a-d]{1,2}", any::<i32>(), 0..6)),
        ) {
            let members: Vec<String> = base.iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
            let base_text = format!("{{{}}}", members.join(","));
            let base = MergeBase::parse(&base_text).unwrap();
            let own_text = own.map(|own| serde_json::to_string(&own).unwrap());
            let own_members: Option<Members<'_>> =
                own_text.as_deref().map(|text| serde_json::from_str(text).unwrap());
            let merged = base.merge(own_text.as_deref());
            let own_pair = own_text.as_deref().zip(own_members.as_ref());
            prop_assert_eq!(base.merged_len(own_pair), merged.len());
            // Same members as serde_json's own merge, where the event's keys win.
            let mut expected: serde_json::Map<String, serde_json::Value> =
                own_text.as_deref().map_or_else(Default::default, |t| serde_json::from_str(t).unwrap());
            let base_map: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&base_text).unwrap();
            for (key, value) in base_map {
                expected.entry(key).or_insert(value);
            }
            let got: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&merged).unwrap();
            prop_assert_eq!(got, expected);
        }

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
