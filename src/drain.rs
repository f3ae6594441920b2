//! `ws_drain`: this worker's tunnels that close with 1012 once the worker begins a graceful
//! shutdown, and the timer that watches for it.
//!
//! Per-worker run-time state, kept out of the configuration (which is only read once the cycle
//! runs): one instance per worker process, created by `init_process`, used only from nginx's
//! thread.

use core::cell::RefCell;
use core::ptr::NonNull;

use core::ffi::c_void;

use ngx::ffi::{ngx_add_timer, ngx_current_msec, ngx_event_t, ngx_exiting, ngx_log_t, ngx_msec_t};

/// Called for each member when the drain begins: schedules its close (`now` is nginx's clock).
pub type OnDrain = unsafe fn(member: *mut c_void, now: ngx_msec_t);

/// A member of the list: a tunnel, as an opaque pointer and what to call for it.
#[derive(Clone, Copy)]
struct Member {
    ptr: NonNull<c_void>,
    on_drain: OnDrain,
}

/// How often a worker checks whether its graceful shutdown has begun (only with `ws_drain`).
const WATCH_MSEC: ngx_msec_t = 200;

struct Worker {
    /// Live tunnels with `ws_drain`; each knows its index here and leaves when it ends.
    tunnels: Vec<Member>,
    /// The worker is shutting down: tunnels joining now are scheduled at once.
    started: bool,
    /// The watcher timer; boxed, as nginx's timer tree keeps its address.
    watcher: Option<Box<ngx_event_t>>,
}

thread_local! {
    static WORKER: RefCell<Worker> = const {
        RefCell::new(Worker {
            tunnels: Vec::new(),
            started: false,
            watcher: None,
        })
    };
}

/// Starts the shutdown watcher (init_process, when some scope uses `ws_drain`).
///
/// # Safety
/// Once per worker, from nginx's thread; `log` must outlive the worker.
pub unsafe fn start_watch(log: *mut ngx_log_t) {
    WORKER.with_borrow_mut(|w| {
        if w.watcher.is_some() {
            return;
        }
        // SAFETY: ngx_event_t is a plain C struct; all-zero is its initial state.
        let mut ev: Box<ngx_event_t> = Box::new(unsafe { core::mem::zeroed() });
        ev.handler = Some(watch_handler);
        ev.log = log;
        ev.set_cancelable(1);
        // SAFETY: the boxed event stays in WORKER, at the same address, for the worker's life.
        unsafe { ngx_add_timer(&mut *ev, WATCH_MSEC) };
        w.watcher = Some(ev);
    });
}

/// Adds a tunnel, with what to call for it when the drain begins; returns its index in the
/// list and whether the drain has already begun.
pub fn join(ptr: NonNull<c_void>, on_drain: OnDrain) -> (usize, bool) {
    WORKER.with_borrow_mut(|w| {
        w.tunnels.push(Member { ptr, on_drain });
        (w.tunnels.len() - 1, w.started)
    })
}

/// Removes the tunnel `ptr` at `index`; returns the tunnel moved into its place, which must
/// record `index` as its own.
pub fn leave(index: usize, ptr: *const c_void) -> Option<NonNull<c_void>> {
    WORKER.with_borrow_mut(|w| {
        if w.tunnels
            .get(index)
            .is_some_and(|m| core::ptr::eq(m.ptr.as_ptr(), ptr))
        {
            w.tunnels.swap_remove(index);
            return w.tunnels.get(index).map(|m| m.ptr);
        }
        None
    })
}

unsafe extern "C" fn watch_handler(ev: *mut ngx_event_t) {
    // SAFETY: nginx's flag, read in its own thread.
    if unsafe { ngx_exiting } == 0 {
        // SAFETY: re-arming the watcher, which lives as long as the worker.
        unsafe { ngx_add_timer(ev, WATCH_MSEC) };
        return;
    }
    let tunnels = WORKER.with_borrow_mut(|w| {
        w.started = true;
        w.tunnels.clone()
    });
    // SAFETY: nginx's cached clock, in its thread.
    let now = unsafe { ngx_current_msec };
    for m in tunnels {
        // SAFETY: tunnels leave the list when they end, so each is live; no other reference
        // to a tunnel is held while a timer handler runs. Scheduling only arms its timer.
        unsafe { (m.on_drain)(m.ptr.as_ptr(), now) };
    }
}
