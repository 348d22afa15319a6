//! Distinct-user sketches read back from disk free exactly the memory they allocated.
//!
//! This test binary runs under jemalloc's debug build, which checks the size passed to every
//! deallocation (Rust passes the allocation's layout; mimalloc and glibc ignore it, jemalloc
//! uses it to find the size class). A sketch decoded with the wrong capacity is freed into the
//! wrong size class, which corrupts the heap; here it aborts the test instead.

use statsremote::rollup::Sketch;
use statsremote::storage::codec;

#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn user_hash(user: u64) -> u64 {
    user.wrapping_add(1).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

#[test]
fn decoded_sketches_of_every_small_size_free_what_they_allocated() {
    // 0–2 users fit in the sketch itself, 3–128 are an array of hashes, more a HyperLogLog.
    for users in 0..=300u64 {
        let mut sketch = Sketch::new();
        for user in 0..users {
            sketch.insert_hash(user_hash(user));
        }
        for bytes in [
            codec::encode(&sketch).expect("encode"),
            codec::encode_fixed(&sketch).expect("encode fixed"),
        ] {
            let mut back: Sketch = codec::decode(&bytes).expect("decode");
            assert_eq!(back.estimate(), sketch.estimate(), "{users} users");
            // Growing the decoded sketch reallocates and frees its array too.
            back.insert_hash(user_hash(users + 1_000_000));
            drop(back);
        }
    }
}
