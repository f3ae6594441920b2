//! Cross-worker metrics: a fixed-capacity table of counters in the `ws_status_zone` shared
//! memory, updated with atomics by every worker, and the `ws_status` output built from a
//! snapshot of it.
//!
//! The table is plain memory with a fixed layout (see [`Table`]); the nginx glue in
//! `status/glue.rs` only carves it out of the zone's slab pool, takes the zone mutex for
//! inserts and serves the handler. A label set (route, upstream) gets its [`Entry`] once per
//! tunnel, at attach, and the tunnel keeps a [`Slot`] to it: counting a frame is then two
//! relaxed atomic adds, with no lock and no allocation. When the table is full, new label sets
//! share entry 0, the "(other)" bucket.

use core::ptr::NonNull;
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering::*};

use crate::flow::{Event, Rule};
use crate::frame::Opcode;
use crate::observe::Observed;
use crate::record::{End, From};

pub mod render;

/// Longest route or upstream label kept, in bytes; longer values are cut at a char boundary.
pub const MAX_LABEL: usize = 128;

/// The label values of the bucket that collects label sets a full zone has no room for.
pub const OTHER_LABEL: &str = "(other)";

/// Tunnel-duration histogram bucket bounds, milliseconds (`+Inf` is implied).
pub const BUCKETS_MS: [u64; 13] = [
    100, 500, 1_000, 5_000, 10_000, 30_000, 60_000, 300_000, 600_000, 1_800_000, 3_600_000,
    21_600_000, 86_400_000,
];

/// Directions, indexed by [`dir_index`].
pub const DIRECTIONS: [From; 3] = [From::Client, From::Upstream, From::Proxy];

/// End causes, indexed by [`end_index`].
pub const ENDS: [End; 12] = [
    End::Normal,
    End::IdleTimeout,
    End::MaxLifetime,
    End::PingTimeout,
    End::Drain,
    End::TooBig,
    End::ProtocolError,
    End::ClientAbort,
    End::UpstreamAbort,
    End::UpstreamTimeout,
    End::Error,
    End::RateLimited,
];

/// Why a handshake was refused (`status::count_reject`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reject {
    Origin,
    Handshake,
    NoRoute,
    NotUpgrade,
}

impl Reject {
    pub const ALL: [Reject; 4] = [
        Reject::Origin,
        Reject::Handshake,
        Reject::NoRoute,
        Reject::NotUpgrade,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reject::Origin => "origin",
            Reject::Handshake => "handshake",
            Reject::NoRoute => "no_route",
            Reject::NotUpgrade => "not_upgrade",
        }
    }
}

pub fn dir_index(d: From) -> usize {
    match d {
        From::Client => 0,
        From::Upstream => 1,
        From::Proxy => 2,
    }
}

pub fn end_index(e: End) -> usize {
    match e {
        End::Normal => 0,
        End::IdleTimeout => 1,
        End::MaxLifetime => 2,
        End::PingTimeout => 3,
        End::Drain => 4,
        End::TooBig => 5,
        End::ProtocolError => 6,
        End::ClientAbort => 7,
        End::UpstreamAbort => 8,
        End::UpstreamTimeout => 9,
        End::Error => 10,
        End::RateLimited => 11,
    }
}

/// The histogram bucket of a duration: the first bound it does not exceed, else `+Inf`.
pub fn bucket_index(ms: u64) -> usize {
    BUCKETS_MS
        .iter()
        .position(|&b| ms <= b)
        .unwrap_or(BUCKETS_MS.len())
}

/// Close codes kept exactly without a slot: 1000..=1015.
const STD_CODES: usize = 16;
/// Other codes (3000-4999 mostly) kept exactly in slots claimed on first use.
const CODE_SLOTS: usize = 8;

/// Close frames one side sent, by code.
#[repr(C)]
pub struct CodeCounts {
    std: [AtomicU64; STD_CODES],
    codes: [AtomicU32; CODE_SLOTS],
    counts: [AtomicU64; CODE_SLOTS],
    /// A code that found no free slot, or an invalid one.
    other: AtomicU64,
    /// A Close frame without a status code.
    none: AtomicU64,
}

/// A close code as a label value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum CodeLabel {
    Code(u16),
    None,
    Other,
}

impl core::fmt::Display for CodeLabel {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            CodeLabel::Code(c) => write!(f, "{c}"),
            CodeLabel::None => f.write_str("none"),
            CodeLabel::Other => f.write_str("other"),
        }
    }
}

impl CodeCounts {
    fn add(&self, code: Option<u16>) {
        let Some(code) = code else {
            self.none.fetch_add(1, Relaxed);
            return;
        };
        if (1000..1000 + STD_CODES as u16).contains(&code) {
            self.std[usize::from(code - 1000)].fetch_add(1, Relaxed);
            return;
        }
        let want = u32::from(code);
        if code != 0 {
            for (slot, count) in self.codes.iter().zip(&self.counts) {
                let seen = match slot.compare_exchange(0, want, Relaxed, Relaxed) {
                    Ok(_) => want,
                    Err(v) => v,
                };
                if seen == want {
                    count.fetch_add(1, Relaxed);
                    return;
                }
            }
        }
        self.other.fetch_add(1, Relaxed);
    }

    fn snapshot(&self) -> Vec<(CodeLabel, u64)> {
        let mut out: Vec<(CodeLabel, u64)> = Vec::new();
        for (i, c) in self.std.iter().enumerate() {
            out.push((CodeLabel::Code(1000 + i as u16), c.load(Relaxed)));
        }
        for (slot, count) in self.codes.iter().zip(&self.counts) {
            let code = slot.load(Relaxed);
            if code != 0 {
                out.push((CodeLabel::Code(code as u16), count.load(Relaxed)));
            }
        }
        out.push((CodeLabel::None, self.none.load(Relaxed)));
        out.push((CodeLabel::Other, self.other.load(Relaxed)));
        out.retain(|&(_, n)| n > 0);
        out.sort();
        out
    }
}

/// The counters of one label set. All-zero memory is its initial state.
#[repr(C, align(64))]
pub struct Entry {
    route_len: u8,
    upstream_len: u8,
    key: [u8; 2 * MAX_LABEL],
    active: AtomicU64,
    opened: AtomicU64,
    closed: AtomicU64,
    frames: [[AtomicU64; 16]; 3],
    bytes: [[AtomicU64; 16]; 3],
    /// Client and upstream, text and binary.
    messages: [[AtomicU64; 2]; 2],
    codes: [CodeCounts; 3],
    ends: [AtomicU64; ENDS.len()],
    rejects: [AtomicU64; Reject::ALL.len()],
    buckets: [AtomicU64; BUCKETS_MS.len() + 1],
    duration_ms: AtomicU64,
    /// Frames refused by `ws_protocol_check`, from the client and the upstream, by rule.
    violations: [[AtomicU64; Rule::ALL.len()]; 2],
    /// Data messages a `ws_limit` held back, from the client and the upstream.
    delayed: [AtomicU64; 2],
}

impl Entry {
    fn route(&self) -> &[u8] {
        &self.key[..usize::from(self.route_len)]
    }

    fn upstream(&self) -> &[u8] {
        let r = usize::from(self.route_len);
        &self.key[r..r + usize::from(self.upstream_len)]
    }

    fn is(&self, key: &Key<'_>) -> bool {
        self.route() == key.route.as_bytes() && self.upstream() == key.upstream.as_bytes()
    }

    pub fn frame(&self, from: From, opcode: Opcode, len: u64) {
        let (d, o) = (dir_index(from), usize::from(opcode.as_u8() & 0x0f));
        self.frames[d][o].fetch_add(1, Relaxed);
        if len > 0 {
            self.bytes[d][o].fetch_add(len, Relaxed);
        }
    }

    pub fn message(&self, from: From, kind: Opcode) {
        let d = match from {
            From::Client => 0,
            From::Upstream => 1,
            From::Proxy => return,
        };
        let k = usize::from(kind == Opcode::Binary);
        self.messages[d][k].fetch_add(1, Relaxed);
    }

    /// Counts what a flow reports: frames and messages that passed, frames the proxy sent.
    pub fn on_event(&self, from: From, e: &Event<'_>) {
        match e {
            Event::Peer(Observed::Frame(f)) => self.frame(from, f.header.opcode, f.header.len),
            Event::Peer(Observed::Message(m)) => self.message(from, m.kind),
            Event::Proxy { opcode, len, .. } => self.frame(From::Proxy, *opcode, *len),
            Event::PongConsumed => {}
        }
    }

    pub fn opened(&self) {
        self.opened.fetch_add(1, Relaxed);
        self.active.fetch_add(1, Relaxed);
    }

    /// A tunnel ended: `codes` are the first Close code each side sent (`Some(None)`: a Close
    /// without a code), indexed like [`DIRECTIONS`].
    pub fn closed(&self, end: End, codes: [Option<Option<u16>>; 3], duration_ms: u64) {
        self.closed.fetch_add(1, Relaxed);
        self.active.fetch_sub(1, Relaxed);
        self.ends[end_index(end)].fetch_add(1, Relaxed);
        for (c, counts) in codes.iter().zip(&self.codes) {
            if let Some(code) = c {
                counts.add(*code);
            }
        }
        self.buckets[bucket_index(duration_ms)].fetch_add(1, Relaxed);
        self.duration_ms.fetch_add(duration_ms, Relaxed);
    }

    /// A peer's frame broke `rule` of `ws_protocol_check`.
    pub fn violation(&self, from: From, rule: Rule) {
        let side = usize::from(from != From::Client);
        self.violations[side][rule.index()].fetch_add(1, Relaxed);
    }

    /// A `ws_limit` held back a message from `from`.
    pub fn delayed(&self, from: From) {
        self.delayed[usize::from(from != From::Client)].fetch_add(1, Relaxed);
    }

    pub fn reject(&self, reason: Reject) {
        let i = Reject::ALL.iter().position(|&r| r == reason).unwrap_or(0);
        self.rejects[i].fetch_add(1, Relaxed);
    }

    fn snapshot(&self, other: bool) -> EntrySnapshot {
        let load = |a: &AtomicU64| a.load(Relaxed);
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        EntrySnapshot {
            route: if other {
                OTHER_LABEL.into()
            } else {
                text(self.route())
            },
            upstream: if other {
                OTHER_LABEL.into()
            } else {
                text(self.upstream())
            },
            other,
            active: load(&self.active) as i64,
            opened: load(&self.opened),
            closed: load(&self.closed),
            frames: self.frames.each_ref().map(|d| d.each_ref().map(load)),
            bytes: self.bytes.each_ref().map(|d| d.each_ref().map(load)),
            messages: self.messages.each_ref().map(|d| d.each_ref().map(load)),
            codes: self.codes.each_ref().map(CodeCounts::snapshot),
            ends: self.ends.each_ref().map(load),
            rejects: self.rejects.each_ref().map(load),
            violations: self.violations.each_ref().map(|d| d.each_ref().map(load)),
            delayed: self.delayed.each_ref().map(load),
            buckets: self.buckets.each_ref().map(load),
            duration_ms: load(&self.duration_ms),
        }
    }
}

/// A label set: route and upstream name, each cut to [`MAX_LABEL`] bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Key<'a> {
    pub route: &'a str,
    pub upstream: &'a str,
}

impl<'a> Key<'a> {
    pub fn new(route: &'a str, upstream: &'a str) -> Key<'a> {
        Key {
            route: cut(route),
            upstream: cut(upstream),
        }
    }

    fn hash(&self) -> u64 {
        // FNV-1a over both labels with a separator.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in self
            .route
            .bytes()
            .chain([0xff])
            .chain(self.upstream.bytes())
        {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        h
    }
}

fn cut(s: &str) -> &str {
    if s.len() <= MAX_LABEL {
        return s;
    }
    let mut n = MAX_LABEL;
    while !s.is_char_boundary(n) {
        n -= 1;
    }
    &s[..n]
}

const MAGIC: u64 = u64::from_le_bytes(*b"ngxwsst\0");
/// Changes whenever the layout does: a zone left by another layout is not reused.
/// 2: protocol violations by rule. 3: the end `rate_limited`, messages delayed by `ws_limit`.
const VERSION: u32 = 3;

/// The table header, at the start of the block.
#[repr(C, align(64))]
struct Header {
    magic: u64,
    version: u32,
    entry_size: u32,
    capacity: u32,
    index_len: u32,
    /// Entries in use, the "(other)" entry 0 included.
    used: AtomicU32,
    /// Set once the first label set found no room (and was logged).
    full: AtomicU32,
    log_dropped: AtomicU64,
}

/// Where the parts of a table of `capacity` entries are, and its size in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub capacity: usize,
    index_len: usize,
    entries_at: usize,
    pub bytes: usize,
}

impl Layout {
    pub fn new(capacity: usize) -> Layout {
        // At most half full, so a probe for a missing key ends quickly.
        let index_len = (2 * capacity).next_power_of_two();
        let index_at = size_of::<Header>();
        let entries_at = (index_at + 4 * index_len).next_multiple_of(align_of::<Entry>());
        Layout {
            capacity,
            index_len,
            entries_at,
            bytes: entries_at + capacity * size_of::<Entry>(),
        }
    }

    /// The largest table that fits in `bytes` (at least the "(other)" entry and one more),
    /// or `None` when not even that fits.
    pub fn fitting(bytes: usize) -> Option<Layout> {
        let per = size_of::<Entry>() + 8;
        let mut cap = bytes / per;
        while cap >= 2 {
            let l = Layout::new(cap);
            if l.bytes <= bytes {
                return Some(l);
            }
            cap -= 1;
        }
        None
    }
}

/// Why an existing block cannot be used as a table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Incompatible {
    Missing,
    Layout,
}

/// What [`Table::slot`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Found {
    Existing,
    Inserted,
    /// No room: the "(other)" entry. `first` is true for the first label set turned away.
    Other {
        first: bool,
    },
}

/// A counters table in memory shared by the workers.
#[derive(Debug, Clone, Copy)]
pub struct Table {
    base: NonNull<u8>,
}

// SAFETY: everything shared is atomic, or written once before it is published.
unsafe impl Send for Table {}
// SAFETY: as above.
unsafe impl Sync for Table {}

/// A tunnel's handle on its label set's counters.
#[derive(Debug, Clone, Copy)]
pub struct Slot(NonNull<Entry>);

impl Slot {
    pub fn entry(&self) -> &Entry {
        // SAFETY: a Slot is made only from a table entry, and a table lives as long as the
        // zone is mapped, which is the worker's whole life.
        unsafe { self.0.as_ref() }
    }
}

impl Table {
    /// Lays out an empty table in `mem`.
    ///
    /// # Safety
    /// `mem` must be valid for `layout.bytes` bytes, aligned to 64, and used by nothing else.
    pub unsafe fn init(mem: NonNull<u8>, layout: Layout) -> Table {
        // SAFETY: per the contract; all-zero is the initial state of every counter.
        unsafe {
            mem.as_ptr().write_bytes(0, layout.bytes);
            let h = mem.as_ptr().cast::<Header>();
            (*h).magic = MAGIC;
            (*h).version = VERSION;
            (*h).entry_size = size_of::<Entry>() as u32;
            (*h).capacity = layout.capacity as u32;
            (*h).index_len = layout.index_len as u32;
            (*h).used = AtomicU32::new(1);
        }
        Table { base: mem }
    }

    /// Reuses a table laid out earlier (by this or a previous configuration).
    ///
    /// # Safety
    /// `mem` must be null or a block [`Table::init`] laid out, still mapped.
    pub unsafe fn attach(mem: *mut u8) -> Result<Table, Incompatible> {
        let base = NonNull::new(mem).ok_or(Incompatible::Missing)?;
        // SAFETY: per the contract the block starts with a header.
        let h = unsafe { &*base.as_ptr().cast::<Header>() };
        if h.magic != MAGIC || h.version != VERSION || h.entry_size != size_of::<Entry>() as u32 {
            return Err(Incompatible::Layout);
        }
        Ok(Table { base })
    }

    fn header(&self) -> &Header {
        // SAFETY: the block starts with an initialized header.
        unsafe { &*self.base.as_ptr().cast::<Header>() }
    }

    fn layout(&self) -> Layout {
        Layout::new(self.header().capacity as usize)
    }

    fn index(&self) -> &[AtomicU32] {
        let l = self.layout();
        // SAFETY: the index follows the header, `index_len` zero-initialized atomics.
        unsafe {
            core::slice::from_raw_parts(
                self.base.as_ptr().add(size_of::<Header>()).cast(),
                l.index_len,
            )
        }
    }

    fn entry_ptr(&self, i: usize) -> NonNull<Entry> {
        let l = self.layout();
        debug_assert!(i < l.capacity);
        // SAFETY: entry `i` < capacity lies inside the block.
        unsafe { self.base.add(l.entries_at + i * size_of::<Entry>()).cast() }
    }

    fn entry(&self, i: usize) -> &Entry {
        // SAFETY: entries live as long as the table.
        unsafe { self.entry_ptr(i).as_ref() }
    }

    pub fn capacity(&self) -> usize {
        self.header().capacity as usize
    }

    /// Entries in use, "(other)" included.
    pub fn used(&self) -> usize {
        (self.header().used.load(Acquire) as usize).min(self.capacity())
    }

    /// Looks a label set up without locking.
    fn find(&self, key: &Key<'_>) -> Option<usize> {
        let index = self.index();
        let mask = index.len() - 1;
        let mut i = key.hash() as usize & mask;
        for _ in 0..index.len() {
            let v = index[i].load(Acquire) as usize;
            if v == 0 {
                return None;
            }
            if self.entry(v - 1).is(key) {
                return Some(v - 1);
            }
            i = (i + 1) & mask;
        }
        None
    }

    /// The entry of a label set: found without a lock, or inserted while `lock`'s guard is
    /// held (the zone mutex: inserts from every worker are serialized by it).
    pub fn slot<G>(&self, key: Key<'_>, lock: impl FnOnce() -> G) -> (Slot, Found) {
        let key = Key::new(key.route, key.upstream);
        if let Some(i) = self.find(&key) {
            return (Slot(self.entry_ptr(i)), Found::Existing);
        }
        let guard = lock();
        let found = self.insert_locked(&key);
        drop(guard);
        found
    }

    fn insert_locked(&self, key: &Key<'_>) -> (Slot, Found) {
        // Another worker may have inserted it since the lock-free look-up.
        if let Some(i) = self.find(key) {
            return (Slot(self.entry_ptr(i)), Found::Existing);
        }
        let h = self.header();
        let n = h.used.load(Relaxed) as usize;
        if n >= self.capacity() {
            let first = h.full.swap(1, Relaxed) == 0;
            return (Slot(self.entry_ptr(0)), Found::Other { first });
        }
        // SAFETY: entry `n` is not published yet: only the lock holder touches it.
        unsafe {
            let e = self.entry_ptr(n).as_ptr();
            let (r, u) = (key.route.as_bytes(), key.upstream.as_bytes());
            (*e).route_len = r.len() as u8;
            (*e).upstream_len = u.len() as u8;
            (&mut (*e).key)[..r.len()].copy_from_slice(r);
            (&mut (*e).key)[r.len()..r.len() + u.len()].copy_from_slice(u);
        }
        let index = self.index();
        let mask = index.len() - 1;
        let mut i = key.hash() as usize & mask;
        while index[i].load(Relaxed) != 0 {
            i = (i + 1) & mask;
        }
        index[i].store(n as u32 + 1, Release);
        h.used.store(n as u32 + 1, Release);
        (Slot(self.entry_ptr(n)), Found::Inserted)
    }

    pub fn count_log_dropped(&self, n: u64) {
        self.header().log_dropped.fetch_add(n, Relaxed);
    }

    /// A copy of every counter, label sets in insertion order; "(other)" last, when used.
    pub fn snapshot(&self) -> Snapshot {
        let h = self.header();
        let used = self.used();
        let mut entries: Vec<EntrySnapshot> =
            (1..used).map(|i| self.entry(i).snapshot(false)).collect();
        if h.full.load(Relaxed) != 0 {
            entries.push(self.entry(0).snapshot(true));
        }
        Snapshot {
            capacity: self.capacity() - 1,
            used: used - 1,
            log_dropped: h.log_dropped.load(Relaxed),
            entries,
        }
    }
}

/// The counters of one label set at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EntrySnapshot {
    pub route: String,
    pub upstream: String,
    pub other: bool,
    pub active: i64,
    pub opened: u64,
    pub closed: u64,
    /// By direction ([`DIRECTIONS`]) and opcode value.
    pub frames: [[u64; 16]; 3],
    pub bytes: [[u64; 16]; 3],
    /// Client and upstream; text and binary.
    pub messages: [[u64; 2]; 2],
    /// By side ([`DIRECTIONS`]): non-zero counts, ordered by code.
    pub codes: [Vec<(CodeLabel, u64)>; 3],
    pub ends: [u64; ENDS.len()],
    pub rejects: [u64; Reject::ALL.len()],
    /// Client and upstream, by [`Rule::ALL`].
    pub violations: [[u64; Rule::ALL.len()]; 2],
    /// Messages held back by `ws_limit`: client, upstream.
    pub delayed: [u64; 2],
    /// Per bucket (not cumulative), `+Inf` last.
    pub buckets: [u64; BUCKETS_MS.len() + 1],
    pub duration_ms: u64,
}

/// Every counter of a zone at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Label sets the zone has room for, and in use ("(other)" not counted).
    pub capacity: usize,
    pub used: usize,
    pub log_dropped: u64,
    pub entries: Vec<EntrySnapshot>,
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::alloc::{alloc_zeroed, dealloc, Layout as MemLayout};
    use std::sync::{Arc, Mutex};

    /// A table in heap memory, freed on drop.
    pub(crate) struct Mem {
        ptr: NonNull<u8>,
        layout: MemLayout,
        pub table: Table,
    }

    impl Mem {
        pub(crate) fn new(capacity: usize) -> Mem {
            let l = Layout::new(capacity);
            let layout = MemLayout::from_size_align(l.bytes, 64).unwrap();
            // SAFETY: non-zero size.
            let ptr = NonNull::new(unsafe { alloc_zeroed(layout) }).unwrap();
            // SAFETY: fresh block of the right size and alignment.
            let table = unsafe { Table::init(ptr, l) };
            Mem { ptr, layout, table }
        }
    }

    impl Drop for Mem {
        fn drop(&mut self) {
            // SAFETY: allocated in `new` with this layout.
            unsafe { dealloc(self.ptr.as_ptr(), self.layout) };
        }
    }

    // SAFETY: the table is shared through atomics only.
    unsafe impl Send for Mem {}
    // SAFETY: as above.
    unsafe impl Sync for Mem {}

    fn no_lock() {}

    #[test]
    fn same_key_same_entry() {
        let m = Mem::new(8);
        let (a, fa) = m.table.slot(Key::new("", "chat"), no_lock);
        let (b, fb) = m.table.slot(Key::new("", "chat"), no_lock);
        let (c, _) = m.table.slot(Key::new("chat", ""), no_lock);
        assert_eq!((fa, fb), (Found::Inserted, Found::Existing));
        assert_eq!(a.0, b.0);
        assert_ne!(a.0, c.0, "route and upstream are distinct labels");
        assert_eq!(m.table.used(), 3);
    }

    #[test]
    fn full_table_uses_other_and_says_so_once() {
        let m = Mem::new(4);
        for i in 0..3 {
            let (_, f) = m.table.slot(Key::new("", &format!("u{i}")), no_lock);
            assert_eq!(f, Found::Inserted);
        }
        let (o1, f1) = m.table.slot(Key::new("", "u3"), no_lock);
        let (o2, f2) = m.table.slot(Key::new("", "u4"), no_lock);
        assert_eq!(f1, Found::Other { first: true });
        assert_eq!(f2, Found::Other { first: false });
        assert_eq!(o1.0, o2.0);
        // Existing entries are still found.
        assert_eq!(m.table.slot(Key::new("", "u1"), no_lock).1, Found::Existing);
        o1.entry().opened();
        let s = m.table.snapshot();
        assert_eq!((s.capacity, s.used), (3, 3));
        let last = s.entries.last().unwrap();
        assert!(last.other);
        assert_eq!(last.upstream, OTHER_LABEL);
        assert_eq!(last.opened, 1);
    }

    #[test]
    fn other_is_hidden_until_used() {
        let m = Mem::new(4);
        m.table.slot(Key::new("", "a"), no_lock);
        assert!(m.table.snapshot().entries.iter().all(|e| !e.other));
    }

    #[test]
    fn long_labels_are_cut_at_char_boundary() {
        let long = "é".repeat(100);
        let k = Key::new(&long, "x");
        assert!(k.route.len() <= MAX_LABEL);
        assert!(long.starts_with(k.route));
        let m = Mem::new(4);
        let (s, _) = m.table.slot(k, no_lock);
        assert_eq!(m.table.slot(Key::new(&long, "x"), no_lock).0 .0, s.0);
        assert_eq!(m.table.snapshot().entries[0].route, k.route);
    }

    #[test]
    fn counts_frames_messages_bytes_closes() {
        let m = Mem::new(4);
        let (s, _) = m.table.slot(Key::new("", "up"), no_lock);
        let e = s.entry();
        e.opened();
        e.frame(From::Client, Opcode::Text, 5);
        e.frame(From::Client, Opcode::Continuation, 3);
        e.message(From::Client, Opcode::Text);
        e.frame(From::Upstream, Opcode::Binary, 7);
        e.message(From::Upstream, Opcode::Binary);
        e.frame(From::Proxy, Opcode::Close, 2);
        e.frame(From::Proxy, Opcode::Reserved(3), 0);
        e.closed(
            End::Normal,
            [Some(Some(1000)), Some(Some(4002)), None],
            1_500,
        );
        let s = &m.table.snapshot().entries[0];
        assert_eq!((s.active, s.opened, s.closed), (0, 1, 1));
        assert_eq!(s.frames[0][1], 1);
        assert_eq!(s.frames[0][0], 1);
        assert_eq!(s.bytes[0][1] + s.bytes[0][0], 8);
        assert_eq!(s.messages, [[1, 0], [0, 1]]);
        assert_eq!(s.frames[2][8], 1);
        assert_eq!(s.frames[2][3], 1);
        assert_eq!(s.codes[0], vec![(CodeLabel::Code(1000), 1)]);
        assert_eq!(s.codes[1], vec![(CodeLabel::Code(4002), 1)]);
        assert!(s.codes[2].is_empty());
        assert_eq!(s.ends[end_index(End::Normal)], 1);
        assert_eq!(s.buckets[bucket_index(1_500)], 1);
        assert_eq!(s.duration_ms, 1_500);
    }

    #[test]
    fn close_code_slots_overflow_to_other() {
        let m = Mem::new(2);
        let e = m.table.slot(Key::new("", ""), no_lock).0;
        for code in 4000..4000 + CODE_SLOTS as u16 + 2 {
            e.entry()
                .closed(End::Normal, [Some(Some(code)), None, None], 0);
        }
        e.entry()
            .closed(End::Normal, [Some(None), Some(Some(4000)), None], 0);
        let s = &m.table.snapshot().entries[0];
        assert_eq!(s.codes[0].len(), CODE_SLOTS + 2);
        assert!(s.codes[0].contains(&(CodeLabel::Other, 2)));
        assert!(s.codes[0].contains(&(CodeLabel::None, 1)));
        assert_eq!(s.codes[1], vec![(CodeLabel::Code(4000), 1)]);
    }

    #[test]
    fn buckets() {
        assert_eq!(bucket_index(0), 0);
        assert_eq!(bucket_index(100), 0);
        assert_eq!(bucket_index(101), 1);
        assert_eq!(bucket_index(86_400_000), BUCKETS_MS.len() - 1);
        assert_eq!(bucket_index(u64::MAX), BUCKETS_MS.len());
    }

    #[test]
    fn layout_fits_and_attach_checks_the_header() {
        for bytes in [0, 100, 8 * 1024, 32 * 1024, 1 << 20] {
            match Layout::fitting(bytes) {
                Some(l) => {
                    assert!(l.bytes <= bytes);
                    assert!(Layout::new(l.capacity + 1).bytes > bytes);
                }
                None => assert!(bytes < Layout::new(2).bytes),
            }
        }
        assert!(Layout::fitting(1 << 20).unwrap().capacity > 300);
        let m = Mem::new(4);
        m.table.slot(Key::new("r", "u"), no_lock);
        // SAFETY: the block was laid out by Table::init.
        let again = unsafe { Table::attach(m.ptr.as_ptr()) }.unwrap();
        assert_eq!(again.snapshot(), m.table.snapshot());
        // SAFETY: null is allowed.
        let missing = unsafe { Table::attach(core::ptr::null_mut()) };
        assert_eq!(missing.unwrap_err(), Incompatible::Missing);
        #[repr(C, align(64))]
        struct Junk([u8; 256]);
        let mut junk = Junk([7; 256]);
        // SAFETY: a readable, aligned block as large as a header.
        let r = unsafe { Table::attach(junk.0.as_mut_ptr()) };
        assert_eq!(r.unwrap_err(), Incompatible::Layout);
    }

    #[test]
    fn concurrent_inserts_and_counts_are_exact() {
        let m = Arc::new(Mem::new(64));
        let lock = Arc::new(Mutex::new(()));
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let (m, lock) = (m.clone(), lock.clone());
                std::thread::spawn(move || {
                    for i in 0..2000 {
                        let up = format!("u{}", (i + t) % 40);
                        let (s, _) = m.table.slot(Key::new("", &up), || lock.lock().unwrap());
                        s.entry().frame(From::Client, Opcode::Text, 3);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let s = m.table.snapshot();
        assert_eq!(s.used, 40);
        let mut names: Vec<_> = s.entries.iter().map(|e| e.upstream.clone()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), 40, "no label set inserted twice");
        let frames: u64 = s.entries.iter().map(|e| e.frames[0][1]).sum();
        let bytes: u64 = s.entries.iter().map(|e| e.bytes[0][1]).sum();
        assert_eq!((frames, bytes), (16_000, 48_000));
    }
}
