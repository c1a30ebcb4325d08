//! Host memory and the 2-D tensor views that waves read and write.
//!
//! A [`Buffer`] is shared, lockable host memory: waves take a read lock on
//! their inputs and a write lock on their output while they run, so the
//! same buffer may feed many waves at once, and a caller that reads an
//! output before the wave's semaphore is signalled simply waits for the
//! wave. Memory owned by someone else (a C caller's pointer) plugs in
//! through [`HostMemory`].
//!
//! A [`Tensor`] is a view into a buffer in the DLPack manner: dtype, shape
//! `[rows, cols]`, strides in *elements* (not bytes) and an element offset.
//! Row-major contiguous is `strides = [cols, 1]`; a transposed view swaps
//! them. [`Tensor::check`] proves every element of the view lies inside the
//! buffer before a wave is accepted.

use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::dtype::DType;
use crate::error::{Error, Result};

/// Bytes that a [`Buffer`] can hold: owned vectors, or foreign memory.
pub trait HostMemory: Send + Sync + 'static {
    /// The bytes, for reading.
    fn bytes(&self) -> &[u8];
    /// The bytes, for writing.
    fn bytes_mut(&mut self) -> &mut [u8];
}

impl HostMemory for Box<dyn HostMemory> {
    fn bytes(&self) -> &[u8] {
        (**self).bytes()
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        (**self).bytes_mut()
    }
}

impl HostMemory for Vec<u8> {
    fn bytes(&self) -> &[u8] {
        self
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        self
    }
}

/// Shared host memory; cloning shares it.
#[derive(Clone)]
pub struct Buffer {
    inner: Arc<RwLock<dyn HostMemory>>,
    len: usize,
}

impl std::fmt::Debug for Buffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Buffer").field("len", &self.len).finish()
    }
}

impl Buffer {
    /// A buffer over `memory`. Its length must not change afterwards.
    pub fn from_memory(memory: Box<dyn HostMemory>) -> Self {
        Buffer::from_host(memory)
    }

    /// A buffer over `memory`, in one allocation (a wave's tensors are
    /// made per submission, so this is on the submit path). Its length must
    /// not change afterwards.
    pub fn from_host<M: HostMemory>(memory: M) -> Self {
        let len = memory.bytes().len();
        Buffer {
            inner: Arc::new(RwLock::new(memory)),
            len,
        }
    }

    /// A buffer owning `bytes`.
    pub fn from_bytes(bytes: Vec<u8>) -> Self {
        Buffer::from_host(bytes)
    }

    /// `len` zero bytes.
    pub fn zeroed(len: usize) -> Self {
        Buffer::from_bytes(vec![0; len])
    }

    /// `values` encoded as `dtype` (rounded to nearest even).
    pub fn from_f32(values: &[f32], dtype: DType) -> Self {
        let mut bytes = vec![0u8; values.len() * dtype.size()];
        for (i, &v) in values.iter().enumerate() {
            dtype.store(&mut bytes, i, v);
        }
        Buffer::from_bytes(bytes)
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The elements, decoded from `dtype` to f32 (waits for writers).
    pub fn to_f32(&self, dtype: DType) -> Vec<f32> {
        let guard = self.read();
        let bytes = guard.bytes();
        (0..bytes.len() / dtype.size())
            .map(|i| dtype.load(bytes, i))
            .collect()
    }

    /// A copy of the bytes (waits for writers).
    pub fn to_bytes(&self) -> Vec<u8> {
        self.read().bytes().to_vec()
    }

    /// Whether two buffers share memory.
    pub fn same_memory(&self, other: &Buffer) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    /// An identity of the memory, for locking several buffers in one
    /// global order.
    pub(crate) fn key(&self) -> usize {
        Arc::as_ptr(&self.inner).cast::<()>() as usize
    }

    /// A read lock on the memory. A writer that panicked leaves the bytes as
    /// they were; they are still handed out.
    pub(crate) fn read(&self) -> RwLockReadGuard<'_, dyn HostMemory> {
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    /// A write lock on the memory.
    pub(crate) fn write(&self) -> RwLockWriteGuard<'_, dyn HostMemory> {
        self.inner.write().unwrap_or_else(|e| e.into_inner())
    }
}

/// A 2-D view into a [`Buffer`]: `shape = [rows, cols]`, strides and offset
/// in elements.
#[derive(Debug, Clone)]
pub struct Tensor {
    /// The memory.
    pub buffer: Buffer,
    /// Element type.
    pub dtype: DType,
    /// `[rows, cols]`.
    pub shape: [usize; 2],
    /// Elements between consecutive rows and consecutive columns.
    pub strides: [usize; 2],
    /// Element index of `[0, 0]`.
    pub offset: usize,
}

impl Tensor {
    /// A row-major contiguous `rows x cols` view of `buffer` at offset 0.
    pub fn row_major(buffer: Buffer, dtype: DType, rows: usize, cols: usize) -> Self {
        Tensor {
            buffer,
            dtype,
            shape: [rows, cols],
            strides: [cols, 1],
            offset: 0,
        }
    }

    /// A new zeroed row-major `rows x cols` tensor.
    pub fn zeros(dtype: DType, rows: usize, cols: usize) -> Self {
        let len = rows.saturating_mul(cols).saturating_mul(dtype.size());
        Tensor::row_major(Buffer::zeroed(len), dtype, rows, cols)
    }

    /// A row-major `rows x cols` tensor holding `values` (row-major) in `dtype`.
    pub fn from_f32(values: &[f32], dtype: DType, rows: usize, cols: usize) -> Result<Self> {
        if values.len() != rows.saturating_mul(cols) {
            return Err(Error::shape(
                "values",
                format!("{} values for a {rows} x {cols} tensor", values.len()),
            ));
        }
        Ok(Tensor::row_major(
            Buffer::from_f32(values, dtype),
            dtype,
            rows,
            cols,
        ))
    }

    /// The elements of the view, row-major, as f32.
    pub fn to_f32(&self) -> Vec<f32> {
        self.decode(self.buffer.read().bytes())
    }

    /// The elements of the view in `bytes` (this tensor's buffer, already
    /// locked by the caller), row-major, as f32.
    pub(crate) fn decode(&self, bytes: &[u8]) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.shape[0] * self.shape[1]);
        let size = self.dtype.size();
        for r in 0..self.shape[0] {
            // Rows with unit column stride decode in one pass.
            let row = (self.strides[1] == 1)
                .then(|| {
                    let start = self.index(r, 0) * size;
                    bytes.get(start..start + self.shape[1] * size)
                })
                .flatten();
            match row {
                Some(row) => self.dtype.load_run(row, &mut out),
                None => {
                    for c in 0..self.shape[1] {
                        out.push(self.dtype.load(bytes, self.index(r, c)));
                    }
                }
            }
        }
        out
    }

    /// Writes `values` (row-major, one per element of the view) into the
    /// view inside `bytes` (this tensor's buffer, locked for writing by the
    /// caller), encoded as its dtype.
    pub(crate) fn encode(&self, bytes: &mut [u8], values: &[f32]) {
        let size = self.dtype.size();
        let cols = self.shape[1];
        for r in 0..self.shape[0] {
            let Some(src) = values.get(r * cols..(r + 1) * cols) else {
                return;
            };
            let start = self.index(r, 0) * size;
            match bytes.get_mut(start..start + cols * size) {
                Some(row) if self.strides[1] == 1 => self.dtype.store_run(row, src),
                _ => {
                    for (c, v) in src.iter().enumerate() {
                        self.dtype.store(bytes, self.index(r, c), *v);
                    }
                }
            }
        }
    }

    /// A row-major copy of the view in new memory (same dtype).
    pub fn to_contiguous(&self) -> Tensor {
        let size = self.dtype.size();
        let guard = self.buffer.read();
        let src = guard.bytes();
        let mut bytes = Vec::with_capacity(self.elements() * size);
        for r in 0..self.shape[0] {
            for c in 0..self.shape[1] {
                let at = self.index(r, c) * size;
                match src.get(at..at + size) {
                    Some(e) => bytes.extend_from_slice(e),
                    None => bytes.extend(std::iter::repeat_n(0, size)),
                }
            }
        }
        Tensor::row_major(
            Buffer::from_bytes(bytes),
            self.dtype,
            self.shape[0],
            self.shape[1],
        )
    }

    /// Number of elements.
    pub fn elements(&self) -> usize {
        self.shape[0] * self.shape[1]
    }

    /// Element index of `[r, c]` in the buffer.
    pub(crate) fn index(&self, r: usize, c: usize) -> usize {
        self.offset + r * self.strides[0] + c * self.strides[1]
    }

    /// Checks that every element of the view lies inside the buffer;
    /// `field` names the tensor in errors (`a`, `b`, `c`).
    pub fn check(&self, field: &'static str) -> Result<()> {
        let [rows, cols] = self.shape;
        if rows == 0 || cols == 0 {
            return Ok(());
        }
        let last = (rows - 1)
            .checked_mul(self.strides[0])
            .and_then(|x| (cols - 1).checked_mul(self.strides[1]).map(|y| (x, y)))
            .and_then(|(x, y)| x.checked_add(y))
            .and_then(|x| x.checked_add(self.offset))
            .and_then(|x| x.checked_add(1))
            .and_then(|x| x.checked_mul(self.dtype.size()));
        match last {
            Some(end) if end <= self.buffer.len() => Ok(()),
            Some(end) => Err(Error::shape(
                field,
                format!(
                    "shape {rows} x {cols}, strides {:?}, offset {} need {end} bytes but the buffer holds {}",
                    self.strides,
                    self.offset,
                    self.buffer.len()
                ),
            )),
            None => Err(Error::shape(field, "shape and strides overflow usize")),
        }
    }
}
