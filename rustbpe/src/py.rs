//! Python bindings (`import rustbpe`): all pyo3 code lives here, the core knows no Python.
//!
//! Module contents:
//! - `DEFAULT_PATTERN: str`
//! - `count_chunks(texts, pattern=None) -> ChunkCounts`: `texts` is a list of str or a pyarrow
//!   string/large_string array; parallel, GIL released.
//! - `merge_counts(parts) -> ChunkCounts`: `parts` is one or a sequence of ChunkCounts or
//!   Arrow struct arrays / record batches with columns `chunk` (binary) and `count` (uint64).
//! - `ChunkCounts`: `len()`, `.total`, and `__arrow_c_array__` so that
//!   `pyarrow.record_batch(counts)` wraps its buffers without copying.
//! - `Tokenizer(merges=[], pattern=None)`; training in place, as nanochat's rustbpe does it:
//!   `tok = Tokenizer(); tok.train_from_iterator(iterator, vocab_size, buffer_size=8192,
//!   pattern=None)` and `tok.train_from_counts(counts, vocab_size, pattern=None)` replace `tok`'s
//!   merges and pattern and return None. The constructors that return a new tokenizer have their
//!   own names: `Tokenizer.from_iterator(...)`, `Tokenizer.from_counts(...)`, `Tokenizer.load(path)`.
//!   (PyO3 cannot tell `Tokenizer.f(x)` from `tok.f(x)` on one method, so each name is one or the
//!   other.) Methods `encode`, `encode_batch`, `decode` (-> bytes: token boundaries may split a
//!   UTF-8 character, so decoding to str is the caller's choice), `get_mergeable_ranks`,
//!   `get_merges`, `get_pattern`, `id_to_bytes`, `save`, `vocab_size`.
//!
//! Errors: ValueError for bad values (vocab size, empty corpus, bad pattern or file), TypeError
//! for a non-str text, UnicodeEncodeError (a ValueError) for a str with lone surrogates.

use std::ffi::CStr;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyCapsule, PyString, PyTuple};
use rustc_hash::FxHashMap;

use crate::arrow::{self, ArrowArray, ArrowSchema};
use crate::counts::{self, ChunkCounts, CountsView};
use crate::pretokenize::{Splitter, DEFAULT_PATTERN};
use crate::tokenizer::Tokenizer;
use crate::with_threads;

const SCHEMA_CAPSULE: &CStr = c"arrow_schema";
const ARRAY_CAPSULE: &CStr = c"arrow_array";
/// Texts pulled from a Python iterator per parallel counting round.
const ITER_BATCH_TEXTS: usize = 8192;
/// The default of `train_from_iterator`'s `buffer_size` (nanochat's name for the same knob).
/// ... or fewer, once they hold this many bytes (bounds memory for huge documents).
const ITER_BATCH_BYTES: usize = 64 << 20;

fn value_err(e: String) -> PyErr {
    PyValueError::new_err(e)
}

fn splitter_for(pattern: Option<&str>) -> PyResult<Splitter> {
    Splitter::new(pattern.unwrap_or(DEFAULT_PATTERN)).map_err(value_err)
}

/// An object's Arrow C Data Interface capsules, kept alive while their structs are borrowed.
struct ArrowCapsules<'py> {
    schema: Bound<'py, PyCapsule>,
    array: Bound<'py, PyCapsule>,
}

impl<'py> ArrowCapsules<'py> {
    /// `obj.__arrow_c_array__()`, or None when the object does not implement it.
    fn of(obj: &Bound<'py, PyAny>) -> PyResult<Option<Self>> {
        if !obj.hasattr("__arrow_c_array__")? {
            return Ok(None);
        }
        let pair = obj.call_method0("__arrow_c_array__")?;
        let pair = pair.cast_into::<PyTuple>()?;
        let schema = pair.get_item(0)?.cast_into::<PyCapsule>()?;
        let array = pair.get_item(1)?.cast_into::<PyCapsule>()?;
        Ok(Some(ArrowCapsules { schema, array }))
    }

    /// The borrowed structs (valid while `self` lives; pyarrow releases them with the capsules).
    fn structs(&self) -> PyResult<(&ArrowSchema, &ArrowArray)> {
        let s = self.schema.pointer_checked(Some(SCHEMA_CAPSULE))?.cast::<ArrowSchema>();
        let a = self.array.pointer_checked(Some(ARRAY_CAPSULE))?.cast::<ArrowArray>();
        // SAFETY: the producer keeps the structs alive and unmoved until the capsules die.
        Ok(unsafe { (s.as_ref(), a.as_ref()) })
    }
}

/// Python objects whose text we borrow: str objects or one Arrow string array.
enum TextSource<'py> {
    Strs(Vec<Bound<'py, PyString>>),
    Arrow(ArrowCapsules<'py>),
}

impl<'py> TextSource<'py> {
    fn of(texts: &Bound<'py, PyAny>) -> PyResult<Self> {
        if let Some(caps) = ArrowCapsules::of(texts)? {
            return Ok(TextSource::Arrow(caps));
        }
        if texts.is_instance_of::<PyString>() {
            return Err(PyTypeError::new_err("texts must be a list of str, not a single str"));
        }
        let mut strs = Vec::new();
        for (i, item) in texts.try_iter()?.enumerate() {
            strs.push(as_str_object(item?, i)?);
        }
        Ok(TextSource::Strs(strs))
    }

    fn borrow(&self) -> PyResult<Vec<&str>> {
        match self {
            TextSource::Strs(v) => v.iter().map(|s| s.to_str()).collect(),
            TextSource::Arrow(caps) => {
                let (schema, array) = caps.structs()?;
                // SAFETY: the capsules outlive the returned strs (both borrow `self`).
                unsafe { arrow::import_strings(schema, array) }.map_err(value_err)
            }
        }
    }
}

/// `item` as a str object, or a TypeError naming element `i` and its type.
fn as_str_object<'py>(item: Bound<'py, PyAny>, i: usize) -> PyResult<Bound<'py, PyString>> {
    item.cast_into::<PyString>().map_err(|e| {
        let ty = e.into_inner().get_type().name().map(|n| n.to_string()).unwrap_or_default();
        PyTypeError::new_err(format!("text {i} has type {ty}, expected str"))
    })
}

/// Borrows chunk-count views from one part or a sequence of parts and calls `f` on them.
fn with_count_views<R>(
    parts: &Bound<'_, PyAny>,
    f: impl FnOnce(&[CountsView<'_>]) -> PyResult<R>,
) -> PyResult<R> {
    let items: Vec<Bound<'_, PyAny>> =
        if parts.is_instance_of::<PyChunkCounts>() || parts.hasattr("__arrow_c_array__")? {
            vec![parts.clone()]
        } else {
            parts.try_iter()?.collect::<PyResult<_>>()?
        };
    let mut owned: Vec<Arc<ChunkCounts>> = Vec::new();
    let mut capsules: Vec<ArrowCapsules<'_>> = Vec::new();
    for (i, item) in items.iter().enumerate() {
        if let Ok(c) = item.cast::<PyChunkCounts>() {
            owned.push(Arc::clone(&c.get().inner));
        } else if let Some(caps) = ArrowCapsules::of(item)? {
            capsules.push(caps);
        } else {
            let ty = item.get_type().name()?.to_string();
            return Err(PyTypeError::new_err(format!(
                "chunk counts part {i} is a {ty}; expected rustbpe.ChunkCounts or a pyarrow RecordBatch/StructArray"
            )));
        }
    }
    let mut views: Vec<CountsView<'_>> = owned.iter().map(|c| c.view()).collect();
    for caps in &capsules {
        let (schema, array) = caps.structs()?;
        // SAFETY: `capsules` outlives `views`.
        views.push(unsafe { arrow::import_counts(schema, array) }.map_err(value_err)?);
    }
    f(&views)
}

/// Counts of distinct chunks, in Arrow layout (see `__arrow_c_array__`).
#[pyclass(name = "ChunkCounts", module = "rustbpe", frozen)]
struct PyChunkCounts {
    inner: Arc<ChunkCounts>,
}

#[pymethods]
impl PyChunkCounts {
    fn __len__(&self) -> usize {
        self.inner.len()
    }

    /// Sum of all counts (number of chunks in the counted text).
    #[getter]
    fn total(&self) -> u64 {
        self.inner.total()
    }

    /// Arrow PyCapsule protocol: a struct array {chunk: large_binary, count: uint64} that
    /// shares this object's buffers (no copy).
    #[pyo3(signature = (requested_schema=None))]
    fn __arrow_c_array__<'py>(
        &self,
        py: Python<'py>,
        requested_schema: Option<Bound<'py, PyAny>>,
    ) -> PyResult<(Bound<'py, PyCapsule>, Bound<'py, PyCapsule>)> {
        // The request is a hint (spec): we always export our one layout.
        let _ = requested_schema;
        let (schema, array) = arrow::export_counts(Arc::clone(&self.inner));
        let schema = PyCapsule::new_with_value(py, schema, SCHEMA_CAPSULE)?;
        let array = PyCapsule::new_with_value(py, array, ARRAY_CAPSULE)?;
        Ok((schema, array))
    }

    fn __repr__(&self) -> String {
        format!("ChunkCounts(chunks={}, total={})", self.inner.len(), self.inner.total())
    }
}

/// Chunk counts of `texts` (a list of str or a pyarrow string array), in parallel.
#[pyfunction]
#[pyo3(signature = (texts, pattern=None))]
fn count_chunks(py: Python<'_>, texts: &Bound<'_, PyAny>, pattern: Option<&str>) -> PyResult<PyChunkCounts> {
    let splitter = splitter_for(pattern)?;
    let source = TextSource::of(texts)?;
    let strs = source.borrow()?;
    let counts = py.detach(|| counts::count_chunks(&strs, &splitter)).map_err(value_err)?;
    Ok(PyChunkCounts { inner: Arc::new(counts) })
}

/// Sums chunk counts from several parts (ChunkCounts or Arrow record batches).
#[pyfunction]
fn merge_counts(py: Python<'_>, parts: &Bound<'_, PyAny>) -> PyResult<PyChunkCounts> {
    with_count_views(parts, |views| {
        let merged = py.detach(|| counts::merge_counts(views));
        Ok(PyChunkCounts { inner: Arc::new(merged) })
    })
}

/// A byte-level BPE tokenizer. Training in place swaps the inner tokenizer behind a lock, so the
/// class stays `frozen` (shareable across threads) and a reader never sees a half-trained state.
#[pyclass(name = "Tokenizer", module = "rustbpe", frozen)]
struct PyTokenizer {
    inner: RwLock<Arc<Tokenizer>>,
}

impl PyTokenizer {
    fn wrap(tok: Tokenizer) -> Self {
        PyTokenizer { inner: RwLock::new(Arc::new(tok)) }
    }

    /// The current tokenizer (a cheap handle, usable with the GIL released).
    fn tok(&self) -> Arc<Tokenizer> {
        Arc::clone(&self.inner.read().unwrap_or_else(|e| e.into_inner()))
    }

    fn replace(&self, tok: Tokenizer) {
        *self.inner.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(tok);
    }
}

/// Counts the str items of `iterator` in parallel rounds of `buffer_size` texts (GIL released
/// while counting), then trains merges up to `vocab_size` (which counts the 256 byte tokens).
fn train_iterator(
    py: Python<'_>,
    iterator: &Bound<'_, PyAny>,
    vocab_size: usize,
    buffer_size: usize,
    pattern: Option<&str>,
) -> PyResult<Tokenizer> {
    let pattern = pattern.unwrap_or(DEFAULT_PATTERN);
    let splitter = splitter_for(Some(pattern))?;
    if vocab_size < 256 {
        return Err(value_err(format!("vocab_size {vocab_size} is below 256, the number of byte tokens")));
    }
    if buffer_size == 0 {
        return Err(value_err("buffer_size must be at least 1".to_string()));
    }
    let mut totals: FxHashMap<Vec<u8>, u64> = FxHashMap::default();
    let mut iter = iterator.try_iter()?;
    let mut seen = 0usize;
    loop {
        let mut batch: Vec<Bound<'_, PyString>> = Vec::new();
        let mut bytes = 0usize;
        while batch.len() < buffer_size && bytes < ITER_BATCH_BYTES {
            let Some(item) = iter.next() else { break };
            let s = as_str_object(item?, seen)?;
            let text = s.to_str().map_err(|e| value_err(format!("text {seen} is not valid Unicode: {e}")))?;
            bytes += text.len();
            seen += 1;
            batch.push(s);
        }
        if batch.is_empty() {
            break;
        }
        let strs: Vec<&str> = batch.iter().map(|s| s.to_str()).collect::<PyResult<_>>()?;
        py.detach(|| -> Result<(), String> {
            for (chunk, c) in counts::count_map(&strs, &splitter)? {
                match totals.get_mut(chunk) {
                    Some(t) => *t += c,
                    None => {
                        totals.insert(chunk.to_vec(), c);
                    }
                }
            }
            Ok(())
        })
        .map_err(value_err)?;
    }
    let rows = totals.iter().map(|(k, &c)| (k.as_slice(), c));
    py.detach(|| Tokenizer::train_from_chunks(rows, vocab_size, pattern)).map_err(value_err)
}

/// Trains merges up to `vocab_size` from chunk counts (made with the same `pattern`).
fn train_counts(
    py: Python<'_>,
    counts: &Bound<'_, PyAny>,
    vocab_size: usize,
    pattern: Option<&str>,
) -> PyResult<Tokenizer> {
    let pattern = pattern.unwrap_or(DEFAULT_PATTERN);
    with_count_views(counts, |views| {
        py.detach(|| Tokenizer::train_from_counts(views, vocab_size, pattern)).map_err(value_err)
    })
}

#[pymethods]
impl PyTokenizer {
    /// A tokenizer from merges [(left id, right id), ...] in rank order.
    #[new]
    #[pyo3(signature = (merges=Vec::new(), pattern=None))]
    fn new(merges: Vec<(u32, u32)>, pattern: Option<&str>) -> PyResult<Self> {
        let inner = Tokenizer::new(merges, pattern.unwrap_or(DEFAULT_PATTERN)).map_err(value_err)?;
        Ok(PyTokenizer::wrap(inner))
    }

    /// Trains this tokenizer in place on the str items of `iterator` (nanochat's contract:
    /// `tok = Tokenizer(); tok.train_from_iterator(texts, vocab_size)`); returns None. Texts are
    /// counted in parallel rounds of `buffer_size`. `vocab_size` counts the 256 byte tokens.
    /// On an error the tokenizer is left as it was.
    #[pyo3(signature = (iterator, vocab_size, buffer_size=ITER_BATCH_TEXTS, pattern=None))]
    fn train_from_iterator(
        &self,
        py: Python<'_>,
        iterator: &Bound<'_, PyAny>,
        vocab_size: usize,
        buffer_size: usize,
        pattern: Option<&str>,
    ) -> PyResult<()> {
        let trained = train_iterator(py, iterator, vocab_size, buffer_size, pattern)?;
        self.replace(trained);
        Ok(())
    }

    /// A new tokenizer trained on the str items of `iterator` (as `train_from_iterator`).
    #[staticmethod]
    #[pyo3(signature = (iterator, vocab_size, buffer_size=ITER_BATCH_TEXTS, pattern=None))]
    fn from_iterator(
        py: Python<'_>,
        iterator: &Bound<'_, PyAny>,
        vocab_size: usize,
        buffer_size: usize,
        pattern: Option<&str>,
    ) -> PyResult<Self> {
        Ok(PyTokenizer::wrap(train_iterator(py, iterator, vocab_size, buffer_size, pattern)?))
    }

    /// Trains this tokenizer in place on chunk counts: one or a sequence of ChunkCounts / Arrow
    /// record batches with columns `chunk` and `count` (made with the same `pattern`); returns None.
    #[pyo3(signature = (counts, vocab_size, pattern=None))]
    fn train_from_counts(
        &self,
        py: Python<'_>,
        counts: &Bound<'_, PyAny>,
        vocab_size: usize,
        pattern: Option<&str>,
    ) -> PyResult<()> {
        let trained = train_counts(py, counts, vocab_size, pattern)?;
        self.replace(trained);
        Ok(())
    }

    /// A new tokenizer trained on chunk counts (as `train_from_counts`).
    #[staticmethod]
    #[pyo3(signature = (counts, vocab_size, pattern=None))]
    fn from_counts(
        py: Python<'_>,
        counts: &Bound<'_, PyAny>,
        vocab_size: usize,
        pattern: Option<&str>,
    ) -> PyResult<Self> {
        Ok(PyTokenizer::wrap(train_counts(py, counts, vocab_size, pattern)?))
    }

    /// Loads a tokenizer file written by `save`.
    #[staticmethod]
    fn load(path: PathBuf) -> PyResult<Self> {
        Ok(PyTokenizer::wrap(Tokenizer::load(&path).map_err(value_err)?))
    }

    /// Writes the tokenizer file atomically (temporary name, then rename).
    fn save(&self, py: Python<'_>, path: PathBuf) -> PyResult<()> {
        let tok = self.tok();
        py.detach(|| tok.save(&path)).map_err(value_err)
    }

    /// Token ids of `text` (GIL released).
    fn encode(&self, py: Python<'_>, text: &str) -> PyResult<Vec<u32>> {
        let tok = self.tok();
        py.detach(|| tok.encode(text)).map_err(value_err)
    }

    /// Token ids of each text (a list of str or a pyarrow string array), in parallel over
    /// `num_threads` threads (None: one per core), GIL released.
    #[pyo3(signature = (texts, num_threads=None))]
    fn encode_batch(
        &self,
        py: Python<'_>,
        texts: &Bound<'_, PyAny>,
        num_threads: Option<usize>,
    ) -> PyResult<Vec<Vec<u32>>> {
        let source = TextSource::of(texts)?;
        let strs = source.borrow()?;
        let tok = self.tok();
        py.detach(|| with_threads(num_threads, || tok.encode_batch(&strs)))
            .map_err(value_err)?
            .map_err(value_err)
    }

    /// The bytes of `ids` (bytes, not str: ids may end inside a UTF-8 character).
    fn decode<'py>(&self, py: Python<'py>, ids: Vec<u32>) -> PyResult<Bound<'py, PyBytes>> {
        let bytes = self.tok().decode(&ids).map_err(value_err)?;
        Ok(PyBytes::new(py, &bytes))
    }

    /// The bytes of one token.
    fn id_to_bytes<'py>(&self, py: Python<'py>, id: u32) -> PyResult<Bound<'py, PyBytes>> {
        let tok = self.tok();
        let bytes = tok.token_bytes(id).ok_or_else(|| {
            value_err(format!("token id {id} is outside the vocabulary (size {})", tok.vocab_size()))
        })?;
        Ok(PyBytes::new(py, bytes))
    }

    /// [(token bytes, rank)] for every id; rank == id (for `tiktoken.Encoding`).
    fn get_mergeable_ranks<'py>(&self, py: Python<'py>) -> Vec<(Bound<'py, PyBytes>, u32)> {
        let tok = self.tok();
        (0..tok.vocab_size() as u32)
            .map(|id| (PyBytes::new(py, tok.token_bytes(id).unwrap_or_default()), id))
            .collect()
    }

    /// [(left id, right id)] in rank order; merge i made id 256 + i.
    fn get_merges(&self) -> Vec<(u32, u32)> {
        self.tok().merges().to_vec()
    }

    /// The split pattern.
    fn get_pattern(&self) -> String {
        self.tok().pattern().to_string()
    }

    /// 256 + number of merges.
    #[getter]
    fn vocab_size(&self) -> usize {
        self.tok().vocab_size()
    }

    fn __repr__(&self) -> String {
        format!("rustbpe.Tokenizer(vocab_size={})", self.tok().vocab_size())
    }
}

#[pymodule]
fn rustbpe(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("DEFAULT_PATTERN", DEFAULT_PATTERN)?;
    m.add_class::<PyTokenizer>()?;
    m.add_class::<PyChunkCounts>()?;
    m.add_function(wrap_pyfunction!(count_chunks, m)?)?;
    m.add_function(wrap_pyfunction!(merge_counts, m)?)?;
    Ok(())
}
