//! The machine's two big tables, printers and jobs, as maps that remember which entries were
//! handed out for writing. The indexes that spare a 10 000-printer fleet a full scan after
//! every batch (timers, the queue) are brought up to date from those changes alone.
//!
//! Reads go through `Deref` to the map; every way to write (`get_mut`, `insert`, `remove`,
//! `values_mut`, `iter_mut`) records what it touched, so a write the indexes do not
//! hear of cannot compile.

use std::borrow::Borrow;
use std::collections::btree_map::{IterMut, ValuesMut};
use std::collections::{BTreeMap, BTreeSet};
use std::ops::Deref;

/// What changed since the last [`Tracked::take_changed`].
#[derive(Debug)]
pub(super) enum Changed<K> {
    /// These keys (inserted, removed or written).
    Some(BTreeSet<K>),
    /// Possibly every entry (`values_mut`, `iter_mut`).
    All,
}

/// A `BTreeMap` that records the keys written since the changes were last taken.
#[derive(Debug)]
pub(super) struct Tracked<K: Ord + Clone, V> {
    map: BTreeMap<K, V>,
    changed: BTreeSet<K>,
    all: bool,
}

impl<K: Ord + Clone, V> Deref for Tracked<K, V> {
    type Target = BTreeMap<K, V>;

    fn deref(&self) -> &BTreeMap<K, V> {
        &self.map
    }
}

impl<K: Ord + Clone, V> FromIterator<(K, V)> for Tracked<K, V> {
    /// Every entry counts as changed: the indexes start from nothing.
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        Tracked {
            map: iter.into_iter().collect(),
            changed: BTreeSet::new(),
            all: true,
        }
    }
}

impl<K: Ord + Clone, V> Tracked<K, V> {
    pub(super) fn get_mut<Q>(&mut self, key: &Q) -> Option<&mut V>
    where
        K: Borrow<Q>,
        Q: Ord + ?Sized,
    {
        if !self.all {
            let k = self.map.get_key_value(key)?.0.clone();
            self.changed.insert(k);
        }
        self.map.get_mut(key)
    }

    pub(super) fn insert(&mut self, key: K, value: V) -> Option<V> {
        if !self.all {
            self.changed.insert(key.clone());
        }
        self.map.insert(key, value)
    }

    pub(super) fn remove<Q>(&mut self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Ord + ?Sized,
    {
        let (k, v) = self.map.remove_entry(key)?;
        if !self.all {
            self.changed.insert(k);
        }
        Some(v)
    }

    pub(super) fn values_mut(&mut self) -> ValuesMut<'_, K, V> {
        self.all = true;
        self.map.values_mut()
    }

    pub(super) fn iter_mut(&mut self) -> IterMut<'_, K, V> {
        self.all = true;
        self.map.iter_mut()
    }

    /// Whether anything was written since the changes were last taken.
    pub(super) fn has_changes(&self) -> bool {
        self.all || !self.changed.is_empty()
    }

    /// What was written since the last call, and forgets it.
    pub(super) fn take_changed(&mut self) -> Changed<K> {
        if std::mem::take(&mut self.all) {
            self.changed.clear();
            Changed::All
        } else {
            Changed::Some(std::mem::take(&mut self.changed))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(c: Changed<String>) -> Option<Vec<String>> {
        match c {
            Changed::Some(s) => Some(s.into_iter().collect()),
            Changed::All => None,
        }
    }

    #[test]
    fn every_write_is_recorded_once_and_taken_once() {
        let mut t: Tracked<String, u32> = [("a".to_owned(), 1), ("b".to_owned(), 2)]
            .into_iter()
            .collect();
        assert!(keys(t.take_changed()).is_none(), "a new table: all");
        assert!(!t.has_changes());
        // Reads record nothing; a get_mut of a missing key neither.
        assert_eq!(t.get("a"), Some(&1));
        assert!(t.get_mut("zz").is_none());
        assert!(!t.has_changes());
        *t.get_mut("a").expect("a") += 1;
        t.insert("c".into(), 3);
        t.remove("b");
        assert_eq!(
            keys(t.take_changed()),
            Some(vec!["a".into(), "b".into(), "c".into()])
        );
        assert_eq!(keys(t.take_changed()), Some(vec![]));
        for v in t.values_mut() {
            *v += 1;
        }
        t.get_mut("a");
        assert!(keys(t.take_changed()).is_none(), "values_mut: all");
        assert_eq!(t.get("a"), Some(&3));
    }
}
