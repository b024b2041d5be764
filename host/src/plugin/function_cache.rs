//! Cranelift's incremental compilation cache, in memory: the machine code
//! of each function compiled in this process, keyed by the function's own
//! content (its IR, the target and the compiler's settings), so that a
//! component rebuilt with most functions unchanged compiles only the
//! changed ones.
//!
//! For the plugin author's loop, not the daemon: `autocollect plugin run
//! --watch` recompiles the plugin after every build, and a Python or
//! JavaScript plugin is mostly its interpreter, the same from one build
//! to the next (an edited `app.py` changes the memory snapshot, not the
//! code). The daemon compiles a plugin once and keeps the result on disk
//! (`disk_cache`), and holding every function's code in memory would
//! cost it more than it saves.
//!
//! Bounded: once the entries pass [`FunctionCache::capacity`] bytes, the
//! cache starts again empty (a watch session that builds many versions
//! does not grow without end; the next compile fills it again).

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Mutex;

/// Compiled functions by their cache key.
#[derive(Debug)]
pub struct FunctionCache {
    entries: Mutex<Entries>,
    capacity: usize,
}

#[derive(Debug, Default)]
struct Entries {
    by_key: HashMap<Vec<u8>, Vec<u8>>,
    /// Keys and values, in bytes.
    bytes: usize,
}

impl FunctionCache {
    /// Enough for the functions of a Python and a JavaScript plugin
    /// together (about 60 MiB, `BENCHMARKS.md`) with room for rebuilds.
    pub const CAPACITY: usize = 256 << 20;

    pub fn new(capacity: usize) -> FunctionCache {
        FunctionCache {
            entries: Mutex::default(),
            capacity,
        }
    }

    /// The bytes the cache holds at most.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The bytes it holds now (keys and values).
    pub fn len_bytes(&self) -> usize {
        self.lock().bytes
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Entries> {
        // A panic while holding the lock leaves the map whole (each
        // operation is one insert or lookup): go on with it.
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl wasmtime::CacheStore for FunctionCache {
    fn get(&self, key: &[u8]) -> Option<Cow<'_, [u8]>> {
        self.lock().by_key.get(key).cloned().map(Cow::Owned)
    }

    fn insert(&self, key: &[u8], value: Vec<u8>) -> bool {
        let size = key.len() + value.len();
        if size > self.capacity {
            return false;
        }
        let mut entries = self.lock();
        let replaced = entries
            .by_key
            .get(key)
            .map_or(0, |old| key.len() + old.len());
        if entries.bytes - replaced + size > self.capacity {
            *entries = Entries::default();
        } else {
            entries.bytes -= replaced;
        }
        entries.by_key.insert(key.to_vec(), value);
        entries.bytes += size;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wasmtime::CacheStore;

    #[test]
    fn an_entry_comes_back_and_a_full_cache_starts_again_empty() {
        let cache = FunctionCache::new(100);
        assert!(cache.insert(b"a", vec![1; 40]));
        assert!(cache.insert(b"b", vec![2; 40]));
        assert_eq!(cache.get(b"a").as_deref(), Some(&[1u8; 40][..]));
        assert_eq!(cache.len_bytes(), 82);
        // Replacing an entry counts its size once.
        assert!(cache.insert(b"b", vec![3; 40]));
        assert_eq!(cache.len_bytes(), 82);
        // Past the capacity: emptied, then the new entry.
        assert!(cache.insert(b"c", vec![4; 40]));
        assert_eq!(cache.get(b"a"), None);
        assert_eq!(cache.get(b"c").as_deref(), Some(&[4u8; 40][..]));
        assert_eq!(cache.len_bytes(), 41);
        // Larger than the whole cache: refused, nothing dropped.
        assert!(!cache.insert(b"d", vec![5; 200]));
        assert_eq!(cache.len_bytes(), 41);
    }
}
