//! The distinct-user sketch stored in rollups: `cardinality-estimator`'s HyperLogLog++ at
//! precision 16, with a decoder that gives the library the memory layout it assumes.
//!
//! `cardinality-estimator` (as of 1.0.3) keeps a set of 3–128 users as an array whose capacity
//! it never records: it frees the array as `next_power_of_two(len)` elements. Its serde decoder
//! takes the decoded `Vec` and resizes it to that many elements, which reallocates with the
//! `Vec`'s growth rule whenever the decoder sized the `Vec` exactly (bincode does; serde_json
//! happens not to). The array is then freed with a smaller size than it was allocated with.
//! mimalloc and glibc malloc ignore that size; jemalloc, which uses it to find the size class,
//! corrupts its heap. [`Sketch`]'s decoder reads the stored parts itself and hands them to the
//! library with a `Vec` capacity hint of exactly that power of two, so the resize never
//! reallocates. The stored format is the library's own, unchanged. `tests/sketch_memory.rs`
//! runs under jemalloc's debug build, which aborts on a size mismatch.

use cardinality_estimator::CardinalityEstimator;
use serde::de::value::{Error as ValueError, SeqAccessDeserializer};
use serde::de::{self, DeserializeSeed, IntoDeserializer, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

type Estimator = CardinalityEstimator<u64, wyhash::WyHash, 16, 6>;

/// Largest set the library keeps as an array of hashes; larger ones are a HyperLogLog, whose
/// register slice has one fixed length and is freed as exactly that.
const MAX_ARRAY_LEN: usize = 128;

/// A set of user hashes: exact while small, HyperLogLog++ past 128 (standard error ≈ 0.4%).
#[derive(Clone, PartialEq, Default)]
pub struct Sketch(Estimator);

impl Sketch {
    pub fn new() -> Sketch {
        Sketch(Estimator::new())
    }

    pub fn insert_hash(&mut self, hash: u64) {
        self.0.insert_hash(hash);
    }

    pub fn merge(&mut self, other: &Sketch) {
        self.0.merge(&other.0);
    }

    pub fn estimate(&self) -> usize {
        self.0.estimate()
    }
}

impl std::fmt::Debug for Sketch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sketch")
            .field("estimate", &self.0.estimate())
            .finish()
    }
}

impl Serialize for Sketch {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Sketch {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Sketch, D::Error> {
        // The library's own layout: its tagged word, and the array or registers if any.
        let (data, slots): (usize, Option<Vec<u32>>) = Deserialize::deserialize(deserializer)?;
        let parts = Parts {
            data: Some(data),
            slots: Some(slots),
        };
        Estimator::deserialize(SeqAccessDeserializer::new(parts))
            .map(Sketch)
            .map_err(de::Error::custom)
    }
}

/// The stored parts as a two-element sequence for the library's decoder.
struct Parts {
    data: Option<usize>,
    slots: Option<Option<Vec<u32>>>,
}

impl<'de> SeqAccess<'de> for Parts {
    type Error = ValueError;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, ValueError> {
        if let Some(data) = self.data.take() {
            return seed.deserialize(data.into_deserializer()).map(Some);
        }
        match self.slots.take() {
            Some(slots) => seed.deserialize(Slots(slots)).map(Some),
            None => Ok(None),
        }
    }
}

/// `Option<Vec<u32>>`, read back with the capacity hint the library needs.
struct Slots(Option<Vec<u32>>);

impl<'de> Deserializer<'de> for Slots {
    type Error = ValueError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ValueError> {
        match self.0 {
            None => visitor.visit_none(),
            Some(slots) => {
                // serde sizes the `Vec` by this hint, and `Vec::with_capacity` is exact.
                let capacity = if slots.len() <= MAX_ARRAY_LEN {
                    slots.len().next_power_of_two()
                } else {
                    slots.len()
                };
                visitor.visit_some(SeqAccessDeserializer::new(Hinted {
                    slots: slots.into_iter(),
                    capacity,
                }))
            }
        }
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map struct enum identifier
        ignored_any
    }
}

/// The slots, one by one, announcing `capacity` as their size.
struct Hinted {
    slots: std::vec::IntoIter<u32>,
    capacity: usize,
}

impl<'de> SeqAccess<'de> for Hinted {
    type Error = ValueError;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, ValueError> {
        match self.slots.next() {
            Some(slot) => seed.deserialize(slot.into_deserializer()).map(Some),
            None => Ok(None),
        }
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.capacity)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::storage::codec;

    #[test]
    fn sketches_of_every_representation_round_trip() {
        for users in [0u64, 1, 2, 3, 5, 17, 128, 129, 1_000, 100_000] {
            let mut sketch = Sketch::new();
            for user in 0..users {
                sketch.insert_hash(user.wrapping_add(1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
            }
            let back: Sketch = codec::decode(&codec::encode_fixed(&sketch).unwrap()).unwrap();
            assert_eq!(back, sketch, "{users} users");
            let back: Sketch = codec::decode(&codec::encode(&sketch).unwrap()).unwrap();
            assert_eq!(back, sketch, "{users} users");
        }
    }

    #[test]
    fn invalid_parts_are_an_error() {
        // An array tag with two slots (arrays hold 3 to 128), and a small tag with slots.
        for (data, slots) in [(1usize, Some(vec![1u32, 2])), (0, Some(vec![1, 2, 3]))] {
            let bytes = codec::encode(&(data, slots)).unwrap();
            assert!(codec::decode::<Sketch>(&bytes).is_err());
        }
    }
}
