//! Where records go: the `ws_log` destinations of a scope (files and syslog), each with its
//! `if=` condition, and the ones a tunnel (or a rejected request) writes to.
//!
//! The conditions are evaluated once, when the tunnel opens (and for each `reject` record);
//! the tunnel keeps which logs passed as a bit set. A record goes to one log the way it always
//! has (serialized straight into that log's buffer); for several, it is serialized once and
//! the line is copied to each.

use core::ptr::NonNull;

use ngx::ffi::ngx_http_complex_value_t;
use ngx::http::Request;

use crate::log::LogFile;
use crate::record::{Line, TimeText};
use crate::syslog::SyslogLog;

/// Most `ws_log` in one scope (the bits of [`LogSet`]).
pub const MAX_PER_SCOPE: usize = 64;

/// A log destination. Both kinds live in the configuration pool, for the cycle's lifetime;
/// what changes in them at run time is only reached through these pointers, one at a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dest {
    File(NonNull<LogFile>),
    Syslog(NonNull<SyslogLog>),
}

/// One `ws_log` of a scope.
#[derive(Debug, Clone, Copy)]
pub struct Sink {
    pub dest: Dest,
    /// `if=condition`, compiled by nginx in the configuration pool.
    pub filter: Option<NonNull<ngx_http_complex_value_t>>,
}

/// Runs `$body` with `$d` bound to the destination's object, for this call only.
macro_rules! with_dest {
    ($dest:expr, $d:ident => $body:expr) => {
        match $dest {
            Dest::File(p) => {
                // SAFETY: destinations live in the configuration pool of the worker's cycle;
                // nginx's one thread holds no other reference to one while a record is written.
                let $d = unsafe { &mut *p.as_ptr() };
                $body
            }
            Dest::Syslog(p) => {
                // SAFETY: as above.
                let $d = unsafe { &mut *p.as_ptr() };
                $body
            }
        }
    };
}

impl Dest {
    fn now_text(self) -> TimeText {
        with_dest!(self, d => d.now_text())
    }

    fn write<T: Line>(self, record: &T) {
        with_dest!(self, d => d.write(record))
    }

    fn write_line(self, line: &[u8]) {
        with_dest!(self, d => d.write_line(line))
    }

    fn take_scratch(self) -> Vec<u8> {
        with_dest!(self, d => d.take_scratch())
    }

    fn give_scratch(self, line: Vec<u8>) {
        with_dest!(self, d => d.give_scratch(line))
    }

    fn count_unwritable(self) {
        with_dest!(self, d => d.count_unwritable())
    }
}

/// A line written by a function.
struct LineWith<F>(F);

impl<F: Fn(&mut Vec<u8>)> Line for LineWith<F> {
    #[inline]
    fn write_line(&self, out: &mut Vec<u8>) -> serde_json::Result<()> {
        (self.0)(out);
        Ok(())
    }
}

/// The logs one tunnel or request writes to: its scope's, those whose `if=` passed.
#[derive(Debug, Clone, Copy)]
pub struct LogSet<'a> {
    sinks: &'a [Sink],
    /// Bit `i`: `sinks[i]` is written to.
    mask: u64,
}

impl<'a> LogSet<'a> {
    /// Evaluates each log's `if=` for request `r`: an empty value or `0` leaves it out (as
    /// `access_log` does); so does a condition nginx fails to evaluate.
    pub fn select(r: &Request, sinks: &'a [Sink]) -> LogSet<'a> {
        let mut mask = 0u64;
        for (i, s) in sinks.iter().enumerate().take(MAX_PER_SCOPE) {
            let on = match s.filter {
                None => true,
                // SAFETY: compiled at configuration time in the configuration pool.
                Some(cv) => r
                    .get_complex_value(unsafe { cv.as_ref() })
                    .is_some_and(|v| !v.is_empty() && v.as_bytes() != b"0"),
            };
            if on {
                mask |= 1 << i;
            }
        }
        LogSet { sinks, mask }
    }

    pub fn is_empty(&self) -> bool {
        self.mask == 0
    }

    fn dests(self) -> impl Iterator<Item = Dest> + 'a {
        let mut mask = self.mask;
        core::iter::from_fn(move || {
            if mask == 0 {
                return None;
            }
            let i = mask.trailing_zeros() as usize;
            mask &= mask - 1;
            self.sinks.get(i).map(|s| s.dest)
        })
    }

    /// The time text for a record now.
    pub fn now_text(&self) -> Option<TimeText> {
        self.dests().next().map(Dest::now_text)
    }

    /// Writes the record `make` builds for the time now to each chosen log (none: it is not
    /// built). The data path's way: one walk of the logs instead of one for the time and one
    /// for the record.
    #[inline]
    pub fn write_timed<T: Line>(&self, make: impl FnOnce(TimeText) -> T) {
        if self.mask == 0 {
            return;
        }
        let first = self.mask.trailing_zeros() as usize;
        let Some(first) = self.sinks.get(first).map(|s| s.dest) else {
            return;
        };
        if self.mask & (self.mask - 1) == 0 {
            with_dest!(first, d => {
                let time = d.now_text();
                d.write(&make(time));
            });
            return;
        }
        self.write(&make(first.now_text()));
    }

    /// Writes the line `line` writes for the time now to each chosen log: the data path's
    /// lines, written without a record struct.
    #[inline(always)]
    pub fn write_with(&self, line: impl Fn(&TimeText, &mut Vec<u8>)) {
        if self.mask & self.mask.wrapping_sub(1) == 0 {
            // One log, a file (nearly always): the line goes straight into its buffer.
            if let Some(&Sink {
                dest: Dest::File(p),
                ..
            }) = self.sinks.get(self.mask.trailing_zeros() as usize)
            {
                // SAFETY: as in with_dest.
                unsafe { &mut *p.as_ptr() }.write_with(line);
                return;
            }
        }
        self.write_timed(|time| LineWith(move |out: &mut Vec<u8>| line(&time, out)));
    }

    /// As [`LogSet::write_with`], always through [`LogSet::write_timed`]: for the lines of
    /// frames off the short way, where the inlined file path would only weigh on the
    /// observer's loop.
    #[inline]
    pub fn write_timed_with(&self, line: impl Fn(&TimeText, &mut Vec<u8>)) {
        self.write_timed(|time| LineWith(move |out: &mut Vec<u8>| line(&time, out)));
    }

    /// Writes one record to each chosen log.
    pub fn write<T: Line>(&self, record: &T) {
        let mut dests = self.dests();
        let Some(first) = dests.next() else {
            return;
        };
        if self.mask & (self.mask - 1) == 0 {
            // One log: serialized straight into it, as a single `ws_log` always was.
            first.write(record);
            return;
        }
        let mut line = first.take_scratch();
        line.clear();
        if record.write_line(&mut line).is_ok() {
            for d in self.dests() {
                d.write_line(&line);
            }
        } else {
            for d in self.dests() {
                d.count_unwritable();
            }
        }
        first.give_scratch(line);
    }

    /// Writes out what the chosen files hold in their buffers (at tunnel close).
    pub fn flush(&self) {
        for d in self.dests() {
            if let Dest::File(p) = d {
                // SAFETY: as in with_dest.
                unsafe { (*p.as_ptr()).flush_buffer() };
            }
        }
    }
}
