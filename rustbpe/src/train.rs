//! Byte-level BPE training on chunk counts.
//!
//! Each distinct chunk is a word of token ids (its bytes at first) with a count. Pair counts
//! are computed once, in parallel, then kept up to date incrementally: a merge only revisits
//! the words that contain the merged pair (an index pair -> words), and only those words' pairs
//! change. The next merge comes from a max-heap with lazy refresh: an entry may hold a stale
//! count, but counts of existing pairs only ever go down (every new pair contains the newest
//! token), so a popped entry whose count is still current is the true maximum; a stale one is
//! pushed back with its current count.
//!
//! Ties between equally frequent pairs go to the smallest pair, comparing (left, right) ids
//! lexicographically, so the same counts always give the same merges. Merge `i` creates token
//! id `256 + i`; within a word, a merge replaces occurrences left to right without overlap.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use rayon::prelude::*;
use rustc_hash::FxHashMap;

/// Two adjacent token ids.
pub type Pair = (u32, u32);

/// A heap entry: a pair and its count when pushed.
#[derive(Debug, PartialEq, Eq)]
struct Candidate {
    count: u64,
    pair: Pair,
}

impl Ord for Candidate {
    /// Larger count first; for equal counts the smaller pair is "greater" (popped first).
    fn cmp(&self, other: &Self) -> Ordering {
        self.count.cmp(&other.count).then_with(|| other.pair.cmp(&self.pair))
    }
}

impl PartialOrd for Candidate {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// Pair counts and, for each pair, the words it occurs in (indices; may be stale).
#[derive(Default)]
struct PairIndex {
    counts: FxHashMap<Pair, u64>,
    words: FxHashMap<Pair, Vec<u32>>,
}

impl PairIndex {
    /// Counts the pairs of `word` (index `wi`, occurring `freq` times).
    fn add_word(&mut self, wi: u32, word: &[u32], freq: u64) {
        for w in word.windows(2) {
            let pair = (w[0], w[1]);
            *self.counts.entry(pair).or_insert(0) += freq;
            let list = self.words.entry(pair).or_default();
            if list.last() != Some(&wi) {
                list.push(wi);
            }
        }
    }

    fn merge(mut self, other: PairIndex) -> PairIndex {
        for (pair, c) in other.counts {
            *self.counts.entry(pair).or_insert(0) += c;
        }
        for (pair, list) in other.words {
            self.words.entry(pair).or_default().extend(list);
        }
        self
    }
}

/// `word` with every occurrence of `pair` (left to right, no overlap) replaced by `new_id`.
pub fn merge_word(word: &[u32], pair: Pair, new_id: u32) -> Vec<u32> {
    let mut out = Vec::with_capacity(word.len());
    let mut i = 0;
    while i < word.len() {
        if i + 1 < word.len() && (word[i], word[i + 1]) == pair {
            out.push(new_id);
            i += 2;
        } else {
            out.push(word[i]);
            i += 1;
        }
    }
    out
}

/// Learns `num_merges` merges from (chunk bytes, count) rows (chunks should be distinct; a
/// repeated chunk simply counts as another word). Errors on an empty corpus and when the
/// corpus runs out of pairs before `num_merges` merges.
pub fn train<'a>(
    chunks: impl IntoIterator<Item = (&'a [u8], u64)>,
    num_merges: usize,
) -> Result<Vec<Pair>, String> {
    let mut n_chunks = 0usize;
    let mut words: Vec<Vec<u32>> = Vec::new();
    let mut freqs: Vec<u64> = Vec::new();
    for (chunk, count) in chunks {
        if count == 0 || chunk.is_empty() {
            continue;
        }
        n_chunks += 1;
        // A one-byte chunk has no pair: it can never change the merges.
        if chunk.len() >= 2 {
            words.push(chunk.iter().map(|&b| b as u32).collect());
            freqs.push(count);
        }
    }
    if n_chunks == 0 {
        return Err("the corpus is empty: there is no text to learn merges from".into());
    }
    if u32::try_from(words.len()).is_err() || 256 + num_merges > u32::MAX as usize {
        return Err("too many distinct chunks or merges for 32-bit ids".into());
    }

    let mut index = words
        .par_iter()
        .enumerate()
        .fold(PairIndex::default, |mut idx, (wi, w)| {
            idx.add_word(wi as u32, w, freqs[wi]);
            idx
        })
        .reduce(PairIndex::default, PairIndex::merge);
    let mut heap: BinaryHeap<Candidate> =
        index.counts.iter().map(|(&pair, &count)| Candidate { count, pair }).collect();

    let mut merges = Vec::with_capacity(num_merges);
    while merges.len() < num_merges {
        let Some(pair) = pop_best(&mut heap, &index.counts) else {
            let done = merges.len();
            return Err(format!(
                "the corpus has no pair left to merge after {done} merges (vocab size {}): \
                 ask for a vocab size of at most {} or train on more text",
                256 + done,
                256 + done
            ));
        };
        let new_id = 256 + merges.len() as u32;
        apply_merge(&mut words, &freqs, &mut index, &mut heap, pair, new_id);
        merges.push(pair);
    }
    Ok(merges)
}

/// Pops the most frequent pair (smallest on ties), refreshing stale entries on the way.
fn pop_best(heap: &mut BinaryHeap<Candidate>, counts: &FxHashMap<Pair, u64>) -> Option<Pair> {
    while let Some(top) = heap.pop() {
        let current = counts.get(&top.pair).copied().unwrap_or(0);
        if current == 0 {
            continue;
        }
        if current == top.count {
            return Some(top.pair);
        }
        heap.push(Candidate { count: current, pair: top.pair });
    }
    None
}

/// Replaces `pair` by `new_id` in every word that has it, updating pair counts, the
/// pair -> words index and the heap (entries for the new pairs).
fn apply_merge(
    words: &mut [Vec<u32>],
    freqs: &[u64],
    index: &mut PairIndex,
    heap: &mut BinaryHeap<Candidate>,
    pair: Pair,
    new_id: u32,
) {
    let affected = index.words.remove(&pair).unwrap_or_default();
    let mut new_pairs: Vec<Pair> = Vec::new();
    for wi in affected {
        let word = &words[wi as usize];
        if !word.windows(2).any(|w| (w[0], w[1]) == pair) {
            continue;
        }
        let freq = freqs[wi as usize];
        for w in word.windows(2) {
            let c = index.counts.get_mut(&(w[0], w[1])).expect("a word's pairs are counted");
            *c -= freq;
        }
        let merged = merge_word(word, pair, new_id);
        for w in merged.windows(2) {
            let p = (w[0], w[1]);
            let c = index.counts.entry(p).or_insert(0);
            if *c == 0 && (p.0 == new_id || p.1 == new_id) {
                new_pairs.push(p);
            }
            *c += freq;
            if p.0 == new_id || p.1 == new_id {
                let list = index.words.entry(p).or_default();
                if list.last() != Some(&wi) {
                    list.push(wi);
                }
            }
        }
        words[wi as usize] = merged;
    }
    index.counts.remove(&pair);
    for p in new_pairs {
        heap.push(Candidate { count: index.counts[&p], pair: p });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merges_left_to_right_without_overlap() {
        assert_eq!(merge_word(&[97, 97, 97, 97, 97], (97, 97), 256), vec![256, 256, 97]);
        assert_eq!(merge_word(&[1, 2, 1, 2], (2, 1), 9), vec![1, 9, 2]);
    }

    #[test]
    fn ties_go_to_the_smallest_pair() {
        // "ab" and "cd" occur equally often: (97, 98) < (99, 100) goes first.
        let merges = train([(&b"cd"[..], 3), (&b"ab"[..], 3)], 2).unwrap();
        assert_eq!(merges, vec![(97, 98), (99, 100)]);
    }

    #[test]
    fn errors_on_empty_corpus_and_exhausted_pairs() {
        assert!(train(std::iter::empty(), 1).unwrap_err().contains("empty"));
        let err = train([(&b"ab"[..], 1)], 2).unwrap_err();
        assert!(err.contains("after 1 merges"), "{err}");
    }
}
