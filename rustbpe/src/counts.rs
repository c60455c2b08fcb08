//! Chunk counts: how often each pre-tokenized chunk occurs in a corpus.
//!
//! Counts are kept in Arrow's layout so they cross process and node boundaries as three flat
//! buffers, never as millions of Python objects: chunk bytes concatenated into one data buffer,
//! int64 offsets into it (Arrow `large_binary`), and uint64 counts. [`ChunkCounts`] owns such
//! buffers; [`CountsView`] borrows them (from Rust or from an imported Arrow array) and
//! [`merge_counts`] adds any number of views. Rows are sorted by chunk bytes, so equal input
//! gives byte-identical tables.

use rayon::prelude::*;
use rustc_hash::FxHashMap;

use crate::pretokenize::Splitter;

/// Owned chunk counts in Arrow layout; rows sorted by chunk bytes, chunks unique.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChunkCounts {
    /// All chunk bytes, concatenated.
    pub data: Vec<u8>,
    /// `offsets[i]..offsets[i + 1]` are the bytes of chunk `i`; len = rows + 1, starts at 0.
    pub offsets: Vec<i64>,
    /// Occurrences of chunk `i`; len = rows.
    pub counts: Vec<u64>,
}

/// Offsets of a borrowed binary column: Arrow `binary` (i32) or `large_binary` (i64).
#[derive(Debug, Clone, Copy)]
pub enum Offsets<'a> {
    I32(&'a [i32]),
    I64(&'a [i64]),
}

/// Borrowed chunk counts; rows need not be sorted or unique.
#[derive(Debug, Clone, Copy)]
pub struct CountsView<'a> {
    /// Bytes that `offsets` index into.
    pub data: &'a [u8],
    /// len = rows + 1; values need not start at 0 (a sliced Arrow array).
    pub offsets: Offsets<'a>,
    /// len = rows.
    pub counts: &'a [u64],
}

impl<'a> CountsView<'a> {
    /// Checks that offsets are monotone and inside `data` and that the lengths agree.
    pub fn new(data: &'a [u8], offsets: Offsets<'a>, counts: &'a [u64]) -> Result<Self, String> {
        let n_offsets = match offsets {
            Offsets::I32(o) => o.len(),
            Offsets::I64(o) => o.len(),
        };
        if n_offsets != counts.len() + 1 {
            return Err(format!("chunk counts: {n_offsets} offsets for {} counts", counts.len()));
        }
        let view = CountsView { data, offsets, counts };
        let mut prev = view.offset(0);
        if prev < 0 {
            return Err(format!("chunk counts: first offset {prev} is negative"));
        }
        for i in 1..n_offsets {
            let o = view.offset(i);
            if o < prev || o > data.len() as i64 {
                return Err(format!("chunk counts: offset {i} ({o}) is out of order or out of bounds"));
            }
            prev = o;
        }
        Ok(view)
    }

    #[inline]
    fn offset(&self, i: usize) -> i64 {
        match self.offsets {
            Offsets::I32(o) => o[i] as i64,
            Offsets::I64(o) => o[i],
        }
    }

    /// Number of rows.
    pub fn len(&self) -> usize {
        self.counts.len()
    }

    /// True when there are no rows.
    pub fn is_empty(&self) -> bool {
        self.counts.is_empty()
    }

    /// The bytes of chunk `i`.
    #[inline]
    pub fn chunk(&self, i: usize) -> &'a [u8] {
        &self.data[self.offset(i) as usize..self.offset(i + 1) as usize]
    }

    /// (chunk, count) rows in order.
    pub fn iter(&self) -> impl Iterator<Item = (&'a [u8], u64)> + '_ {
        (0..self.len()).map(move |i| (self.chunk(i), self.counts[i]))
    }
}

impl ChunkCounts {
    /// A view of these counts.
    pub fn view(&self) -> CountsView<'_> {
        CountsView { data: &self.data, offsets: Offsets::I64(&self.offsets), counts: &self.counts }
    }

    /// Number of distinct chunks.
    pub fn len(&self) -> usize {
        self.counts.len()
    }

    /// True when there are no chunks.
    pub fn is_empty(&self) -> bool {
        self.counts.is_empty()
    }

    /// Sum of all counts: the number of chunks in the corpus.
    pub fn total(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// Sorted, packed counts from a map of chunk -> count.
    pub fn from_map<K: AsRef<[u8]> + Send + Sync>(map: FxHashMap<K, u64>) -> Self {
        let mut rows: Vec<(K, u64)> = map.into_iter().collect();
        rows.par_sort_unstable_by(|a, b| a.0.as_ref().cmp(b.0.as_ref()));
        let total_bytes: usize = rows.iter().map(|(k, _)| k.as_ref().len()).sum();
        let mut out = ChunkCounts {
            data: Vec::with_capacity(total_bytes),
            offsets: Vec::with_capacity(rows.len() + 1),
            counts: Vec::with_capacity(rows.len()),
        };
        out.offsets.push(0);
        for (k, c) in rows {
            out.data.extend_from_slice(k.as_ref());
            out.offsets.push(out.data.len() as i64);
            out.counts.push(c);
        }
        out
    }
}

/// Chunk -> count map whose keys borrow from texts or Arrow buffers.
pub type CountMap<'a> = FxHashMap<&'a [u8], u64>;

/// The sum of two count maps (adds the smaller into the larger).
fn add_maps<'a>(a: CountMap<'a>, b: CountMap<'a>) -> CountMap<'a> {
    let (mut big, small) = if a.len() >= b.len() { (a, b) } else { (b, a) };
    for (k, c) in small {
        *big.entry(k).or_insert(0) += c;
    }
    big
}

/// Chunk -> count over `texts`, split with `splitter`, in parallel over the rayon pool.
/// Keys borrow from `texts`.
pub fn count_map<'a>(texts: &[&'a str], splitter: &Splitter) -> Result<CountMap<'a>, String> {
    texts
        .par_iter()
        .try_fold(FxHashMap::default, |mut map: CountMap<'a>, text| {
            splitter.for_each_chunk(text, |c| *map.entry(c.as_bytes()).or_insert(0) += 1)?;
            Ok(map)
        })
        .try_reduce(FxHashMap::default, |a, b| Ok(add_maps(a, b)))
}

/// Chunk counts of `texts`, in parallel over the rayon pool.
pub fn count_chunks(texts: &[&str], splitter: &Splitter) -> Result<ChunkCounts, String> {
    Ok(ChunkCounts::from_map(count_map(texts, splitter)?))
}

/// Chunk -> summed count over all `views`; keys borrow from the views' data.
pub fn merged_map<'a>(views: &[CountsView<'a>]) -> CountMap<'a> {
    views
        .par_iter()
        .fold(FxHashMap::default, |mut map: CountMap<'a>, v| {
            map.reserve(v.len());
            for (chunk, count) in v.iter() {
                *map.entry(chunk).or_insert(0) += count;
            }
            map
        })
        .reduce(FxHashMap::default, add_maps)
}

/// One table with the summed counts of all `views` (a chunk in several views counts once,
/// with the sum of its counts).
pub fn merge_counts(views: &[CountsView<'_>]) -> ChunkCounts {
    ChunkCounts::from_map(merged_map(views))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_are_sorted_unique_and_sum_over_blocks() {
        let s = Splitter::Default;
        let texts = ["a b a", "b c", "a"];
        let whole = count_chunks(&texts, &s).unwrap();
        let rows: Vec<(&[u8], u64)> = whole.view().iter().collect();
        assert_eq!(
            rows,
            vec![(&b" a"[..], 1), (&b" b"[..], 1), (&b" c"[..], 1), (&b"a"[..], 2), (&b"b"[..], 1)]
        );
        let left = count_chunks(&texts[..1], &s).unwrap();
        let right = count_chunks(&texts[1..], &s).unwrap();
        assert_eq!(merge_counts(&[left.view(), right.view()]), whole);
    }

    #[test]
    fn view_rejects_bad_offsets() {
        assert!(CountsView::new(b"ab", Offsets::I64(&[0, 3]), &[1]).is_err());
        assert!(CountsView::new(b"ab", Offsets::I32(&[1, 0]), &[1]).is_err());
        assert!(CountsView::new(b"ab", Offsets::I32(&[0, 1]), &[1, 2]).is_err());
        let v = CountsView::new(b"xab", Offsets::I32(&[1, 2, 3]), &[4, 5]).unwrap();
        assert_eq!(v.iter().collect::<Vec<_>>(), vec![(&b"a"[..], 4), (&b"b"[..], 5)]);
    }
}
