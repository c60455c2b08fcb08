//! The trained tokenizer: merges + split pattern; encode, decode, save and load.
//!
//! Encoding splits text into chunks, then applies merges inside each chunk in rank order
//! (merge `i`, creating id `256 + i`, has rank `i`; the lowest-rank adjacent pair is merged
//! first, the leftmost on ties), as tiktoken does with the same mergeable ranks. A per-job chunk
//! cache skips BPE for chunks already seen in the same batch. Chunks longer than
//! [`HEAP_THRESHOLD`] tokens use a heap instead of rescanning, so a pathological chunk (a
//! megabyte without spaces) costs O(n log n), not O(n^2).
//!
//! File format of [`Tokenizer::save`] (UTF-8 text, `\n` line ends):
//! ```text
//! rustbpe merges v1
//! pattern <number of bytes of the pattern>
//! <the pattern, verbatim, followed by a newline>
//! merges <number of merges>
//! <left id> <right id>        (one line per merge, in rank order)
//! ```

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io::{BufRead, Write};
use std::path::Path;

use rayon::prelude::*;
use rustc_hash::FxHashMap;

use crate::counts::CountsView;
use crate::pretokenize::{Splitter, DEFAULT_PATTERN};
use crate::train::{self, Pair};

/// Chunks up to this many bytes run the rescanning loop; longer ones the heap.
pub const HEAP_THRESHOLD: usize = 128;
/// Most chunks a per-job encode cache holds (then it stops growing).
const CACHE_CAPACITY: usize = 1 << 16;
const FORMAT_HEADER: &str = "rustbpe merges v1";

/// A byte-level BPE tokenizer: ids 0..=255 are bytes, merge `i` makes id `256 + i`.
#[derive(Debug, Clone)]
pub struct Tokenizer {
    merges: Vec<Pair>,
    /// pair -> id of the token it merges into (its rank is `id - 256`).
    ranks: FxHashMap<Pair, u32>,
    /// id -> bytes.
    vocab: Vec<Vec<u8>>,
    pattern: String,
    splitter: Splitter,
}

/// Maps encoded chunks to their ids (stored in one arena); keys borrow from the input texts.
struct ChunkCache<'a> {
    map: FxHashMap<&'a str, (u32, u32)>,
    arena: Vec<u32>,
}

impl<'a> ChunkCache<'a> {
    fn new() -> Self {
        ChunkCache { map: FxHashMap::default(), arena: Vec::new() }
    }
}

impl Tokenizer {
    /// A tokenizer from merges in rank order; each merge may only use ids made before it.
    pub fn new(merges: Vec<Pair>, pattern: &str) -> Result<Self, String> {
        let splitter = Splitter::new(pattern)?;
        let mut vocab: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
        let mut ranks = FxHashMap::default();
        for (i, &(a, b)) in merges.iter().enumerate() {
            let id = 256 + i as u32;
            if a >= id || b >= id {
                return Err(format!("merge {i} ({a}, {b}) uses an id that is not made before it ({id})"));
            }
            if ranks.insert((a, b), id).is_some() {
                return Err(format!("merge {i} ({a}, {b}) appears twice"));
            }
            let mut bytes = vocab[a as usize].clone();
            bytes.extend_from_slice(&vocab[b as usize]);
            vocab.push(bytes);
        }
        Ok(Tokenizer { merges, ranks, vocab, pattern: pattern.to_string(), splitter })
    }

    /// Trains on chunk counts (merged first when several views hold the same chunk).
    /// `vocab_size` counts the 256 byte tokens.
    pub fn train_from_counts(
        views: &[CountsView<'_>],
        vocab_size: usize,
        pattern: &str,
    ) -> Result<Self, String> {
        Self::train_from_chunks(crate::counts::merged_map(views), vocab_size, pattern)
    }

    /// Trains on distinct (chunk bytes, count) rows. `vocab_size` counts the 256 byte tokens.
    pub fn train_from_chunks<'a>(
        chunks: impl IntoIterator<Item = (&'a [u8], u64)>,
        vocab_size: usize,
        pattern: &str,
    ) -> Result<Self, String> {
        if vocab_size < 256 {
            return Err(format!("vocab_size {vocab_size} is below 256, the number of byte tokens"));
        }
        Splitter::new(pattern)?;
        let merges = train::train(chunks, vocab_size - 256)?;
        Self::new(merges, pattern)
    }

    /// Number of tokens: 256 + merges.
    pub fn vocab_size(&self) -> usize {
        self.vocab.len()
    }

    /// The merges, in rank order.
    pub fn merges(&self) -> &[Pair] {
        &self.merges
    }

    /// The split pattern.
    pub fn pattern(&self) -> &str {
        &self.pattern
    }

    /// The splitter for the pattern.
    pub fn splitter(&self) -> &Splitter {
        &self.splitter
    }

    /// Bytes of token `id`, if it exists.
    pub fn token_bytes(&self, id: u32) -> Option<&[u8]> {
        self.vocab.get(id as usize).map(|v| v.as_slice())
    }

    /// Ids of `text`.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, String> {
        let mut cache = ChunkCache::new();
        let mut out = Vec::with_capacity(text.len() / 3);
        self.encode_into(text, &mut cache, &mut out)?;
        Ok(out)
    }

    /// Ids of each text, in parallel over the current rayon pool.
    pub fn encode_batch(&self, texts: &[&str]) -> Result<Vec<Vec<u32>>, String> {
        texts
            .par_iter()
            .map_init(ChunkCache::new, |cache, text| {
                let mut out = Vec::with_capacity(text.len() / 3);
                self.encode_into(text, cache, &mut out).map(|_| out)
            })
            .collect()
    }

    fn encode_into<'a>(
        &self,
        text: &'a str,
        cache: &mut ChunkCache<'a>,
        out: &mut Vec<u32>,
    ) -> Result<(), String> {
        let mut work: Vec<u32> = Vec::new();
        self.splitter.for_each_chunk(text, |chunk| {
            let bytes = chunk.as_bytes();
            if bytes.len() == 1 {
                out.push(bytes[0] as u32);
                return;
            }
            if let Some(&(start, len)) = cache.map.get(chunk) {
                out.extend_from_slice(&cache.arena[start as usize..(start + len) as usize]);
                return;
            }
            work.clear();
            work.extend(bytes.iter().map(|&b| b as u32));
            if work.len() <= HEAP_THRESHOLD {
                self.merge_scan(&mut work);
            } else {
                self.merge_heap(&mut work);
            }
            out.extend_from_slice(&work);
            if cache.map.len() < CACHE_CAPACITY {
                let start = cache.arena.len() as u32;
                cache.arena.extend_from_slice(&work);
                cache.map.insert(chunk, (start, work.len() as u32));
            }
        })
    }

    #[inline]
    fn rank(&self, a: u32, b: u32) -> u32 {
        self.ranks.get(&(a, b)).copied().unwrap_or(u32::MAX)
    }

    /// Merges `ids` in place: lowest rank first, leftmost on ties; rescans after each merge.
    pub fn merge_scan(&self, ids: &mut Vec<u32>) {
        // pair_ranks[i] = rank (merged id) of (ids[i], ids[i + 1]); u32::MAX = no merge.
        let mut pair_ranks: Vec<u32> = ids.windows(2).map(|w| self.rank(w[0], w[1])).collect();
        loop {
            let mut best = (u32::MAX, 0usize);
            for (i, &r) in pair_ranks.iter().enumerate() {
                if r < best.0 {
                    best = (r, i);
                }
            }
            let (new_id, i) = best;
            if new_id == u32::MAX {
                return;
            }
            ids[i] = new_id;
            ids.remove(i + 1);
            pair_ranks.remove(i);
            if i > 0 {
                pair_ranks[i - 1] = self.rank(ids[i - 1], new_id);
            }
            if i + 1 < ids.len() {
                pair_ranks[i] = self.rank(new_id, ids[i + 1]);
            }
        }
    }

    /// Same result as [`Self::merge_scan`] in O(n log n): a linked list of tokens and a heap
    /// of (rank, left position) entries, checked against the list when popped.
    pub fn merge_heap(&self, ids: &mut Vec<u32>) {
        let n = ids.len();
        const NONE: usize = usize::MAX;
        let mut next: Vec<usize> = (1..=n).map(|i| if i < n { i } else { NONE }).collect();
        let mut prev: Vec<usize> = (0..n).map(|i| if i == 0 { NONE } else { i - 1 }).collect();
        let mut alive = vec![true; n];
        // Reverse: the smallest (rank, left position) pops first.
        let mut heap: BinaryHeap<Reverse<(u32, usize, usize)>> = BinaryHeap::new();
        for i in 0..n.saturating_sub(1) {
            let r = self.rank(ids[i], ids[i + 1]);
            if r != u32::MAX {
                heap.push(Reverse((r, i, i + 1)));
            }
        }
        while let Some(Reverse((r, left, right))) = heap.pop() {
            // Stale unless both tokens still exist, are still neighbours and still merge to r.
            if !alive[left] || !alive[right] || next[left] != right || self.rank(ids[left], ids[right]) != r {
                continue;
            }
            ids[left] = r;
            alive[right] = false;
            next[left] = next[right];
            if next[right] != NONE {
                prev[next[right]] = left;
            }
            if prev[left] != NONE {
                let p = prev[left];
                let rp = self.rank(ids[p], r);
                if rp != u32::MAX {
                    heap.push(Reverse((rp, p, left)));
                }
            }
            if next[left] != NONE {
                let q = next[left];
                let rq = self.rank(r, ids[q]);
                if rq != u32::MAX {
                    heap.push(Reverse((rq, left, q)));
                }
            }
        }
        let mut out = Vec::with_capacity(n);
        let mut i = 0;
        while i != NONE && i < n {
            out.push(ids[i]);
            i = next[i];
        }
        *ids = out;
    }

    /// The bytes of `ids`; errors on an id outside the vocabulary.
    pub fn decode(&self, ids: &[u32]) -> Result<Vec<u8>, String> {
        let mut out = Vec::with_capacity(ids.len() * 4);
        for &id in ids {
            let bytes = self.token_bytes(id).ok_or_else(|| {
                format!("token id {id} is outside the vocabulary (size {})", self.vocab_size())
            })?;
            out.extend_from_slice(bytes);
        }
        Ok(out)
    }

    /// Writes the tokenizer in the documented text format.
    pub fn write_to(&self, w: &mut impl Write) -> std::io::Result<()> {
        writeln!(w, "{FORMAT_HEADER}")?;
        writeln!(w, "pattern {}", self.pattern.len())?;
        writeln!(w, "{}", self.pattern)?;
        writeln!(w, "merges {}", self.merges.len())?;
        for (a, b) in &self.merges {
            writeln!(w, "{a} {b}")?;
        }
        Ok(())
    }

    /// Saves to `path` atomically: a temporary file beside it, then a rename.
    pub fn save(&self, path: &Path) -> Result<(), String> {
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        let result = (|| {
            let mut f = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
            self.write_to(&mut f)?;
            f.into_inner().map_err(|e| e.into_error())?.sync_all()?;
            std::fs::rename(&tmp, path)
        })();
        result.map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            format!("cannot save tokenizer to {}: {e}", path.display())
        })
    }

    /// Reads a tokenizer written by [`Self::write_to`].
    pub fn read_from(r: &mut impl BufRead) -> Result<Self, String> {
        let mut line = String::new();
        let mut next_line = |r: &mut dyn BufRead, what: &str| -> Result<String, String> {
            line.clear();
            let n = r.read_line(&mut line).map_err(|e| format!("reading {what}: {e}"))?;
            if n == 0 {
                return Err(format!("file ends before {what}"));
            }
            Ok(line.trim_end_matches('\n').to_string())
        };
        if next_line(r, "the header")? != FORMAT_HEADER {
            return Err(format!("not a rustbpe tokenizer file (first line is not {FORMAT_HEADER:?})"));
        }
        let pattern_len = parse_counted(&next_line(r, "the pattern length")?, "pattern")?;
        let mut pattern = vec![0u8; pattern_len + 1];
        r.read_exact(&mut pattern).map_err(|e| format!("reading the pattern: {e}"))?;
        if pattern.pop() != Some(b'\n') {
            return Err("the pattern is not followed by a newline: wrong pattern length".into());
        }
        let pattern = String::from_utf8(pattern).map_err(|_| "the pattern is not UTF-8".to_string())?;
        let n_merges = parse_counted(&next_line(r, "the merge count")?, "merges")?;
        let mut merges = Vec::with_capacity(n_merges);
        for i in 0..n_merges {
            let l = next_line(r, &format!("merge {i}"))?;
            let parsed = l.split_once(' ').and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)));
            merges.push(parsed.ok_or_else(|| format!("merge {i} is not two ids: {l:?}"))?);
        }
        Self::new(merges, &pattern)
    }

    /// Loads a tokenizer saved by [`Self::save`].
    pub fn load(path: &Path) -> Result<Self, String> {
        let f = std::fs::File::open(path)
            .map_err(|e| format!("cannot open tokenizer {}: {e}", path.display()))?;
        Self::read_from(&mut std::io::BufReader::new(f)).map_err(|e| format!("{}: {e}", path.display()))
    }
}

impl Default for Tokenizer {
    /// The byte-level tokenizer (no merges) with the default pattern.
    fn default() -> Self {
        Self::new(Vec::new(), DEFAULT_PATTERN).expect("the default pattern compiles")
    }
}

/// Parses "`key` <n>".
fn parse_counted(line: &str, key: &str) -> Result<usize, String> {
    line.strip_prefix(key)
        .and_then(|rest| rest.strip_prefix(' '))
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| format!("expected \"{key} <number>\", found {line:?}"))
}
