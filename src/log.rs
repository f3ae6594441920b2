//! The buffered JSON-lines writer behind `ws_log`.
//!
//! The file is an nginx "open file" (`ngx_conf_open_file`): opened by the master, reopened on
//! `nginx -s reopen`, flushed by nginx before a reopen and at worker exit through the `flush`
//! callback. Buffering follows `access_log buffer= flush=`. A failed write never reaches the
//! tunnel: the records are dropped, counted, and an error is logged at most once a second.

use core::ptr::{self, NonNull};

use ngx::ffi::{
    ngx_add_timer, ngx_del_timer, ngx_event_t, ngx_log_t, ngx_msec_t, ngx_open_file_t, ngx_time,
    time_t, NGX_LOG_ALERT,
};

use crate::record::{Line, TimeText};

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
    /// Records lost to failed writes, in this worker.
    pub dropped: u64,
    last_error: time_t,
    /// The last record time formatted, and the clock reading it is for.
    clock: Option<(time_t, ngx_msec_t, TimeText)>,
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
            dropped: 0,
            last_error: 0,
            clock: None,
        }
    }

    /// The time for a record now, formatted once per millisecond of nginx's cached clock.
    pub fn now_text(&mut self) -> TimeText {
        let tp = ngx::ffi::ngx_timeofday();
        match self.clock {
            Some((sec, msec, text)) if sec == tp.sec && msec == tp.msec => text,
            _ => {
                let text = TimeText::new(tp.sec, tp.msec as u32);
                self.clock = Some((tp.sec, tp.msec, text));
                text
            }
        }
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
        if self.buf.capacity() < self.size {
            self.buf.reserve_exact(self.size - self.buf.len());
        }
        let start = self.buf.len();
        if record.write_line(&mut self.buf).is_err() {
            self.buf.truncate(start);
            self.count_unwritable();
            return;
        }
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
    fn count_unwritable(&mut self) {
        self.dropped += 1;
        crate::status::count_log_dropped(1);
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

    /// Writes out whatever is buffered.
    pub fn flush_buffer(&mut self) {
        self.write_out_buffered(self.buf.len());
        self.buf.clear();
    }

    fn write_out(&mut self, data: &[u8], records: u64) {
        // SAFETY: `file` lives as long as the cycle; its fd is nginx's current descriptor.
        let fd = unsafe { (*self.file).fd };
        // SAFETY: writing `data.len()` initialized bytes to a descriptor.
        let n = unsafe { libc::write(fd, data.as_ptr().cast(), data.len()) };
        if n >= 0 && n as usize == data.len() {
            return;
        }
        let err = std::io::Error::last_os_error();
        let written = usize::try_from(n).unwrap_or(0);
        // Records whose line was written whole survive; the rest are lost.
        let whole = data[..written].iter().filter(|&&b| b == b'\n').count() as u64;
        let lost = records.saturating_sub(whole);
        self.dropped += lost;
        crate::status::count_log_dropped(lost);
        let now = ngx_time();
        if now == self.last_error {
            return;
        }
        self.last_error = now;
        let msg = if n < 0 {
            let code = err.raw_os_error().unwrap_or(0);
            let text = err.to_string();
            let text = text.split(" (os error").next().unwrap_or_default();
            format!(
                "ws: write() to \"{}\" failed ({code}: {text}), {} log records dropped so far",
                self.name(),
                self.dropped
            )
        } else {
            format!(
                "ws: write() to \"{}\" was incomplete: {} of {}, {} log records dropped so far",
                self.name(),
                n,
                data.len(),
                self.dropped
            )
        };
        let log = ngx::log::ngx_cycle_log().as_ptr();
        // SAFETY: the cycle log is valid in a running worker.
        unsafe { ngx::log::log_error(NGX_LOG_ALERT as _, log, 0, msg.as_bytes()) };
    }
}

type FlushFn = unsafe extern "C" fn(*mut ngx_open_file_t, *mut ngx_log_t);

fn is_ours(f: FlushFn) -> bool {
    ptr::fn_addr_eq(f, flush_callback as FlushFn)
}

/// Called by nginx before it reopens the file and when a worker exits.
unsafe extern "C" fn flush_callback(file: *mut ngx_open_file_t, _log: *mut ngx_log_t) {
    // SAFETY: `ngx_cycle` is the running cycle; its http main conf lists our files.
    let Some(mcf) = (unsafe { crate::cycle_main_conf() }) else {
        return;
    };
    for lf in &mcf.logs {
        // SAFETY: LogFiles live in the configuration pool of this cycle.
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
