//! Identity resolution: which person an event belongs to.
//!
//! Every event has a raw identity, its `userId`, else its `anonymousId`; `user_hash` is the
//! tenant-keyed hash of it. Identity calls link ids together:
//!
//! - `identify` with a `userId` and an `anonymousId` links the anonymous id to the user;
//! - `alias` links `previousId` to `userId`.
//!
//! The ids linked together form a person, named by one id of it, its root. Every id points at its
//! parent, the root at itself; resolving an id follows the parents to the root. An id that no
//! link names is a person of its own. The rules, applied in log order by the tenant's rollup
//! actor (so a replay after a crash derives exactly the same links):
//!
//! 1. The target (`userId`) is recorded, as a person of its own if it is new.
//! 2. A source (`anonymousId` / `previousId`) that no link names yet joins the target's person.
//! 3. A source already in a person: nothing to do if that is the target's person. Otherwise an
//!    `alias` whose target was new renames the source's person to the target (its ids follow);
//!    every other case would merge two people, and is refused ([`Outcome::Refused`]): an
//!    `identify` never moves an anonymous id to a second user (a shared device keeps its first
//!    user), and no call merges two persons that both took part in identity calls.
//!
//! Rollups (series, top events, uniques, live) attribute each event to its person as resolved
//! when the rollup actor applies it, so events before the link stay with the anonymous id;
//! funnels and exports resolve with the links stored when they run, so they attribute earlier
//! events too.
//!
//! The committed links of a tenant are in memory ([`IdentityMap`], about 40 bytes per id),
//! loaded from `meta` by `storage::identity`; the rollup actor keeps the links it has applied but
//! not yet stored in a [`Pending`] overlay and stores them with its rollups and watermark.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use crate::enrich::user_hash;

/// Longest parent chain followed. Chains grow by one per rename only; this bounds a lookup even
/// if stored links were damaged into a cycle.
const MAX_DEPTH: usize = 64;

/// Which call made a link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkKind {
    Identify,
    Alias,
}

impl LinkKind {
    pub fn as_str(self) -> &'static str {
        match self {
            LinkKind::Identify => "identify",
            LinkKind::Alias => "alias",
        }
    }
}

/// An identity call of a batch: the event at index `at` links `source` (if any) to `target`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub at: u32,
    pub kind: LinkKind,
    pub source: Option<String>,
    pub target: String,
}

/// What applying a link did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Nothing changed: the ids were already one person (or there was no source).
    Unchanged,
    /// The source joined the target's person.
    Joined,
    /// The source's person was renamed to the new target.
    Renamed,
    /// The link would have merged two persons; nothing changed.
    Refused,
    /// The tenant holds its most ids; nothing changed.
    Full,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Unchanged => "unchanged",
            Outcome::Joined => "joined",
            Outcome::Renamed => "renamed",
            Outcome::Refused => "refused",
            Outcome::Full => "full",
        }
    }
}

/// One id's place: its parent (itself for a root).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    parent: u64,
}

#[derive(Debug, Default)]
struct Links {
    entries: HashMap<u64, Entry>,
    /// Names of the ids that are or were a target: a person's name is its root's.
    names: HashMap<u64, Arc<str>>,
}

/// A tenant's committed links, shared by its rollup actor (which adds to it after each stored
/// flush) and the queries and exports that resolve ids.
#[derive(Debug, Default)]
pub struct IdentityMap {
    links: RwLock<Links>,
    len: AtomicUsize,
}

/// A stored link: the id's hash and its parent's name (a root's own name).
pub type StoredLink = (u64, Arc<str>);

impl IdentityMap {
    /// A map of `stored` links (see [`StoredLink`]); `key` is the tenant's user-hash key.
    pub fn from_stored(key: &[u8; 32], stored: impl IntoIterator<Item = StoredLink>) -> Self {
        let map = IdentityMap::default();
        map.commit(key, stored);
        map
    }

    /// Adds stored links (later ones win).
    pub fn commit(&self, key: &[u8; 32], stored: impl IntoIterator<Item = StoredLink>) {
        let mut links = self.links.write().unwrap_or_else(|p| p.into_inner());
        for (id, parent_name) in stored {
            let parent = user_hash(key, &parent_name);
            links.entries.insert(id, Entry { parent });
            links.names.entry(parent).or_insert(parent_name);
        }
        self.len.store(links.entries.len(), Ordering::Release);
    }

    /// Removes the links of `ids`, and the name of the id hashed `named` (an erasure).
    pub fn remove(&self, ids: &[u64], named: u64) {
        let mut links = self.links.write().unwrap_or_else(|p| p.into_inner());
        for id in ids {
            links.entries.remove(id);
        }
        links.names.remove(&named);
        self.len.store(links.entries.len(), Ordering::Release);
    }

    /// How many ids take part in links.
    pub fn len(&self) -> usize {
        self.len.load(Ordering::Acquire)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The person (root hash) of the id hashed `hash`.
    pub fn resolve(&self, hash: u64) -> u64 {
        if self.is_empty() {
            return hash;
        }
        let links = self.links.read().unwrap_or_else(|p| p.into_inner());
        root_of(hash, |id| links.entries.get(&id).copied())
    }

    /// A resolver that holds the map's read lock, for resolving many ids in a row.
    pub fn resolver(&self) -> Resolver<'_> {
        Resolver {
            links: (!self.is_empty()).then(|| self.links.read().unwrap_or_else(|p| p.into_inner())),
        }
    }
}

/// Resolves ids against a locked [`IdentityMap`].
pub struct Resolver<'a> {
    links: Option<std::sync::RwLockReadGuard<'a, Links>>,
}

impl Resolver<'_> {
    /// The person (root hash) of the id hashed `hash`.
    pub fn resolve(&self, hash: u64) -> u64 {
        match &self.links {
            None => hash,
            Some(links) => root_of(hash, |id| links.entries.get(&id).copied()),
        }
    }

    /// The person's hash and name, when the id is linked to a person other than itself.
    pub fn person(&self, hash: u64) -> Option<(u64, &str)> {
        let links = self.links.as_ref()?;
        let root = root_of(hash, |id| links.entries.get(&id).copied());
        if root == hash {
            return None;
        }
        links.names.get(&root).map(|name| (root, &**name))
    }
}

fn root_of(mut hash: u64, get: impl Fn(u64) -> Option<Entry>) -> u64 {
    for _ in 0..MAX_DEPTH {
        match get(hash) {
            Some(entry) if entry.parent != hash => hash = entry.parent,
            _ => return hash,
        }
    }
    hash
}

/// Links applied but not yet stored, over a committed [`IdentityMap`].
#[derive(Debug)]
pub struct Pending {
    committed: Arc<IdentityMap>,
    key: [u8; 32],
    max_ids: usize,
    entries: HashMap<u64, Entry>,
    names: HashMap<u64, Arc<str>>,
    /// What to store: each changed id with its parent's name.
    writes: HashMap<u64, Arc<str>>,
}

impl Pending {
    /// An empty overlay over `committed`; `key` is the tenant's user-hash key; at most
    /// `max_ids` ids take part in links.
    pub fn new(committed: Arc<IdentityMap>, key: [u8; 32], max_ids: usize) -> Pending {
        Pending {
            committed,
            key,
            max_ids,
            entries: HashMap::new(),
            names: HashMap::new(),
            writes: HashMap::new(),
        }
    }

    /// Whether nothing is linked, committed or pending: every id is its own person.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty() && self.committed.is_empty()
    }

    fn get(&self, links: &Links, id: u64) -> Option<Entry> {
        self.entries
            .get(&id)
            .copied()
            .or_else(|| links.entries.get(&id).copied())
    }

    fn set(&mut self, id: u64, parent: u64, parent_name: &Arc<str>) {
        self.entries.insert(id, Entry { parent });
        self.names
            .entry(parent)
            .or_insert_with(|| parent_name.clone());
        self.writes.insert(id, parent_name.clone());
    }

    /// Applies `links` (ordered by `at`) and resolves every item's `user_hash` to its person,
    /// in order, so an item is resolved with the links of the events before it and its own.
    /// `on_link` is told each link's outcome.
    pub fn apply<'h>(
        &mut self,
        hashes: impl IntoIterator<Item = &'h mut u64>,
        links: &[Link],
        mut on_link: impl FnMut(&Link, Outcome),
    ) {
        if links.is_empty() && self.is_empty() {
            return;
        }
        let committed = self.committed.clone();
        let stored = committed.links.read().unwrap_or_else(|p| p.into_inner());
        let mut next = links.iter().peekable();
        for (at, hash) in hashes.into_iter().enumerate() {
            while let Some(link) = next.next_if(|link| link.at as usize <= at) {
                let outcome = self.link(&stored, link);
                on_link(link, outcome);
            }
            *hash = root_of(*hash, |id| self.get(&stored, id));
        }
    }

    /// Resolves `hashes` without applying any link (for batches that are not rolled up).
    pub fn resolve<'h>(&self, hashes: impl IntoIterator<Item = &'h mut u64>) {
        if self.is_empty() {
            return;
        }
        let stored = self
            .committed
            .links
            .read()
            .unwrap_or_else(|p| p.into_inner());
        for hash in hashes {
            *hash = root_of(*hash, |id| self.get(&stored, id));
        }
    }

    fn link(&mut self, stored: &Links, link: &Link) -> Outcome {
        let target = user_hash(&self.key, &link.target);
        let target_known = self.get(stored, target).is_some();
        let ids = self.entries.len() + stored.entries.len();
        let source = link
            .source
            .as_deref()
            .filter(|source| *source != link.target)
            .map(|source| user_hash(&self.key, source));
        let needed = usize::from(!target_known)
            + source.map_or(0, |s| usize::from(self.get(stored, s).is_none()));
        if needed > 0 && ids + needed > self.max_ids {
            return Outcome::Full;
        }
        let target_name: Arc<str> = Arc::from(link.target.as_str());
        if !target_known {
            self.set(target, target, &target_name);
        }
        let Some(source) = source else {
            return Outcome::Unchanged;
        };
        let target_root = root_of(target, |id| self.get(stored, id));
        if self.get(stored, source).is_none() {
            let root_name = self.name_of(stored, target_root);
            self.set(source, target_root, &root_name);
            return Outcome::Joined;
        }
        let source_root = root_of(source, |id| self.get(stored, id));
        if source_root == target_root {
            Outcome::Unchanged
        } else if link.kind == LinkKind::Alias && !target_known {
            self.set(source_root, target, &target_name);
            Outcome::Renamed
        } else {
            Outcome::Refused
        }
    }

    fn name_of(&self, stored: &Links, root: u64) -> Arc<str> {
        self.names
            .get(&root)
            .or_else(|| stored.names.get(&root))
            .cloned()
            .unwrap_or_else(|| Arc::from(""))
    }

    /// Takes what is to be stored; give it back with [`Pending::stored`] or [`Pending::failed`].
    pub fn take_writes(&mut self) -> Vec<StoredLink> {
        self.writes.drain().collect()
    }

    /// `written` is stored: it moves to the committed map (the overlay keeps only what changed
    /// after it was taken).
    pub fn stored(&mut self, written: Vec<StoredLink>) {
        if written.is_empty() {
            return;
        }
        for (id, _) in &written {
            if !self.writes.contains_key(id) {
                self.entries.remove(id);
            }
        }
        self.committed.commit(&self.key, written);
        if self.entries.is_empty() {
            self.names.clear();
        }
    }

    /// `written` could not be stored: it is to be written again (unless changed since).
    pub fn failed(&mut self, written: Vec<StoredLink>) {
        for (id, name) in written {
            self.writes.entry(id).or_insert(name);
        }
    }

    /// Forgets everything not stored (a replay from the stored watermark derives it again).
    pub fn clear(&mut self) {
        self.entries.clear();
        self.names.clear();
        self.writes.clear();
    }

    /// How many ids take part in links, stored or not.
    pub fn len(&self) -> usize {
        self.committed.len() + self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: [u8; 32] = [4; 32];

    fn h(id: &str) -> u64 {
        user_hash(&KEY, id)
    }

    fn link(kind: LinkKind, source: Option<&str>, target: &str) -> Link {
        Link {
            at: 0,
            kind,
            source: source.map(str::to_string),
            target: target.to_string(),
        }
    }

    /// Applies one link (as an event of its own, whose hash is its target's) and returns its
    /// outcome.
    fn apply(pending: &mut Pending, link: Link) -> Outcome {
        let mut outcome = Outcome::Unchanged;
        let mut hashes = [h(&link.target)];
        pending.apply(&mut hashes, &[link], |_, o| outcome = o);
        outcome
    }

    fn person(pending: &Pending, id: &str) -> u64 {
        let mut hashes = [h(id)];
        pending.resolve(&mut hashes);
        hashes[0]
    }

    fn fresh() -> Pending {
        Pending::new(Arc::default(), KEY, 1000)
    }

    #[test]
    fn identify_joins_an_anonymous_id_to_its_user_once() {
        let mut p = fresh();
        assert_eq!(person(&p, "anon-1"), h("anon-1"));
        let identify = || link(LinkKind::Identify, Some("anon-1"), "alice");
        assert_eq!(apply(&mut p, identify()), Outcome::Joined);
        assert_eq!(person(&p, "anon-1"), h("alice"));
        assert_eq!(apply(&mut p, identify()), Outcome::Unchanged);
        // A second user identifying on the same device does not take the anonymous id.
        let bob = link(LinkKind::Identify, Some("anon-1"), "bob");
        assert_eq!(apply(&mut p, bob), Outcome::Refused);
        assert_eq!(person(&p, "anon-1"), h("alice"));
        assert_eq!(person(&p, "bob"), h("bob"));
    }

    #[test]
    fn chained_aliases_make_one_person_named_by_the_last_target() {
        let mut p = fresh();
        assert_eq!(
            apply(&mut p, link(LinkKind::Alias, Some("anon"), "email")),
            Outcome::Joined
        );
        assert_eq!(
            apply(&mut p, link(LinkKind::Alias, Some("email"), "db-42")),
            Outcome::Renamed
        );
        for id in ["anon", "email", "db-42"] {
            assert_eq!(person(&p, id), h("db-42"), "{id}");
        }
    }

    #[test]
    fn merging_two_known_people_is_refused() {
        let mut p = fresh();
        apply(&mut p, link(LinkKind::Identify, Some("a1"), "u1"));
        apply(&mut p, link(LinkKind::Identify, Some("a2"), "u2"));
        let merge = link(LinkKind::Alias, Some("u1"), "u2");
        assert_eq!(apply(&mut p, merge), Outcome::Refused);
        assert_eq!(person(&p, "a1"), h("u1"));
        assert_eq!(person(&p, "a2"), h("u2"));
    }

    #[test]
    fn items_resolve_with_the_links_before_them_and_their_own() {
        let mut p = fresh();
        // anon event, identify (hash of its userId), anon event again.
        let mut hashes = [h("anon"), h("alice"), h("anon")];
        let links = [Link {
            at: 1,
            ..link(LinkKind::Identify, Some("anon"), "alice")
        }];
        p.apply(&mut hashes, &links, |_, _| {});
        assert_eq!(hashes, [h("anon"), h("alice"), h("alice")]);
    }

    #[test]
    fn stored_links_move_to_the_committed_map_and_failed_ones_are_written_again() {
        let committed = Arc::new(IdentityMap::default());
        let mut p = Pending::new(committed.clone(), KEY, 1000);
        apply(&mut p, link(LinkKind::Identify, Some("anon"), "alice"));
        let writes = p.take_writes();
        assert_eq!(writes.len(), 2);
        p.failed(writes);
        let writes = p.take_writes();
        assert_eq!(writes.len(), 2);
        assert!(committed.is_empty());
        p.stored(writes.clone());
        assert_eq!(committed.resolve(h("anon")), h("alice"));
        assert_eq!(
            committed.resolver().person(h("anon")),
            Some((h("alice"), "alice"))
        );
        assert_eq!(committed.resolver().person(h("alice")), None);
        // Loading the same writes gives the same map.
        let loaded = IdentityMap::from_stored(&KEY, writes);
        assert_eq!(loaded.resolve(h("anon")), h("alice"));
        // A new overlay over the committed map sees the link and adds nothing for it.
        let mut again = Pending::new(committed, KEY, 1000);
        let identify = link(LinkKind::Identify, Some("anon"), "alice");
        assert_eq!(apply(&mut again, identify), Outcome::Unchanged);
        assert!(again.take_writes().is_empty());
    }

    #[test]
    fn a_full_map_takes_no_new_ids() {
        let mut p = Pending::new(Arc::default(), KEY, 3);
        apply(&mut p, link(LinkKind::Identify, Some("a1"), "u1"));
        let next = link(LinkKind::Identify, Some("a2"), "u2");
        assert_eq!(apply(&mut p, next), Outcome::Full);
        assert_eq!(person(&p, "a2"), h("a2"));
        // Links between ids already known still apply.
        let known = link(LinkKind::Identify, Some("u1"), "u1");
        assert_eq!(apply(&mut p, known), Outcome::Unchanged);
    }
}
