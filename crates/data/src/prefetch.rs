//! Background prefetch: a [`Loader`] on its own thread, `depth` rows ahead.
//!
//! Each item is `(row, state)` where `state` is the loader state right after that row, so a
//! trainer that checkpoints the state of the last row it consumed resumes exactly there
//! (rows still queued in the channel are simply produced again after the restore).
//! Dropping the prefetcher stops and joins the thread.

use crate::loader::{Loader, LoaderState};
use crate::row::Row;
use std::sync::mpsc::{sync_channel, Receiver};
use std::thread::JoinHandle;

pub struct Prefetcher {
    rx: Option<Receiver<(Row, LoaderState)>>,
    handle: Option<JoinHandle<()>>,
}

impl Prefetcher {
    /// Start producing rows of `loader` on a background thread, at most `depth` (≥ 1) ahead.
    pub fn new(mut loader: Loader, depth: usize) -> Prefetcher {
        let (tx, rx) = sync_channel(depth.max(1));
        let handle = std::thread::Builder::new()
            .name("longmix-data-prefetch".into())
            .spawn(move || loop {
                let row = loader.next_row();
                let state = loader.state();
                if tx.send((row, state)).is_err() {
                    break; // the receiver was dropped
                }
            })
            .expect("spawning the data prefetch thread");
        Prefetcher { rx: Some(rx), handle: Some(handle) }
    }

    /// The next row and the loader state right after it. Re-raises a panic of the loader
    /// thread.
    pub fn next_row(&mut self) -> (Row, LoaderState) {
        match self.rx.as_ref().expect("receiver lives until drop").recv() {
            Ok(item) => item,
            Err(_) => {
                // The thread ended without being asked to: it panicked.
                let h = self.handle.take().expect("prefetch thread handle");
                match h.join() {
                    Err(panic) => std::panic::resume_unwind(panic),
                    Ok(()) => panic!("data prefetch thread stopped unexpectedly"),
                }
            }
        }
    }
}

impl Drop for Prefetcher {
    fn drop(&mut self) {
        // Dropping the receiver makes the thread's pending/next send fail, so it exits.
        drop(self.rx.take());
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}
