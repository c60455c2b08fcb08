//! rustbpe: the byte-level BPE tokenizer of nanochat-ray, in Rust with Python bindings.
//!
//! What is here, one line each:
//! - [`pretokenize`]: text -> chunks with GPT-4's split pattern (numbers in groups of <= 2);
//!   a hand-written splitter for the default pattern, `fancy_regex` for any other.
//! - [`counts`]: chunk counts of a corpus in Arrow layout (bytes + offsets + uint64 counts),
//!   counted in parallel and merged across blocks without per-chunk objects.
//! - [`train`]: BPE training with incremental pair counts and a lazily refreshed max-heap;
//!   ties go to the smallest pair, so the same corpus always gives the same merges.
//! - [`tokenizer`]: encode (rank-order merges as tiktoken applies them, chunk cache, parallel
//!   batches), decode, and a small documented file format.
//! - [`arrow`]: the Arrow C Data Interface for the counts and for string columns (zero copy).
//! - `py` (not public): every pyo3 binding; the Python module is `import rustbpe`.
//!
//! Build the wheel with `maturin build --release -m rustbpe/Cargo.toml`; run the Rust tests
//! with `cargo test --release` from `rustbpe/`.

pub mod arrow;
pub mod counts;
pub mod pretokenize;
mod py;
pub mod tokenizer;
pub mod train;

use std::sync::{Arc, Mutex, OnceLock};

use rustc_hash::FxHashMap;

pub use counts::{ChunkCounts, CountsView};
pub use pretokenize::{Splitter, DEFAULT_PATTERN};
pub use tokenizer::Tokenizer;

/// Runs `f` in a rayon pool of `num_threads` threads (pools are built once per size and
/// kept), or in the global pool (one thread per core) when `num_threads` is None.
pub fn with_threads<R: Send>(num_threads: Option<usize>, f: impl FnOnce() -> R + Send) -> Result<R, String> {
    let Some(n) = num_threads else {
        return Ok(f());
    };
    if n == 0 {
        return Err("num_threads must be at least 1 (or None for one per core)".into());
    }
    static POOLS: OnceLock<Mutex<FxHashMap<usize, Arc<rayon::ThreadPool>>>> = OnceLock::new();
    let pool = {
        let mut pools = POOLS.get_or_init(Default::default).lock().unwrap_or_else(|e| e.into_inner());
        match pools.get(&n) {
            Some(p) => Arc::clone(p),
            None => {
                let p = rayon::ThreadPoolBuilder::new()
                    .num_threads(n)
                    .build()
                    .map_err(|e| format!("cannot start {n} threads: {e}"))?;
                Arc::clone(pools.entry(n).or_insert(Arc::new(p)))
            }
        }
    };
    Ok(pool.install(f))
}
