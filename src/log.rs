//! The buffered JSON-lines writer behind `ws_log`.
//!
//! The file is an nginx "open file" (`ngx_conf_open_file`): opened by the master, reopened on
//! `nginx -s reopen`, flushed by nginx before a reopen and at worker exit through the `flush`
//! callback. Buffering follows `access_log buffer= flush=`. A failed write never reaches the
//! tunnel: the records are dropped, counted, and an error is logged at most once a second.
//!
//! Pipes and sockets (`/dev/stdout` in a container, a FIFO, a log collector) are written in
//! non-blocking mode, so that a slow reader never stalls the worker. A write into a full pipe
//! may then be short: what did not go out is kept (up to [`CARRY_MAX`] bytes) and written
//! before anything else, at the next write or from a retry timer. A line is never left torn:
//! when records must be dropped, the tail of a partly written line is still kept and completed
//! first, so the next record starts on a line of its own. Every worker writes the same pipe:
//! a pipe is written in pieces of whole lines of at most `PIPE_BUF` bytes, which the kernel
//! never cuts, so that no worker's line is continued by another's (a single record longer
//! than `PIPE_BUF` is the exception).

use core::cell::RefCell;
use core::ptr::{self, NonNull};

use ngx::ffi::{
    ngx_add_timer, ngx_del_timer, ngx_event_t, ngx_log_t, ngx_msec_t, ngx_open_file_t, ngx_time,
    time_t, NGX_LOG_ALERT,
};

use crate::record::{Line, TimeText};
use ws_core::status::Table;

/// Most bytes kept back for a file whose last write was short: beyond that, whole records are
/// dropped (counted) until the reader catches up.
pub const CARRY_MAX: usize = 64 * 1024;
/// While bytes are kept back, they are retried this often.
const RETRY_MSEC: ngx_msec_t = 50;
/// Attempts at one write before the rest is kept back: a write that made progress is retried
/// at once, as a signal or a full pipe may cut it short.
const WRITE_TRIES: usize = 4;

/// One `ws_log` file, shared by every scope that names the same path.
pub struct LogFile {
    file: *mut ngx_open_file_t,
    /// Records waiting to be written, serialized in place: `size` bytes at most between
    /// writes (its capacity grows past that once a record overflows it), empty when unbuffered.
    buf: Vec<u8>,
    size: usize,
    /// Records in `buf`.
    pending: u64,
    /// Scratch space for one serialized record, when unbuffered.
    line: Vec<u8>,
    flush: ngx_msec_t,
    event: ngx_event_t,
    /// Records lost to failed writes.
    losses: Losses,
    clock: Clock,
    /// Bytes accepted but not yet written after a short write, whole lines but for the first,
    /// which may be the tail of a line already partly written.
    carry: Vec<u8>,
    /// `carry` starts with the tail of a line partly written.
    carry_torn: bool,
    /// The descriptor `carry` is for (a reopen starts a new file: a tail is then dropped).
    carry_fd: i32,
    /// The descriptor last checked for non-blocking mode.
    checked_fd: i32,
    /// That descriptor is a pipe, which other workers (and processes) may write too.
    pipe: bool,
}

/// The time text of records, formatted once per millisecond of nginx's cached clock.
#[derive(Default)]
pub struct Clock(Option<(time_t, ngx_msec_t, TimeText)>);

impl Clock {
    #[inline]
    pub fn now_text(&mut self) -> TimeText {
        *self.now()
    }

    /// The time text now, brought up to date in place (records read it where it is).
    #[inline(always)]
    pub fn now(&mut self) -> &TimeText {
        let tp = ngx::ffi::ngx_timeofday();
        match &mut self.0 {
            Some((sec, msec, _)) if *sec == tp.sec && *msec == tp.msec => {}
            // A new millisecond of the same second: only its digits change.
            Some((sec, msec, text)) if *sec == tp.sec => {
                text.set_msec(tp.sec, tp.msec as u32);
                *msec = tp.msec;
            }
            c => *c = Some((tp.sec, tp.msec, TimeText::new(tp.sec, tp.msec as u32))),
        }
        match &self.0 {
            Some((_, _, text)) => text,
            None => unreachable!("set above"),
        }
    }
}

/// Records a log destination lost, in this worker and in the `ws_status_zone`.
#[derive(Default)]
pub struct Losses {
    /// Records lost, in this worker.
    pub dropped: u64,
    last_error: time_t,
    /// The `ws_status_zone` table dropped records are counted in (set by the zone's init).
    table: Option<Table>,
}

impl Losses {
    /// Counts `n` lost records; returns whether to say so in the error log (at most once a
    /// second).
    pub fn count(&mut self, n: u64) -> bool {
        if n == 0 {
            return false;
        }
        self.dropped += n;
        if let Some(t) = self.table {
            t.count_log_dropped(n);
        }
        let now = ngx_time();
        if now == self.last_error {
            return false;
        }
        self.last_error = now;
        true
    }

    /// From now on, losses are also counted in this `ws_status_zone` table.
    pub fn count_in(&mut self, table: Table) {
        self.table = Some(table);
    }
}

impl LogFile {
    /// # Safety
    /// `file` must come from `ngx_conf_open_file`; `log` must outlive the cycle.
    pub unsafe fn new(
        file: *mut ngx_open_file_t,
        size: usize,
        flush: ngx_msec_t,
        log: *mut ngx_log_t,
    ) -> LogFile {
        // SAFETY: ngx_event_t is a plain C struct for which all-zero is the initial state.
        let mut event: ngx_event_t = unsafe { core::mem::zeroed() };
        event.log = log;
        event.handler = Some(flush_handler);
        event.set_cancelable(1);
        LogFile {
            file,
            buf: Vec::new(),
            size,
            pending: 0,
            line: Vec::new(),
            flush,
            event,
            losses: Losses::default(),
            clock: Clock::default(),
            carry: Vec::new(),
            carry_torn: false,
            carry_fd: -1,
            checked_fd: -1,
            pipe: false,
        }
    }

    /// The time for a record now, formatted once per millisecond of nginx's cached clock.
    #[inline]
    pub fn now_text(&mut self) -> TimeText {
        self.clock.now_text()
    }

    /// From now on, dropped records are also counted in this `ws_status_zone` table.
    pub fn count_drops_in(&mut self, table: Table) {
        self.losses.count_in(table);
    }

    /// Hooks the file's flush callback and the timer to this object's final address.
    ///
    /// # Safety
    /// `this` must not move again (it lives in the configuration pool).
    pub unsafe fn install(this: NonNull<LogFile>) {
        // SAFETY: per the contract, `this` is valid and pinned; `file` is nginx's open file.
        unsafe {
            let lf = &mut *this.as_ptr();
            lf.event.data = this.as_ptr().cast();
            (*lf.file).flush = Some(flush_callback);
        }
        FILES.with_borrow_mut(|v| v.push(this));
    }

    /// Whether no other log has claimed this open file's buffer.
    ///
    /// # Safety
    /// `file` must be a valid open file.
    pub unsafe fn file_is_free(file: *mut ngx_open_file_t) -> bool {
        // SAFETY: per the contract.
        let f = unsafe { &*file };
        f.data.is_null() && f.flush.is_none_or(is_ours)
    }

    /// Whether nginx's open file still calls us to flush (another log may have taken it).
    pub fn still_ours(&self) -> bool {
        // SAFETY: `file` lives as long as the cycle, like self.
        unsafe { (*self.file).flush.is_some_and(is_ours) }
    }

    pub fn file(&self) -> *mut ngx_open_file_t {
        self.file
    }

    pub fn buffer_size(&self) -> usize {
        self.size
    }

    pub fn flush_msec(&self) -> ngx_msec_t {
        self.flush
    }

    pub fn name(&self) -> String {
        // SAFETY: `file` lives as long as the cycle.
        String::from_utf8_lossy(unsafe { (*self.file).name.as_bytes() }).into_owned()
    }

    /// Serializes and writes (or buffers) one record.
    #[inline]
    pub fn write<T: Line>(&mut self, record: &T) {
        if self.size == 0 {
            let mut line = core::mem::take(&mut self.line);
            line.clear();
            if record.write_line(&mut line).is_ok() {
                self.write_out(&line, 1);
            } else {
                self.count_unwritable();
            }
            self.line = line;
            return;
        }
        // Buffered: the record is serialized straight into the buffer, after what waits there.
        self.buffer(|buf| record.write_line(buf).is_ok());
    }

    /// Writes (or buffers) one record already serialized as a line (with its newline), as
    /// when it goes to several logs.
    pub fn write_line(&mut self, line: &[u8]) {
        if self.size == 0 {
            self.write_out(line, 1);
            return;
        }
        self.buffer(|buf| {
            buf.extend_from_slice(line);
            true
        });
    }

    /// The scratch space records are serialized in, lent out (to serialize a record once for
    /// several logs) and given back with [`LogFile::give_scratch`].
    pub fn take_scratch(&mut self) -> Vec<u8> {
        core::mem::take(&mut self.line)
    }

    pub fn give_scratch(&mut self, line: Vec<u8>) {
        self.line = line;
    }

    /// Writes (or buffers) the line `line` writes for the time now: the data path's records,
    /// which read the clock's text where it is and go straight into the buffer.
    #[inline(always)]
    pub fn write_with(&mut self, line: impl FnOnce(&TimeText, &mut Vec<u8>)) {
        if self.size == 0 {
            let time = self.now_text();
            let mut buf = core::mem::take(&mut self.line);
            buf.clear();
            line(&time, &mut buf);
            self.write_out(&buf, 1);
            self.line = buf;
            return;
        }
        if self.buf.capacity() < self.size {
            self.buf.reserve_exact(self.size - self.buf.len());
        }
        let start = self.buf.len();
        line(self.clock.now(), &mut self.buf);
        self.buffered(start);
    }

    /// Appends one record to the buffer with `fill` (false: it could not be serialized), and
    /// writes the buffer out when it is full.
    #[inline]
    fn buffer(&mut self, fill: impl FnOnce(&mut Vec<u8>) -> bool) {
        if self.buf.capacity() < self.size {
            self.buf.reserve_exact(self.size - self.buf.len());
        }
        let start = self.buf.len();
        if !fill(&mut self.buf) {
            self.buf.truncate(start);
            self.count_unwritable();
            return;
        }
        self.buffered(start);
    }

    /// A record was appended to the buffer at `start`: writes the buffer out when it is full,
    /// else makes sure it will be flushed.
    #[inline(always)]
    fn buffered(&mut self, start: usize) {
        if self.buf.len() > self.size {
            // It does not fit: what was there goes out first, then the record itself when it
            // is larger than the buffer, else it stays as the buffer's first record.
            if start > 0 {
                self.write_out_buffered(start);
                self.buf.drain(..start);
            }
            if self.buf.len() > self.size {
                self.pending = 1;
                self.flush_buffer();
                return;
            }
        }
        if self.pending == 0 && self.flush > 0 && self.event.timer_set() == 0 {
            // SAFETY: the event is pinned with self and handled by flush_handler.
            unsafe { ngx_add_timer(&mut self.event, self.flush) };
        }
        self.pending += 1;
    }

    /// A record that could not be serialized is counted as dropped.
    pub fn count_unwritable(&mut self) {
        self.losses.count(1);
    }

    /// Writes the first `len` bytes of the buffer: every pending record.
    fn write_out_buffered(&mut self, len: usize) {
        if self.event.timer_set() != 0 {
            // SAFETY: the timer was armed by `write` on this pinned event.
            unsafe { ngx_del_timer(&mut self.event) };
        }
        if len == 0 {
            return;
        }
        let buf = core::mem::take(&mut self.buf);
        self.write_out(&buf[..len], self.pending);
        self.buf = buf;
        self.pending = 0;
    }

    /// Writes out whatever is buffered (and what an earlier short write kept back).
    pub fn flush_buffer(&mut self) {
        self.write_out_buffered(self.buf.len());
        self.buf.clear();
        self.drain_carry();
    }

    /// Writes `data`, which holds `records` whole lines, after what was kept back.
    fn write_out(&mut self, data: &[u8], records: u64) {
        // SAFETY: `file` lives as long as the cycle; its fd is nginx's current descriptor.
        let fd = unsafe { (*self.file).fd };
        self.check_nonblocking(fd);
        if !self.drain_carry() {
            // Still blocked: whole records queue behind what is kept back, if there is room.
            if self.carry.len() + data.len() <= CARRY_MAX {
                self.carry.extend_from_slice(data);
            } else {
                self.lost(records, None);
            }
            return;
        }
        let (written, err) = write_fd(fd, data, self.pipe);
        if written < data.len() {
            let torn = written > 0 && data[written - 1] != b'\n';
            self.keep(fd, &data[written..], torn, err);
        }
    }

    /// Deals with what a write left (`rest`, whole lines but for the first when `torn`, the
    /// tail of a line partly written): everything is kept when the write would only have
    /// blocked and there is room; else the torn tail alone is kept (without it the next
    /// record would continue the torn line) and the whole lines are dropped and counted.
    fn keep(&mut self, fd: i32, rest: &[u8], torn: bool, err: Option<std::io::Error>) {
        debug_assert!(self.carry.is_empty());
        let lines = rest.iter().filter(|&&b| b == b'\n').count() as u64;
        let blocked = err
            .as_ref()
            .is_none_or(|e| e.kind() == std::io::ErrorKind::WouldBlock);
        if blocked && rest.len() <= CARRY_MAX {
            self.carry.extend_from_slice(rest);
        } else if torn {
            let tail = rest
                .iter()
                .position(|&b| b == b'\n')
                .map_or(rest.len(), |p| p + 1);
            self.carry.extend_from_slice(&rest[..tail]);
            self.lost(lines.saturating_sub(1), err);
        } else {
            self.lost(lines, err);
        }
        self.carry_torn = torn && !self.carry.is_empty();
        if !self.carry.is_empty() {
            self.carry_fd = fd;
            if self.event.timer_set() == 0 {
                // SAFETY: the event is pinned with self and handled by flush_handler, which
                // writes what is kept back.
                unsafe { ngx_add_timer(&mut self.event, RETRY_MSEC) };
            }
        }
    }

    /// Writes what an earlier short write kept back. Returns whether nothing is left.
    fn drain_carry(&mut self) -> bool {
        if self.carry.is_empty() {
            return true;
        }
        // SAFETY: as in write_out.
        let fd = unsafe { (*self.file).fd };
        let mut carry = core::mem::take(&mut self.carry);
        let mut start = 0;
        if fd != self.carry_fd && self.carry_torn {
            // Reopened since: the torn line's tail would start the new file with a fragment.
            start = carry
                .iter()
                .position(|&b| b == b'\n')
                .map_or(carry.len(), |p| p + 1);
            self.lost(1, None);
        }
        let (written, err) = write_fd(fd, &carry[start..], self.pipe);
        let end = start + written;
        if end < carry.len() {
            let torn = if written > 0 {
                carry[end - 1] != b'\n'
            } else {
                self.carry_torn && start == 0
            };
            self.keep(fd, &carry[end..], torn, err);
        } else {
            self.carry_torn = false;
        }
        if self.carry.is_empty() {
            // Keep the allocation for the next time.
            carry.clear();
            self.carry = carry;
            return true;
        }
        false
    }

    /// Puts a pipe or socket into non-blocking mode, once per descriptor (a reopen brings a
    /// new one). Regular files are left alone: their writes do not wait for a reader.
    fn check_nonblocking(&mut self, fd: i32) {
        if fd == self.checked_fd {
            return;
        }
        self.checked_fd = fd;
        self.pipe = false;
        // SAFETY: fstat and fcntl on nginx's open descriptor, with a zeroed stat buffer.
        unsafe {
            let mut st: libc::stat = core::mem::zeroed();
            if libc::fstat(fd, &mut st) != 0 {
                return;
            }
            let kind = st.st_mode & libc::S_IFMT;
            self.pipe = kind == libc::S_IFIFO;
            if kind == libc::S_IFIFO || kind == libc::S_IFSOCK {
                let flags = libc::fcntl(fd, libc::F_GETFL);
                if flags >= 0 && flags & libc::O_NONBLOCK == 0 {
                    libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK);
                }
            }
        }
    }

    /// `n` records are lost: counted, and said in the error log at most once a second.
    fn lost(&mut self, n: u64, err: Option<std::io::Error>) {
        if !self.losses.count(n) {
            return;
        }
        let msg = match err.filter(|e| e.kind() != std::io::ErrorKind::WouldBlock) {
            Some(err) => {
                let code = err.raw_os_error().unwrap_or(0);
                let text = err.to_string();
                let text = text.split(" (os error").next().unwrap_or_default();
                format!(
                    "ws: write() to \"{}\" failed ({code}: {text}), {} log records dropped so far",
                    self.name(),
                    self.losses.dropped
                )
            }
            None => format!(
                "ws: write() to \"{}\" was incomplete (the reader is slow or gone), {} log \
                 records dropped so far",
                self.name(),
                self.losses.dropped
            ),
        };
        let log = ngx::log::ngx_cycle_log().as_ptr();
        // SAFETY: the cycle log is valid in a running worker.
        unsafe { ngx::log::log_error(NGX_LOG_ALERT as _, log, 0, msg.as_bytes()) };
    }
}

/// Writes as much of `data` as the descriptor takes now. Returns the bytes written and the
/// error that stopped it (`None` when it stopped short without one, as a full pipe does).
///
/// A pipe (`/dev/stdout` in a container) is shared by every worker: a write of more than
/// `PIPE_BUF` bytes may be cut short when it fills, and another worker's lines would then
/// continue the cut line. So a pipe is written in pieces of whole lines of at most
/// `PIPE_BUF` bytes each, which the kernel writes whole or not at all; only a single line
/// longer than that is written on its own, unprotected.
fn write_fd(fd: i32, data: &[u8], pipe: bool) -> (usize, Option<std::io::Error>) {
    if !pipe {
        return write_fd_retrying(fd, data);
    }
    let mut off = 0;
    while off < data.len() {
        let rest = &data[off..];
        let piece = atomic_piece(rest);
        let (n, err) = if piece <= libc::PIPE_BUF {
            write_once(fd, &rest[..piece])
        } else {
            write_fd_retrying(fd, &rest[..piece])
        };
        off += n;
        if n < piece || err.is_some() {
            return (off, err);
        }
    }
    (off, None)
}

/// The length of the next piece of `data` to write to a pipe: the whole lines that fit in
/// `PIPE_BUF` bytes, else the first line alone (or all of `data` when it has no newline).
fn atomic_piece(data: &[u8]) -> usize {
    let window = &data[..data.len().min(libc::PIPE_BUF)];
    match window.iter().rposition(|&b| b == b'\n') {
        Some(p) => p + 1,
        None => data
            .iter()
            .position(|&b| b == b'\n')
            .map_or(data.len(), |p| p + 1),
    }
}

/// One `write`, retried only after a signal.
fn write_once(fd: i32, data: &[u8]) -> (usize, Option<std::io::Error>) {
    loop {
        // SAFETY: writing `data.len()` initialized bytes to a descriptor.
        let n = unsafe { libc::write(fd, data.as_ptr().cast(), data.len()) };
        if n >= 0 {
            return (n as usize, None);
        }
        let err = std::io::Error::last_os_error();
        if err.kind() != std::io::ErrorKind::Interrupted {
            return (0, Some(err));
        }
    }
}

/// Writes as much of `data` as the descriptor takes now: retried at once after a signal or a
/// short write (up to [`WRITE_TRIES`] writes).
fn write_fd_retrying(fd: i32, data: &[u8]) -> (usize, Option<std::io::Error>) {
    let mut off = 0;
    for _ in 0..WRITE_TRIES {
        if off == data.len() {
            break;
        }
        let (n, err) = write_once(fd, &data[off..]);
        off += n;
        if err.is_some() {
            return (off, err);
        }
        if n == 0 {
            break;
        }
    }
    (off, None)
}

type FlushFn = unsafe extern "C" fn(*mut ngx_open_file_t, *mut ngx_log_t);

fn is_ours(f: FlushFn) -> bool {
    ptr::fn_addr_eq(f, flush_callback as FlushFn)
}

thread_local! {
    /// Every live LogFile of this process (of every cycle it still holds), for the flush
    /// callback, which nginx gives only the open file. A LogFile joins when it is installed
    /// and leaves when its configuration pool drops it.
    static FILES: RefCell<Vec<NonNull<LogFile>>> = const { RefCell::new(Vec::new()) };
}

impl Drop for LogFile {
    fn drop(&mut self) {
        let me: *mut LogFile = self;
        FILES.with_borrow_mut(|v| v.retain(|p| p.as_ptr() != me));
    }
}

/// Called by nginx before it reopens the file and when a worker exits.
unsafe extern "C" fn flush_callback(file: *mut ngx_open_file_t, _log: *mut ngx_log_t) {
    for lf in FILES.with_borrow(Vec::clone) {
        // SAFETY: LogFiles leave the list when they are dropped, so each is live; open files
        // are per cycle, so only this file's LogFile matches; nothing else refers to it while
        // nginx runs this callback.
        let lf = unsafe { &mut *lf.as_ptr() };
        if ptr::eq(lf.file, file) {
            lf.flush_buffer();
        }
    }
}

/// The `flush=` timer.
unsafe extern "C" fn flush_handler(ev: *mut ngx_event_t) {
    // SAFETY: the event's data was set to its LogFile in `install`.
    let lf = unsafe { &mut *(*ev).data.cast::<LogFile>() };
    lf.flush_buffer();
}
