//! The log writer: lines are appended to one in-memory buffer by the threads that log,
//! and a writer thread writes the buffer to stderr in batches.
//!
//! Why not a line-per-message channel: at one request at a time, each audit line would
//! wake the writer thread (a futex wake and a write per line, about 10 µs of CPU). Here a
//! line wakes the writer only when the buffer was empty; the writer then waits
//! [`LINGER`] for more lines and writes them all at once. Idle, nothing wakes.
//!
//! Lossless and bounded: when the buffer holds [`CAPACITY`] bytes, the thread that logs
//! writes the buffer and its own line itself, under the lock, so order is kept and memory
//! stays bounded (back-pressure only then). [`BatchGuard`] writes out what is left when it
//! is dropped; a SIGKILL or an abort loses at most the buffer (at most [`LINGER`] of lines,
//! or [`CAPACITY`] bytes).

use std::io::{self, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

/// How long the writer waits for more lines after the first one of a batch.
pub const LINGER: Duration = Duration::from_millis(2);
/// The most bytes buffered before loggers write themselves.
pub const CAPACITY: usize = 1 << 20;

struct State {
    buf: Vec<u8>,
    closed: bool,
    capacity: usize,
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    /// Where lines go. Always locked while holding `state` (never the other way round),
    /// so batches reach it in the order they were taken from the buffer.
    out: Mutex<Box<dyn Write + Send>>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A thread that panicked while holding the lock left a whole buffer behind (it
        // only appends or swaps): keep logging.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn out(&self) -> MutexGuard<'_, Box<dyn Write + Send>> {
        self.out.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Hands out writers for `tracing_subscriber::fmt` ([`tracing_subscriber::fmt::MakeWriter`]).
#[derive(Clone)]
pub struct BatchWriter {
    shared: Arc<Shared>,
}

/// Stops the writer thread, after it has written every buffered line.
pub struct BatchGuard {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// Starts the writer thread for `out` (stderr in the plugin).
pub fn start<W: Write + Send + 'static>(out: W) -> io::Result<(BatchWriter, BatchGuard)> {
    start_with(out, CAPACITY)
}

fn start_with<W: Write + Send + 'static>(
    out: W,
    capacity: usize,
) -> io::Result<(BatchWriter, BatchGuard)> {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            buf: Vec::with_capacity(capacity.min(64 * 1024)),
            closed: false,
            capacity,
        }),
        wake: Condvar::new(),
        out: Mutex::new(Box::new(out)),
    });
    let s = Arc::clone(&shared);
    let thread = std::thread::Builder::new()
        .name("kms-plugin-log".into())
        .spawn(move || write_loop(&s))?;
    Ok((
        BatchWriter {
            shared: Arc::clone(&shared),
        },
        BatchGuard {
            shared,
            thread: Some(thread),
        },
    ))
}

fn write_loop(shared: &Shared) {
    let mut spare = Vec::with_capacity(64 * 1024);
    loop {
        let mut g = shared.lock();
        while g.buf.is_empty() && !g.closed {
            g = shared.wake.wait(g).unwrap_or_else(|p| p.into_inner());
        }
        if g.buf.is_empty() && g.closed {
            return;
        }
        if !g.closed {
            drop(g);
            std::thread::sleep(LINGER);
            g = shared.lock();
        }
        std::mem::swap(&mut g.buf, &mut spare);
        let mut out = shared.out();
        drop(g);
        // Nothing better to do with a failed write to stderr than to drop the batch.
        let _ = out.write_all(&spare).and_then(|()| out.flush());
        drop(out);
        spare.clear();
    }
}

impl Drop for BatchGuard {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.wake.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One event's writer: `fmt` writes each formatted line with one `write_all`.
pub struct Line {
    shared: Arc<Shared>,
}

impl Write for Line {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        let mut g = self.shared.lock();
        if g.closed || g.buf.len() + bytes.len() > g.capacity {
            // Full, or the writer thread is gone (the last moments of the process): this
            // thread writes the buffer and its line itself, in order, under both locks.
            let mut out = self.shared.out();
            out.write_all(&g.buf)?;
            g.buf.clear();
            out.write_all(bytes)?;
            out.flush()?;
            return Ok(bytes.len());
        }
        let was_empty = g.buf.is_empty();
        g.buf.extend_from_slice(bytes);
        drop(g);
        if was_empty {
            self.shared.wake.notify_one();
        }
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for BatchWriter {
    type Writer = Line;

    fn make_writer(&'a self) -> Self::Writer {
        Line {
            shared: Arc::clone(&self.shared),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sink the test can read while the writer thread owns it.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn every_line_arrives_in_order_and_the_guard_flushes() {
        // The real capacity, and one so small that loggers write themselves all the time.
        for capacity in [CAPACITY, 64] {
            lines_in_order(capacity);
        }
    }

    fn lines_in_order(capacity: usize) {
        use tracing_subscriber::fmt::MakeWriter as _;
        let sink = Sink::default();
        let (w, guard) = start_with(sink.clone(), capacity).unwrap();
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let w = w.clone();
                std::thread::spawn(move || {
                    for i in 0..5000 {
                        w.make_writer()
                            .write_all(format!("t{t} line {i}\n").as_bytes())
                            .unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        drop(guard);
        let out = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        for t in 0..4 {
            let mine: Vec<usize> = out
                .lines()
                .filter_map(|l| l.strip_prefix(&format!("t{t} line ")))
                .map(|n| n.parse().unwrap())
                .collect();
            assert_eq!(mine, (0..5000).collect::<Vec<_>>(), "thread {t}");
        }
    }

    #[test]
    fn a_line_is_written_within_the_linger_without_more_traffic() {
        use tracing_subscriber::fmt::MakeWriter as _;
        let sink = Sink::default();
        let (w, _guard) = start(sink.clone()).unwrap();
        w.make_writer().write_all(b"one line\n").unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while sink.0.lock().unwrap().is_empty() {
            assert!(
                std::time::Instant::now() < deadline,
                "the line never arrived"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(&*sink.0.lock().unwrap(), b"one line\n");
    }
}
