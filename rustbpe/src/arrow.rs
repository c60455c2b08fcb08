//! The Arrow C Data Interface, for exactly the arrays rustbpe exchanges with Python:
//! chunk counts (a struct of `chunk: large_binary`, `count: uint64`) out, zero-copy, and
//! chunk counts and string columns in, borrowed without copying.
//!
//! Spec: <https://arrow.apache.org/docs/format/CDataInterface.html>. pyarrow wraps an exported
//! array without copying (`pa.record_batch(obj)` on an object with `__arrow_c_array__`), and its
//! own arrays export the same structs; the PyCapsule plumbing lives in `py.rs`.

use std::ffi::{c_char, c_void, CStr, CString};
use std::sync::Arc;

use crate::counts::{ChunkCounts, CountsView, Offsets};

/// `struct ArrowSchema` of the C Data Interface.
#[repr(C)]
#[derive(Debug)]
pub struct ArrowSchema {
    pub format: *const c_char,
    pub name: *const c_char,
    pub metadata: *const c_char,
    pub flags: i64,
    pub n_children: i64,
    pub children: *mut *mut ArrowSchema,
    pub dictionary: *mut ArrowSchema,
    pub release: Option<unsafe extern "C" fn(*mut ArrowSchema)>,
    pub private_data: *mut c_void,
}

/// `struct ArrowArray` of the C Data Interface.
#[repr(C)]
#[derive(Debug)]
pub struct ArrowArray {
    pub length: i64,
    pub null_count: i64,
    pub offset: i64,
    pub n_buffers: i64,
    pub n_children: i64,
    pub buffers: *mut *const c_void,
    pub children: *mut *mut ArrowArray,
    pub dictionary: *mut ArrowArray,
    pub release: Option<unsafe extern "C" fn(*mut ArrowArray)>,
    pub private_data: *mut c_void,
}

// The structs only carry pointers to data they own (through `private_data`) or that the
// producer keeps alive until `release`; the spec allows releasing from any thread.
unsafe impl Send for ArrowSchema {}
unsafe impl Send for ArrowArray {}

impl Drop for ArrowSchema {
    fn drop(&mut self) {
        if let Some(release) = self.release {
            unsafe { release(self) };
        }
    }
}

impl Drop for ArrowArray {
    fn drop(&mut self) {
        if let Some(release) = self.release {
            unsafe { release(self) };
        }
    }
}

struct SchemaPrivate {
    format: CString,
    name: CString,
    children: Vec<*mut ArrowSchema>,
}

unsafe extern "C" fn release_schema(schema: *mut ArrowSchema) {
    let schema = unsafe { &mut *schema };
    let private = unsafe { Box::from_raw(schema.private_data as *mut SchemaPrivate) };
    for &child in &private.children {
        // Dropping the box calls the child's release unless a consumer moved it out.
        drop(unsafe { Box::from_raw(child) });
    }
    schema.release = None;
}

fn schema(format: &str, name: &str, children: Vec<ArrowSchema>) -> ArrowSchema {
    let children: Vec<*mut ArrowSchema> = children.into_iter().map(|c| Box::into_raw(Box::new(c))).collect();
    let mut private = Box::new(SchemaPrivate {
        format: CString::new(format).expect("format has no NUL"),
        name: CString::new(name).expect("name has no NUL"),
        children,
    });
    // Pointers into the box's heap data stay valid when the box itself is turned into a raw
    // pointer (last field, so it is evaluated after the others).
    ArrowSchema {
        format: private.format.as_ptr(),
        name: private.name.as_ptr(),
        metadata: std::ptr::null(),
        flags: 0,
        n_children: private.children.len() as i64,
        children: private.children.as_mut_ptr(),
        dictionary: std::ptr::null_mut(),
        release: Some(release_schema),
        private_data: Box::into_raw(private) as *mut c_void,
    }
}

struct ArrayPrivate {
    buffers: Vec<*const c_void>,
    children: Vec<*mut ArrowArray>,
    _owner: Arc<ChunkCounts>,
}

unsafe extern "C" fn release_array(array: *mut ArrowArray) {
    let array = unsafe { &mut *array };
    let private = unsafe { Box::from_raw(array.private_data as *mut ArrayPrivate) };
    for &child in &private.children {
        drop(unsafe { Box::from_raw(child) });
    }
    array.release = None;
}

fn array(
    length: usize,
    buffers: Vec<*const c_void>,
    children: Vec<ArrowArray>,
    owner: &Arc<ChunkCounts>,
) -> ArrowArray {
    let children: Vec<*mut ArrowArray> = children.into_iter().map(|c| Box::into_raw(Box::new(c))).collect();
    let mut private = Box::new(ArrayPrivate { buffers, children, _owner: Arc::clone(owner) });
    ArrowArray {
        length: length as i64,
        null_count: 0,
        offset: 0,
        n_buffers: private.buffers.len() as i64,
        n_children: private.children.len() as i64,
        buffers: private.buffers.as_mut_ptr(),
        children: private.children.as_mut_ptr(),
        dictionary: std::ptr::null_mut(),
        release: Some(release_array),
        private_data: Box::into_raw(private) as *mut c_void,
    }
}

/// Exports counts as a struct array `{chunk: large_binary, count: uint64}` that owns them.
pub fn export_counts(counts: Arc<ChunkCounts>) -> (ArrowSchema, ArrowArray) {
    let schema = schema("+s", "", vec![schema("Z", "chunk", Vec::new()), schema("L", "count", Vec::new())]);
    let n = counts.len();
    let chunk = array(
        n,
        vec![
            std::ptr::null(),
            counts.offsets.as_ptr() as *const c_void,
            counts.data.as_ptr() as *const c_void,
        ],
        Vec::new(),
        &counts,
    );
    let count =
        array(n, vec![std::ptr::null(), counts.counts.as_ptr() as *const c_void], Vec::new(), &counts);
    let parent = array(n, vec![std::ptr::null()], vec![chunk, count], &counts);
    (schema, parent)
}

/// The format string of a schema.
///
/// # Safety
/// `schema` must be a valid, unreleased `ArrowSchema`.
unsafe fn format_of(schema: &ArrowSchema) -> &str {
    unsafe { CStr::from_ptr(schema.format) }.to_str().unwrap_or("?")
}

/// Errors unless the array slice has no nulls.
fn check_no_nulls(array: &ArrowArray, what: &str) -> Result<(), String> {
    let has_validity = array.n_buffers > 0 && unsafe { !(*array.buffers).is_null() };
    if array.null_count > 0 || (array.null_count < 0 && has_validity) {
        return Err(format!("{what} has null values; drop them first (e.g. table.drop_null())"));
    }
    Ok(())
}

/// A binary or string column: (data, offsets) restricted to rows `offset..offset + length`.
///
/// # Safety
/// `array` must be a valid binary/string array of `format` ("z"/"u": i32 offsets,
/// "Z"/"U": i64 offsets); the slices live as long as the array is not released.
unsafe fn binary_parts<'a>(
    array: &'a ArrowArray,
    format: &str,
    offset: usize,
    length: usize,
) -> Result<(&'a [u8], Offsets<'a>), String> {
    if array.n_buffers != 3 {
        return Err(format!("a binary array needs 3 buffers, found {}", array.n_buffers));
    }
    let bufs = unsafe { std::slice::from_raw_parts(array.buffers, 3) };
    let offsets = match format {
        "z" | "u" => {
            let o = unsafe { std::slice::from_raw_parts(bufs[1] as *const i32, offset + length + 1) };
            Offsets::I32(&o[offset..])
        }
        _ => {
            let o = unsafe { std::slice::from_raw_parts(bufs[1] as *const i64, offset + length + 1) };
            Offsets::I64(&o[offset..])
        }
    };
    let end = match offsets {
        Offsets::I32(o) => o[length] as i64,
        Offsets::I64(o) => o[length],
    };
    if end < 0 {
        return Err("a binary array has a negative offset".into());
    }
    let data = if end == 0 {
        &[][..]
    } else {
        unsafe { std::slice::from_raw_parts(bufs[2] as *const u8, end as usize) }
    };
    Ok((data, offsets))
}

/// Borrows chunk counts from a struct array with fields `chunk` (binary or large_binary) and
/// `count` (uint64), e.g. a pyarrow RecordBatch or a [`export_counts`] array.
///
/// # Safety
/// `schema` and `array` must be valid, unreleased and describe the same array; the view lives
/// as long as they do.
pub unsafe fn import_counts<'a>(
    schema: &'a ArrowSchema,
    array: &'a ArrowArray,
) -> Result<CountsView<'a>, String> {
    let want = "chunk counts must be a struct/record batch with columns chunk (binary) and count (uint64)";
    if unsafe { format_of(schema) } != "+s" || schema.n_children != array.n_children {
        return Err(format!("{want}; got format {:?}", unsafe { format_of(schema) }));
    }
    check_no_nulls(array, "the chunk counts struct")?;
    let n = schema.n_children as usize;
    let kids = unsafe { std::slice::from_raw_parts(schema.children, n) };
    let arrays = unsafe { std::slice::from_raw_parts(array.children, n) };
    let find = |name: &str| {
        kids.iter()
            .position(|&k| unsafe { CStr::from_ptr((*k).name) }.to_bytes() == name.as_bytes())
            .ok_or_else(|| format!("{want}; column {name:?} is missing"))
    };
    let (ci, ni) = (find("chunk")?, find("count")?);
    let (chunk_schema, chunk) = unsafe { (&*kids[ci], &*arrays[ci]) };
    let (count_schema, count) = unsafe { (&*kids[ni], &*arrays[ni]) };
    let chunk_format = unsafe { format_of(chunk_schema) };
    if !matches!(chunk_format, "z" | "Z") || unsafe { format_of(count_schema) } != "L" {
        return Err(format!(
            "{want}; got chunk {chunk_format:?} and count {:?} (cast chunk to pa.large_binary(), count to pa.uint64())",
            unsafe { format_of(count_schema) }
        ));
    }
    check_no_nulls(chunk, "the chunk column")?;
    check_no_nulls(count, "the count column")?;
    let length = array.length as usize;
    let (data, offsets) =
        unsafe { binary_parts(chunk, chunk_format, (array.offset + chunk.offset) as usize, length)? };
    let counts = if length == 0 {
        &[][..]
    } else {
        let values = unsafe { *count.buffers.add(1) } as *const u64;
        let start = (array.offset + count.offset) as usize;
        unsafe { std::slice::from_raw_parts(values.add(start), length) }
    };
    CountsView::new(data, offsets, counts)
}

/// Borrows the strings of a `string` or `large_string` array (checking UTF-8 once).
///
/// # Safety
/// As for [`import_counts`].
pub unsafe fn import_strings<'a>(
    schema: &'a ArrowSchema,
    array: &'a ArrowArray,
) -> Result<Vec<&'a str>, String> {
    let format = unsafe { format_of(schema) };
    if !matches!(format, "u" | "U") {
        return Err(format!(
            "texts must be a list of str or a pyarrow string/large_string array; got Arrow format {format:?} \
             (cast it with .cast(pa.large_string()))"
        ));
    }
    check_no_nulls(array, "the text column")?;
    let length = array.length as usize;
    let (data, offsets) = unsafe { binary_parts(array, format, array.offset as usize, length)? };
    let offset = |i: usize| match offsets {
        Offsets::I32(o) => o[i] as usize,
        Offsets::I64(o) => o[i] as usize,
    };
    let text =
        std::str::from_utf8(&data[offset(0)..]).map_err(|e| format!("the text column is not UTF-8: {e}"))?;
    let base = offset(0);
    (0..length)
        .map(|i| {
            text.get(offset(i) - base..offset(i + 1) - base)
                .ok_or_else(|| format!("text {i} does not start and end on UTF-8 character boundaries"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exported_counts_import_back_unchanged() {
        let counts = ChunkCounts { data: b"abxyz".to_vec(), offsets: vec![0, 2, 5], counts: vec![7, 1] };
        let (schema, array) = export_counts(Arc::new(counts.clone()));
        let view = unsafe { import_counts(&schema, &array) }.unwrap();
        assert_eq!(view.iter().collect::<Vec<_>>(), vec![(&b"ab"[..], 7), (&b"xyz"[..], 1)]);
    }
}
