//! The epoch ticker: it advances an engine's epoch every [`EPOCH_TICK`]
//! (each running plugin checks its deadline and its cancel at each tick)
//! while a plugin store is alive anywhere in the process, and sleeps,
//! parked, while none is: an idle daemon no longer wakes 100 times a
//! second.
//!
//! Every store's state holds a [`Ticking`]; the first one to appear wakes
//! every ticker. A ticker registers itself before it first looks at the
//! count, so a store that appears at any moment either is counted before
//! that look or wakes it.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::Thread;

use wasmtime::Engine;

use super::EPOCH_TICK;

/// Plugin stores alive in this process.
static LIVE: AtomicUsize = AtomicUsize::new(0);
/// The ticker threads, woken when the first store appears.
static TICKERS: Mutex<Vec<Thread>> = Mutex::new(Vec::new());

/// Held by each plugin store's state: tickers run while one exists.
pub struct Ticking(());

impl Ticking {
    pub fn new() -> Ticking {
        if LIVE.fetch_add(1, Ordering::SeqCst) == 0 {
            for ticker in TICKERS.lock().unwrap().iter() {
                ticker.unpark();
            }
        }
        Ticking(())
    }
}

impl Drop for Ticking {
    fn drop(&mut self) {
        LIVE.fetch_sub(1, Ordering::SeqCst);
    }
}

/// An engine's ticker thread; stopped when dropped.
pub struct Ticker {
    stop: Arc<AtomicBool>,
    thread: Thread,
}

impl Ticker {
    pub fn start(engine: &Engine) -> std::io::Result<Ticker> {
        let stop = Arc::new(AtomicBool::new(false));
        let (weak, stopped) = (engine.weak(), stop.clone());
        let handle = std::thread::Builder::new()
            .name("wasm-epoch".into())
            .spawn(move || {
                let me = std::thread::current();
                TICKERS.lock().unwrap().push(me.clone());
                while !stopped.load(Ordering::SeqCst) {
                    if LIVE.load(Ordering::SeqCst) == 0 {
                        std::thread::park();
                        continue;
                    }
                    std::thread::sleep(EPOCH_TICK);
                    match weak.upgrade() {
                        Some(engine) => engine.increment_epoch(),
                        None => break,
                    }
                }
                TICKERS.lock().unwrap().retain(|t| t.id() != me.id());
            })?;
        Ok(Ticker {
            stop,
            thread: handle.thread().clone(),
        })
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.unpark();
    }
}
