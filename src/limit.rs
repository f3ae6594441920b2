//! nginx glue of the message rate limits: the `ws_limit_zone` shared zone (buckets keyed by a
//! complex value in a red-black tree with an LRU queue, in a slab pool, as `limit_req_zone`
//! keeps its nodes), the `ws_limit*` directives, and the per-tunnel [`Limiter`] that admits
//! data messages. The leaky bucket itself is `ws_core::limit`.
//!
//! A tunnel evaluates its keys once, when it opens (the variables a key is made of belong to
//! the request), and pins its buckets' nodes for its lifetime: a message then costs one lock of
//! the zone and no lookup, and the LRU eviction never frees a node a live tunnel points to.

use core::ffi::c_void;
use core::mem::size_of;
use core::ptr::{self, NonNull};

use ngx::core::{Pool, SlabPool};
use ngx::ffi::{
    ngx_http_compile_complex_value, ngx_http_compile_complex_value_t, ngx_http_complex_value,
    ngx_http_complex_value_t, ngx_http_request_t, ngx_int_t, ngx_log_t, ngx_pagesize, ngx_queue_t,
    ngx_rbtree_delete, ngx_rbtree_insert, ngx_rbtree_node_t, ngx_rbtree_t, ngx_shared_memory_add,
    ngx_shm_zone_t, ngx_slab_alloc, ngx_slab_alloc_locked, ngx_slab_free_locked, ngx_slab_pool_t,
    ngx_str_t, NGX_ERROR, NGX_LOG_ALERT, NGX_LOG_EMERG, NGX_LOG_ERR, NGX_OK,
};
use ngx::ngx_log_error;
use ws_core::flow::Admission;
use ws_core::limit::{
    delay_log_level, parse_log_level, Bucket, Limit, Msec, Rate, Status, Verdict,
};

use crate::conf::{
    directive_handler, param, parse_size, text, ConfError, Directive, LimitFrom, LimitRef, LocConf,
    MainConf, ZoneRef,
};
use crate::record::From;

/// The shared-memory tag of `ws_limit_zone`s: another than `ws_status_zone`'s (the module), so
/// that nginx refuses one name for both.
static LIMIT_ZONE_TAG: u8 = 0;

/// `limit_req`'s bound on a key.
const MAX_KEY: usize = 65535;

/// A `ws_limit_zone`, in the configuration pool; its shm zone's `data` points here.
pub struct LimitZone {
    name: String,
    key: ngx_http_complex_value_t,
    key_text: String,
    rate: Rate,
    zone: NonNull<ngx_shm_zone_t>,
    /// The tree, set by the zone's init in the master (shared by every worker).
    sh: *mut Shared,
}

const MAGIC: u64 = u64::from_le_bytes(*b"ngxwslm1");

/// The zone's root, at the slab pool's `data`.
#[repr(C)]
struct Shared {
    /// Changes whenever [`Node`]'s layout does: a zone left by another layout is not reused.
    magic: u64,
    tree: ngx_rbtree_t,
    sentinel: ngx_rbtree_node_t,
    /// Most recently used first.
    lru: ngx_queue_t,
}

/// One key's bucket; the key's bytes follow it.
#[repr(C)]
struct Node {
    /// `key` is the hash of the key's bytes.
    rb: ngx_rbtree_node_t,
    lru: ngx_queue_t,
    bucket: Bucket,
    /// Live tunnels that point here; a node in use is never evicted.
    users: u32,
    /// No message counted yet (the first one makes the bucket, as in `limit_req`).
    fresh: bool,
    len: u16,
}

impl Node {
    /// # Safety
    /// `n` must be a node allocated with its key after it.
    unsafe fn key<'a>(n: *const Node) -> &'a [u8] {
        // SAFETY: per the contract.
        unsafe {
            core::slice::from_raw_parts(n.cast::<u8>().add(size_of::<Node>()), (*n).len.into())
        }
    }

    /// The node of an LRU link.
    fn of_lru(q: *mut ngx_queue_t) -> *mut Node {
        q.cast::<u8>()
            .wrapping_sub(core::mem::offset_of!(Node, lru))
            .cast()
    }
}

fn hash(key: &[u8]) -> usize {
    // FNV-1a: collisions only cost a byte comparison in the tree.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in key {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h as usize
}

/// `ngx_memn2cmp`'s order: bytes, then length.
fn key_order(a: &[u8], b: &[u8]) -> core::cmp::Ordering {
    a.cmp(b)
}

/// The tree's insert: by hash, then by key bytes.
unsafe extern "C" fn ngx_http_ws_limit_insert(
    mut temp: *mut ngx_rbtree_node_t,
    node: *mut ngx_rbtree_node_t,
    sentinel: *mut ngx_rbtree_node_t,
) {
    // SAFETY: nginx passes the tree's root (not the sentinel), the node to insert and the
    // sentinel; every node in the tree is a Node with its key after it.
    unsafe {
        loop {
            let p = if (*node).key < (*temp).key {
                &mut (*temp).left
            } else if (*node).key > (*temp).key {
                &mut (*temp).right
            } else if key_order(Node::key(node.cast()), Node::key(temp.cast())).is_lt() {
                &mut (*temp).left
            } else {
                &mut (*temp).right
            };
            if *p == sentinel {
                *p = node;
                break;
            }
            temp = *p;
        }
        (*node).parent = temp;
        (*node).left = sentinel;
        (*node).right = sentinel;
        (*node).color = 1;
    }
}

/// `ngx_queue_*`, which are C macros.
mod queue {
    use ngx::ffi::ngx_queue_t;

    /// # Safety
    /// `h` is a queue head, `x` a link in no queue.
    pub unsafe fn insert_head(h: *mut ngx_queue_t, x: *mut ngx_queue_t) {
        // SAFETY: per the contract.
        unsafe {
            (*x).next = (*h).next;
            (*(*x).next).prev = x;
            (*x).prev = h;
            (*h).next = x;
        }
    }

    /// # Safety
    /// `x` is a link in a queue.
    pub unsafe fn remove(x: *mut ngx_queue_t) {
        // SAFETY: per the contract.
        unsafe {
            (*(*x).next).prev = (*x).prev;
            (*(*x).prev).next = (*x).next;
        }
    }
}

impl LimitZone {
    fn pool(&self) -> Option<SlabPool> {
        // SAFETY: the zone is mapped in every process of the cycle that configured it.
        unsafe { SlabPool::from_shm_zone(self.zone.as_ref()) }
    }

    /// The node of `key`, created when new, with one more user. `None` when the zone has no
    /// room even after dropping its least recently used unused node.
    fn pin(&self, key: &[u8], now: Msec) -> Option<NonNull<Node>> {
        let sh = self.sh;
        if sh.is_null() {
            return None;
        }
        let pool = self.pool()?;
        let locked = pool.lock();
        let h = hash(key);
        // SAFETY: the tree lives in the zone, mapped here, and we hold its lock.
        unsafe {
            let sentinel = (*sh).tree.sentinel;
            let mut n = (*sh).tree.root;
            while n != sentinel {
                let ord = h
                    .cmp(&(*n).key)
                    .then_with(|| key_order(key, Node::key(n.cast())));
                match ord {
                    core::cmp::Ordering::Less => n = (*n).left,
                    core::cmp::Ordering::Greater => n = (*n).right,
                    core::cmp::Ordering::Equal => {
                        let node = n.cast::<Node>();
                        (*node).users += 1;
                        queue::remove(&raw mut (*node).lru);
                        queue::insert_head(&raw mut (*sh).lru, &raw mut (*node).lru);
                        return NonNull::new(node);
                    }
                }
            }
            let shpool = locked_ptr(&pool);
            let size = size_of::<Node>() + key.len();
            self.expire(now, false);
            let mut mem = ngx_slab_alloc_locked(shpool, size);
            if mem.is_null() {
                self.expire(now, true);
                mem = ngx_slab_alloc_locked(shpool, size);
            }
            let node = NonNull::new(mem.cast::<Node>())?;
            let p = node.as_ptr();
            ptr::write_bytes(p.cast::<u8>(), 0, size_of::<Node>());
            (*p).rb.key = h;
            (*p).bucket = Bucket::new(now);
            (*p).users = 1;
            (*p).fresh = true;
            (*p).len = key.len() as u16;
            ptr::copy_nonoverlapping(
                key.as_ptr(),
                p.cast::<u8>().add(size_of::<Node>()),
                key.len(),
            );
            ngx_rbtree_insert(&raw mut (*sh).tree, &raw mut (*p).rb);
            queue::insert_head(&raw mut (*sh).lru, &raw mut (*p).lru);
            drop(locked);
            Some(node)
        }
    }

    /// A tunnel is done with `node`.
    fn unpin(&self, node: NonNull<Node>) {
        let Some(pool) = self.pool() else { return };
        let _locked = pool.lock();
        // SAFETY: a pinned node is never freed; we hold the lock.
        unsafe { (*node.as_ptr()).users = (*node.as_ptr()).users.saturating_sub(1) };
    }

    /// Makes room, under the lock: drops up to two unused nodes that are drained and a minute
    /// old from the LRU end; with `force`, first the least recently used unused node
    /// whatever its state (`limit_req_zone`'s policy, skipping the nodes live tunnels use).
    ///
    /// # Safety
    /// The zone's lock must be held.
    unsafe fn expire(&self, now: Msec, force: bool) {
        let sh = self.sh;
        let mut force = force;
        let most = if force { 3 } else { 2 };
        let mut dropped = 0;
        // SAFETY: per the contract; the queue links live in the zone.
        unsafe {
            let head = &raw mut (*sh).lru;
            let mut q = (*head).prev;
            let mut steps = 0;
            while q != head && dropped < most && steps < 64 {
                steps += 1;
                let node = Node::of_lru(q);
                let prev = (*q).prev;
                if (*node).users > 0 {
                    q = prev;
                    continue;
                }
                if !force && !(*node).bucket.expired(self.rate, now) {
                    return;
                }
                force = false;
                dropped += 1;
                queue::remove(q);
                ngx_rbtree_delete(&raw mut (*sh).tree, &raw mut (*node).rb);
                let pool = self.zone.as_ref().shm.addr.cast::<ngx_slab_pool_t>();
                ngx_slab_free_locked(pool, node.cast());
                q = prev;
            }
        }
    }

    /// One more message for `node`'s bucket (or only a look, when `check`).
    fn take(&self, node: NonNull<Node>, limit: &Limit, now: Msec, check: bool) -> (Verdict, u64) {
        let Some(pool) = self.pool() else {
            return (Verdict::Pass, 0);
        };
        let _locked = pool.lock();
        // SAFETY: a pinned node is never freed; we hold the lock.
        let n = unsafe { &mut *node.as_ptr() };
        if n.fresh {
            if !check {
                n.fresh = false;
                n.bucket = Bucket::new(now);
            }
            return (Verdict::Pass, 0);
        }
        let v = if check {
            limit.check(&n.bucket, now)
        } else {
            limit.take(&mut n.bucket, now)
        };
        // The excess is for the error log: what the message found (an accounted one left it).
        let excess = if check || v == Verdict::Reject {
            limit.excess(&n.bucket, now)
        } else {
            n.bucket.excess
        };
        // SAFETY: as above; the node is in the zone's LRU queue.
        unsafe {
            let head = &raw mut (*self.sh).lru;
            if (*head).next != &raw mut n.lru {
                queue::remove(&raw mut n.lru);
                queue::insert_head(head, &raw mut n.lru);
            }
        }
        (v, excess)
    }
}

/// The raw pool of a slab pool (for the `_locked` allocator calls).
fn locked_ptr(pool: &SlabPool) -> *mut ngx_slab_pool_t {
    ptr::from_ref(pool.as_ref()).cast_mut()
}

directive_handler!(
    /// `ws_limit_zone key zone=name:size rate=rate;`
    ngx_http_ws_set_limit_zone: MainConf => parse_limit_zone
);
directive_handler!(
    /// `ws_limit zone=name [burst=number] [nodelay] [from=client|upstream];`
    ngx_http_ws_set_limit: LocConf => parse_limit
);
directive_handler!(
    /// `ws_limit_log_level info | notice | warn | error;`
    ngx_http_ws_set_limit_log_level: LocConf => parse_limit_log_level
);

fn min_zone_size() -> usize {
    // SAFETY: set by ngx_os_init before the configuration is read.
    8 * unsafe { ngx_pagesize }
}

fn parse_limit_zone(d: &Directive<'_>, _mcf: &mut MainConf) -> Result<(), ConfError> {
    let a = d.args;
    let mut zone: Option<(ngx_str_t, usize)> = None;
    let mut rate: Option<Rate> = None;
    for p in &a[1..] {
        if let Some(v) = param(p, b"zone=") {
            let b = v.as_bytes();
            let colon = b
                .iter()
                .position(|&c| c == b':')
                .filter(|&i| i > 0)
                .ok_or_else(|| ConfError::LimitZoneSize(text(p)))?;
            let size = ngx_str_t {
                len: b.len() - colon - 1,
                data: v.data.wrapping_add(colon + 1),
            };
            let size = parse_size(&size).ok_or_else(|| ConfError::LimitZoneSize(text(p)))?;
            if size < min_zone_size() {
                return Err(ConfError::LimitZoneTooSmall {
                    value: text(p),
                    min_k: min_zone_size() / 1024,
                });
            }
            zone = Some((
                ngx_str_t {
                    len: colon,
                    data: v.data,
                },
                size,
            ));
        } else if let Some(v) = param(p, b"rate=") {
            rate = Some(Rate::parse(v.as_bytes()).ok_or_else(|| ConfError::LimitRate(text(p)))?);
        } else {
            return Err(d.invalid_param(p));
        }
    }
    let (mut name, size) = zone.ok_or(ConfError::MissingParam {
        directive: "ws_limit_zone",
        param: "zone",
    })?;
    let rate = rate.ok_or(ConfError::MissingParam {
        directive: "ws_limit_zone",
        param: "rate",
    })?;

    // SAFETY: cf is valid during parsing; the tag tells our limit zones from other zones.
    let zone = unsafe {
        ngx_shared_memory_add(
            d.cf,
            &mut name,
            size,
            ptr::from_ref(&LIMIT_ZONE_TAG).cast_mut().cast(),
        )
    };
    // nginx has said why (another use of the name, another size).
    let zone = NonNull::new(zone).ok_or(ConfError::Reported)?;
    // SAFETY: a zone entry of the cycle being configured.
    let z = unsafe { &mut *zone.as_ptr() };
    if let Some(bound) = NonNull::new(z.data.cast::<LimitZone>()) {
        // SAFETY: our zones' data is a LimitZone in the configuration pool.
        let key = unsafe { bound.as_ref() }.key_text.clone();
        return Err(ConfError::LimitZoneBound {
            name: text(&name),
            key,
        });
    }

    // SAFETY: cf->pool is the configuration pool; it outlives every request of this cycle.
    let pool = unsafe { Pool::from_ngx_pool((*d.cf).pool) };
    let lz = pool.allocate(LimitZone {
        name: text(&name),
        // SAFETY: a plain C struct; nginx's compiler fills it.
        key: unsafe { core::mem::zeroed() },
        key_text: text(&a[0]),
        rate,
        zone,
        sh: ptr::null_mut(),
    });
    let lz = NonNull::new(lz).ok_or(ConfError::NoMemory)?;
    let mut value = a[0];
    // SAFETY: a plain C struct for which all-zero is the initial state, as nginx's callers use.
    let mut ccv: ngx_http_compile_complex_value_t = unsafe { core::mem::zeroed() };
    ccv.cf = d.cf;
    ccv.value = &mut value;
    // SAFETY: the LimitZone lives in the configuration pool, at a fixed address.
    ccv.complex_value = unsafe { &raw mut (*lz.as_ptr()).key };
    // SAFETY: ccv is set up as nginx's own modules do; nginx logs its own errors.
    if unsafe { ngx_http_compile_complex_value(&mut ccv) } != NGX_OK as ngx_int_t {
        return Err(ConfError::Reported);
    }
    z.init = Some(ngx_http_ws_limit_init_zone);
    z.data = lz.as_ptr().cast();
    Ok(())
}

fn parse_limit(d: &Directive<'_>, lcf: &mut LocConf) -> Result<(), ConfError> {
    let mut zone = None;
    let mut burst = 0u64;
    let mut nodelay = false;
    let mut from = LimitFrom::Client;
    for p in d.args {
        if let Some(mut v) = param(p, b"zone=") {
            if v.len == 0 {
                return Err(d.invalid_param(p));
            }
            // SAFETY: cf is valid during parsing; size 0 refers to a zone defined anywhere in
            // the configuration (nginx fails "zero size" for one never defined).
            let z = unsafe {
                ngx_shared_memory_add(
                    d.cf,
                    &mut v,
                    0,
                    ptr::from_ref(&LIMIT_ZONE_TAG).cast_mut().cast(),
                )
            };
            zone = Some(NonNull::new(z).ok_or(ConfError::Reported)?);
        } else if let Some(v) = param(p, b"burst=") {
            burst = core::str::from_utf8(v.as_bytes())
                .ok()
                .and_then(|s| s.parse::<u64>().ok())
                .filter(|&b| b > 0 && b < (1 << 40))
                .ok_or_else(|| d.invalid_param(p))?;
        } else if p.as_bytes() == b"nodelay" {
            nodelay = true;
        } else if let Some(v) = param(p, b"from=") {
            from = match v.as_bytes() {
                b"client" => LimitFrom::Client,
                b"upstream" => LimitFrom::Upstream,
                _ => return Err(d.invalid_param(p)),
            };
        } else {
            return Err(d.invalid_param(p));
        }
    }
    let zone = zone.ok_or(ConfError::MissingParam {
        directive: "ws_limit",
        param: "zone",
    })?;
    let limits = lcf.limits.get_or_insert_with(Vec::new);
    if limits.iter().any(|l| l.zone == zone && l.from == from) {
        // SAFETY: a zone entry of the cycle being configured.
        let name = text(unsafe { &zone.as_ref().shm.name });
        return Err(ConfError::LimitDuplicate(name));
    }
    limits.push(LimitRef {
        zone,
        burst,
        nodelay,
        from,
    });
    // SAFETY: conf_file is the file being read.
    let (file, line) = unsafe {
        let f = &*(*d.cf).conf_file;
        (text(&f.file.name), f.line)
    };
    d.main_conf()?.limit_refs.push(ZoneRef { zone, file, line });
    Ok(())
}

fn parse_limit_log_level(d: &Directive<'_>, lcf: &mut LocConf) -> Result<(), ConfError> {
    if lcf.limit_log_level.is_some() {
        return Err(d.duplicate());
    }
    let a = &d.args[0];
    lcf.limit_log_level = Some(parse_log_level(a.as_bytes()).ok_or_else(|| d.invalid(a))?);
    Ok(())
}

/// After http{} is parsed: every zone a `ws_limit` names is a `ws_limit_zone`.
///
/// # Safety
/// `cf` must be the http{} configuration, at init_main_conf time.
pub unsafe fn check_zones(cf: *mut ngx::ffi::ngx_conf_t, mcf: &MainConf) -> Result<(), ConfError> {
    let mut result = Ok(());
    for r in &mcf.limit_refs {
        // SAFETY: zone entries of the cycle being configured.
        let z = unsafe { r.zone.as_ref() };
        if z.data.is_null() {
            let e = ConfError::LimitZoneUnknown(text(&z.shm.name));
            // SAFETY: cf->log is the configuration log.
            let log = unsafe { (*cf).log };
            ngx_log_error!(NGX_LOG_EMERG, log, "{} in {}:{}", e, r.file, r.line);
            result = Err(e);
        }
    }
    result
}

/// The zone's init callback, in the master: a zone kept across a reload (`data` is the previous
/// configuration's) keeps its tree; a new one gets an empty tree.
unsafe extern "C" fn ngx_http_ws_limit_init_zone(
    shm_zone: *mut ngx_shm_zone_t,
    data: *mut c_void,
) -> ngx_int_t {
    // SAFETY: nginx passes the zone we added; its data is our LimitZone in the config pool.
    let zone = unsafe { &mut *shm_zone };
    // SAFETY: as above; nothing else refers to the configuration while nginx sets zones up.
    let lz = unsafe { &mut *zone.data.cast::<LimitZone>() };
    let log = zone.shm.log;
    // SAFETY: the previous cycle's LimitZone, alive until that cycle is freed.
    if let Some(old) = unsafe { data.cast::<LimitZone>().as_ref() } {
        if old.key_text != lz.key_text {
            ngx_log_error!(
                NGX_LOG_EMERG,
                log,
                "ws_limit_zone \"{}\" uses the \"{}\" key while previously it used the \"{}\" key",
                lz.name,
                lz.key_text,
                old.key_text
            );
            return NGX_ERROR as ngx_int_t;
        }
        lz.sh = old.sh;
        return NGX_OK as ngx_int_t;
    }
    let pool = zone.shm.addr.cast::<ngx_slab_pool_t>();
    // SAFETY: ngx_init_zone_pool made the zone start with a slab pool.
    let sp = unsafe { &mut *pool };
    if zone.shm.exists != 0 {
        let sh = sp.data.cast::<Shared>();
        // SAFETY: a reused zone's data is null or the root we laid out.
        if sh.is_null() || unsafe { (*sh).magic } != MAGIC {
            ngx_log_error!(
                NGX_LOG_EMERG,
                log,
                "ws_limit_zone \"{}\" was laid out by another version of the module",
                lz.name
            );
            return NGX_ERROR as ngx_int_t;
        }
        lz.sh = sh;
        return NGX_OK as ngx_int_t;
    }
    // SAFETY: the pool is initialized; ngx_slab_alloc takes its mutex itself.
    let sh = unsafe { ngx_slab_alloc(pool, size_of::<Shared>()) }.cast::<Shared>();
    if sh.is_null() {
        return NGX_ERROR as ngx_int_t;
    }
    // SAFETY: fresh memory for a Shared, ours alone; ngx_rbtree_init and ngx_queue_init are
    // macros: the sentinel is black, the root is the sentinel, the queue points at itself.
    unsafe {
        ptr::write_bytes(sh, 0, 1);
        (*sh).magic = MAGIC;
        let sentinel = &raw mut (*sh).sentinel;
        (*sh).tree.root = sentinel;
        (*sh).tree.sentinel = sentinel;
        (*sh).tree.insert = Some(ngx_http_ws_limit_insert);
        let lru = &raw mut (*sh).lru;
        (*lru).prev = lru;
        (*lru).next = lru;
    }
    sp.data = sh.cast();
    let ctx = format!(" in ws_limit_zone \"{}\"\0", lz.name);
    // SAFETY: as above.
    let p = unsafe { ngx_slab_alloc(pool, ctx.len()) }.cast::<u8>();
    if !p.is_null() {
        // SAFETY: p has room for the text and its NUL.
        unsafe { ptr::copy_nonoverlapping(ctx.as_ptr(), p, ctx.len()) };
        sp.log_ctx = p;
    }
    sp.set_log_nomem(0);
    lz.sh = sh;
    NGX_OK as ngx_int_t
}

/// One `ws_limit` in force for a tunnel: its zone, its node, its bucket's rules.
struct Active {
    zone: &'static LimitZone,
    node: NonNull<Node>,
    limit: Limit,
    from: From,
}

/// A tunnel's limits: admits each data message, remembers the worst that happened.
pub struct Limiter {
    active: Vec<Active>,
    dry_run: bool,
    log_level: usize,
    log: *mut ngx_log_t,
    /// The worst that happened to the tunnel.
    pub status: Option<Status>,
    logged: bool,
    /// More than one limit counts the client's (0), the upstream's (1) messages.
    several: [bool; 2],
}

impl Limiter {
    /// The limits of `lcf` for the request `r` (keys evaluated now); `None` when none apply.
    ///
    /// # Safety
    /// `r` must be a live request of the running cycle.
    pub unsafe fn new(r: *mut ngx_http_request_t, lcf: &LocConf, now: Msec) -> Option<Limiter> {
        let limits = lcf.limits();
        if limits.is_empty() {
            return None;
        }
        // SAFETY: the request and its connection are live.
        let log = unsafe { (*(*r).connection).log };
        let mut active = Vec::with_capacity(limits.len());
        for l in limits {
            // SAFETY: ws_limit zones' data is their LimitZone in the configuration pool, which
            // outlives the cycle's requests (check_zones made sure it is set).
            let Some(zone) = (unsafe { l.zone.as_ref().data.cast::<LimitZone>().as_ref() }) else {
                continue;
            };
            let mut key = ngx_str_t::default();
            // SAFETY: a live request; the compiled key of this cycle's configuration.
            let rc =
                unsafe { ngx_http_complex_value(r, ptr::from_ref(&zone.key).cast_mut(), &mut key) };
            if rc != NGX_OK as ngx_int_t || key.len == 0 {
                // An empty key is not limited (limit_req).
                continue;
            }
            let key = key.as_bytes();
            if key.len() > MAX_KEY {
                ngx_log_error!(
                    NGX_LOG_ERR,
                    log,
                    "ws: the value of the \"{}\" key is more than {} bytes",
                    zone.key_text,
                    MAX_KEY
                );
                continue;
            }
            let Some(node) = zone.pin(key, now) else {
                ngx_log_error!(
                    NGX_LOG_ALERT,
                    log,
                    "ws: could not allocate a node in ws_limit_zone \"{}\": its tunnels are all \
                     live, this one is not limited",
                    zone.name
                );
                continue;
            };
            active.push(Active {
                zone,
                node,
                limit: Limit {
                    rate: zone.rate,
                    burst: l.burst,
                    nodelay: l.nodelay,
                },
                from: match l.from {
                    LimitFrom::Client => From::Client,
                    LimitFrom::Upstream => From::Upstream,
                },
            });
        }
        if active.is_empty() {
            return None;
        }
        let count = |f: From| active.iter().filter(|a| a.from == f).count();
        let several = [count(From::Client) > 1, count(From::Upstream) > 1];
        Some(Limiter {
            several,
            active,
            dry_run: lcf.limit_dry_run(),
            log_level: lcf.limit_log_level(),
            log,
            // A limit applies: PASSED until something worse happens.
            status: Some(Status::Passed),
            logged: false,
        })
    }

    /// Whether some limit counts the messages `from` sends.
    pub fn applies(&self, from: From) -> bool {
        self.active.iter().any(|a| a.from == from)
    }

    /// Whether some limit may refuse a message (the proxy then may close the tunnel).
    pub fn may_refuse(&self) -> bool {
        !self.dry_run && self.active.iter().any(|a| a.limit.nodelay)
    }

    /// A data message from `from` begins at `now`: what every limit together says.
    pub fn admit(&mut self, from: From, now: Msec) -> Admission {
        let mine = || self.active.iter().filter(|a| a.from == from);
        let several = self.several[usize::from(from != From::Client)];
        let mut verdict = Verdict::Pass;
        let mut worst: Option<(u64, &LimitZone)> = None;
        // Each must pass: with several, the refusing ones are asked first, so that a refused
        // message is accounted nowhere (as limit_req).
        if several {
            for a in mine().filter(|a| a.limit.nodelay) {
                let (v, excess) = a.zone.take(a.node, &a.limit, now, true);
                if v == Verdict::Reject {
                    verdict = Verdict::Reject;
                    worst = Some((excess, a.zone));
                    break;
                }
            }
        }
        if verdict != Verdict::Reject {
            for a in mine() {
                let (v, excess) = a.zone.take(a.node, &a.limit, now, false);
                if v != Verdict::Pass && worst.is_none_or(|(e, _)| excess > e) {
                    worst = Some((excess, a.zone));
                }
                verdict = verdict.and(v);
            }
        }
        let status = Status::of(verdict, self.dry_run);
        self.status = Some(self.status.map_or(status, |s| s.worst(status)));
        if let Some((excess, zone)) = worst.filter(|_| verdict != Verdict::Pass) {
            self.log_once(from, verdict, excess, zone);
        }
        match verdict {
            _ if self.dry_run => Admission::Pass,
            Verdict::Pass => Admission::Pass,
            Verdict::Delay(d) => Admission::Hold(now + d),
            Verdict::Reject => Admission::Refuse,
        }
    }

    /// The error-log line, once per tunnel: when it is first delayed or refused.
    fn log_once(&mut self, from: From, v: Verdict, excess: u64, zone: &LimitZone) {
        if self.logged {
            return;
        }
        self.logged = true;
        let dry = if self.dry_run { ", dry run" } else { "" };
        let (level, what) = match v {
            Verdict::Reject => (self.log_level, "limiting messages"),
            _ => (delay_log_level(self.log_level), "delaying messages"),
        };
        ngx_log_error!(
            level,
            self.log,
            "ws: {} from the {}{}, excess: {}.{:03} by zone \"{}\"",
            what,
            from.as_str(),
            dry,
            excess / 1000,
            excess % 1000,
            zone.name
        );
    }

    /// The tunnel is over: its nodes may be evicted again.
    pub fn unpin(&mut self) {
        for a in self.active.drain(..) {
            a.zone.unpin(a.node);
        }
    }
}

impl Drop for Limiter {
    fn drop(&mut self) {
        self.unpin();
    }
}
