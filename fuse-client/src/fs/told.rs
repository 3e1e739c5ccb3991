//! What the kernel may hold of each file's size, from what this mount told it: an open
//! must make the kernel drop a size from another version before reads stop at it, and
//! may spare the request that refetches one when the kernel can only hold the right one.
//!
//! Each reply carrying a file's attributes records the size it told; a lookup reply
//! (lookup, create, readdirplus) also counts one kernel reference, and `forget` gives
//! them back: at zero the kernel has dropped the inode, and with it every size. A size
//! recorded here may never have reached the kernel (a reply it refused as older than an
//! invalidation), so this errs one way only: a size the kernel holds is always recorded.
//! After an open has made the kernel drop a file's attributes, what it holds comes from
//! replies recorded since. A reply's size is worked out before it is recorded: an open
//! while any reply carrying attributes is under way refreshes whatever the record says
//! (`FsCore::attr_reply`), and so does the next open after a refresh that did not land.

use rustc_hash::FxHashMap;

#[derive(Debug, Default)]
pub struct Told {
    files: FxHashMap<u64, Record>,
}

#[derive(Debug, Clone, Copy)]
struct Record {
    /// Lookups the kernel holds, as counted from the replies.
    lookups: u64,
    sizes: Sizes,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sizes {
    /// None told since the kernel last dropped the file's attributes.
    None,
    /// Only this one.
    One(u64),
    /// More than one: which the kernel holds is not known.
    Several,
}

impl Sizes {
    fn with(self, size: u64) -> Sizes {
        match self {
            Sizes::None => Sizes::One(size),
            Sizes::One(s) if s == size => self,
            _ => Sizes::Several,
        }
    }
}

impl Told {
    fn record(&mut self, ino: u64) -> &mut Record {
        self.files.entry(ino).or_insert(Record {
            lookups: 0,
            sizes: Sizes::None,
        })
    }

    /// A reply gave the kernel an entry for file `ino` (one more lookup) of `size`.
    pub fn entry(&mut self, ino: u64, size: u64) {
        let r = self.record(ino);
        r.lookups += 1;
        r.sizes = r.sizes.with(size);
    }

    /// A reply gave the kernel the attributes of file `ino`, of `size`.
    pub fn attr(&mut self, ino: u64, size: u64) {
        let r = self.record(ino);
        r.sizes = r.sizes.with(size);
    }

    /// The kernel gave back `n` lookups of `ino`.
    pub fn forget(&mut self, ino: u64, n: u64) {
        if let Some(r) = self.files.get_mut(&ino) {
            r.lookups = r.lookups.saturating_sub(n);
            if r.lookups == 0 {
                self.files.remove(&ino);
            }
        }
    }

    /// Whether the kernel may hold a size of `ino` other than `size`.
    pub fn may_differ(&self, ino: u64, size: u64) -> bool {
        self.files.get(&ino).is_some_and(|r| match r.sizes {
            Sizes::None => false,
            Sizes::One(s) => s != size,
            Sizes::Several => true,
        })
    }

    /// The kernel may hold any size of `ino` (an invalidation that did not land).
    pub fn unknown(&mut self, ino: u64) {
        self.record(ino).sizes = Sizes::Several;
    }

    /// The kernel is about to drop the attributes of `ino` (before the reply that lets it
    /// read on): sizes told from now on are the ones it can hold.
    pub fn dropping(&mut self, ino: u64) {
        if let Some(r) = self.files.get_mut(&ino) {
            r.sizes = Sizes::None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_size_other_than_the_ones_told_is_refreshed_until_the_kernel_lets_go() {
        let mut t = Told::default();
        // Never told: the kernel cannot hold one.
        assert!(!t.may_differ(5, 10));
        t.entry(5, 10);
        assert!(!t.may_differ(5, 10));
        assert!(t.may_differ(5, 11));
        // Two sizes told: either may be held.
        t.attr(5, 11);
        assert!(t.may_differ(5, 11));
        assert!(t.may_differ(5, 10));
        // Dropped before an open: only what is told afterwards counts.
        t.dropping(5);
        assert!(!t.may_differ(5, 12));
        t.attr(5, 12);
        assert!(!t.may_differ(5, 12));
        assert!(t.may_differ(5, 11));
        // Two lookups held, one given back: the kernel still has the inode.
        t.entry(5, 12);
        t.attr(5, 13);
        t.forget(5, 1);
        assert!(t.may_differ(5, 12));
        // The last one given back: nothing is held.
        t.forget(5, 1);
        assert!(!t.may_differ(5, 12));
        // A lookup counted before the forget of the kernel's older inode was handled.
        t.entry(6, 1);
        t.entry(6, 2);
        t.forget(6, 1);
        assert!(t.may_differ(6, 2));
        // A refresh that did not land: anything may be held, until the next one.
        t.entry(7, 1);
        t.unknown(7);
        assert!(t.may_differ(7, 1));
        t.dropping(7);
        assert!(!t.may_differ(7, 1));
    }
}
