//! Views of candle CPU tensors that the kernels read in place, without a copy:
//! contiguous slices of f32 or f16 ([`KvElement`]), rows with a stride
//! ([`StridedRows`], a narrowed fused product) and the `(B, H, S, D)` rows of a
//! key/value cache ([`HeadRows`]).

/// Runs `f` on the f32 elements of a contiguous CPU tensor (no copy);
/// `None` for other devices, dtypes or layouts.
pub(crate) fn with_cpu_f32<R>(t: &candle_core::Tensor, f: impl FnOnce(&[f32]) -> R) -> Option<R> {
    with_cpu_slice::<f32, R>(t, f)
}

/// [`with_cpu_f32`] for elements of `E` (f32 or f16).
pub(crate) fn with_cpu_slice<E: KvElement, R>(t: &candle_core::Tensor, f: impl FnOnce(&[E]) -> R) -> Option<R> {
    if !t.is_contiguous() || t.dtype() != E::DTYPE {
        return None;
    }
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        candle_core::Storage::Cpu(cpu) => {
            let all = E::slice(cpu)?;
            Some(f(&all[layout.start_offset()..layout.start_offset() + t.elem_count()]))
        }
        _ => None,
    }
}

/// A float element the kernels read in place: `f32`, or `f16` (the
/// key/value cache of quantised models: half the bytes to read per
/// decoding step).
pub(crate) trait KvElement: Copy + Send + Sync + 'static {
    /// The candle dtype of a tensor of these elements.
    const DTYPE: candle_core::DType;
    /// True for `f16`.
    const HALF: bool;
    fn to_f32(self) -> f32;
    fn slice(cpu: &candle_core::CpuStorage) -> Option<&[Self]>;
    /// `rows` as they are, when they hold f32.
    fn as_f32<'r, 'a>(rows: &'r HeadRows<'a, Self>) -> Option<&'r HeadRows<'a, f32>>;
}

impl KvElement for f32 {
    const DTYPE: candle_core::DType = candle_core::DType::F32;
    const HALF: bool = false;
    fn to_f32(self) -> f32 {
        self
    }
    fn slice(cpu: &candle_core::CpuStorage) -> Option<&[f32]> {
        cpu.as_slice::<f32>().ok()
    }
    fn as_f32<'r, 'a>(rows: &'r HeadRows<'a, f32>) -> Option<&'r HeadRows<'a, f32>> {
        Some(rows)
    }
}

impl KvElement for half::f16 {
    const DTYPE: candle_core::DType = candle_core::DType::F16;
    const HALF: bool = true;
    fn to_f32(self) -> f32 {
        half::f16::to_f32(self)
    }
    fn slice(cpu: &candle_core::CpuStorage) -> Option<&[half::f16]> {
        cpu.as_slice::<half::f16>().ok()
    }
    fn as_f32<'r, 'a>(_: &'r HeadRows<'a, half::f16>) -> Option<&'r HeadRows<'a, f32>> {
        None
    }
}

/// A `(B, H, S, D)` CPU tensor whose rows of `D` values are contiguous
/// but whose `(b, h)` blocks may lie apart, as in a view of a preallocated
/// key/value cache.
pub(crate) struct HeadRows<'a, E = f32> {
    pub(super) data: &'a [E],
    pub(super) start: usize,
    pub(super) stride_b: usize,
    pub(super) stride_h: usize,
    pub(super) stride_s: usize,
}

impl<E> HeadRows<'_, E> {
    /// Row `j` of head `h` of batch row `b`.
    pub(super) fn row(&self, b: usize, h: usize, j: usize, d: usize) -> &[E] {
        let at = self.start + b * self.stride_b + h * self.stride_h + j * self.stride_s;
        &self.data[at..at + d]
    }

    /// The `s` rows of head `h` of batch row `b` as one `(s, d)` slice, when
    /// they are back to back.
    pub(super) fn rows(&self, b: usize, h: usize, s: usize, d: usize) -> Option<&[E]> {
        let at = self.start + b * self.stride_b + h * self.stride_h;
        (self.stride_s == d).then(|| &self.data[at..at + s * d])
    }
}

impl<'a> HeadRows<'a, f32> {
    /// One `(s, d)` block standing for every `(b, h)`: a head's rows
    /// converted to f32, for the kernels that read f32 only.
    pub(super) fn one_block(data: &'a [f32], d: usize) -> HeadRows<'a, f32> {
        HeadRows { data, start: 0, stride_b: 0, stride_h: 0, stride_s: d }
    }
}

/// The rows of an f32 CPU tensor whose last dimension is contiguous and
/// whose other dimensions step by whole rows (as a `narrow` of the last
/// dimension of a contiguous tensor is): row `r` is
/// `data[start + r · stride..][..n]`.
pub(crate) struct StridedRows<'a> {
    pub data: &'a [f32],
    pub start: usize,
    pub stride: usize,
    pub rows: usize,
    pub n: usize,
}

impl<'a> StridedRows<'a> {
    /// The rows of `n` values each that `data` holds one after another.
    pub(crate) fn contiguous(data: &'a [f32], n: usize) -> StridedRows<'a> {
        StridedRows { data, start: 0, stride: n, rows: data.len() / n.max(1), n }
    }

    pub(super) fn row(&self, r: usize) -> &[f32] {
        &self.data[self.start + r * self.stride..][..self.n]
    }
}

/// Runs `f` on the rows of `t` without a copy; `None` when `t` is not such a
/// CPU f32 tensor.
pub(crate) fn with_cpu_strided_rows<R>(t: &candle_core::Tensor, f: impl FnOnce(StridedRows<'_>) -> R) -> Option<R> {
    let (storage, layout) = t.storage_and_layout();
    let (dims, stride) = (layout.dims(), layout.stride());
    let n = *dims.last()?;
    if t.dtype() != candle_core::DType::F32 || stride.last() != Some(&1) {
        return None;
    }
    // The leading dimensions must collapse to one row stride.
    let rows: usize = dims[..dims.len() - 1].iter().product();
    let mut row_stride = None;
    let mut expect = None;
    for (&d, &st) in dims[..dims.len() - 1].iter().zip(stride).rev() {
        if d == 1 {
            continue;
        }
        match expect {
            None => row_stride = Some(st),
            Some(e) if e != st => return None,
            Some(_) => {}
        }
        expect = Some(st * d);
    }
    let stride = row_stride.unwrap_or(n);
    match &*storage {
        candle_core::Storage::Cpu(cpu) => {
            let data = cpu.as_slice::<f32>().ok()?;
            let start = layout.start_offset();
            if rows > 0 && start + (rows - 1) * stride + n > data.len() {
                return None;
            }
            Some(f(StridedRows { data, start, stride, rows, n }))
        }
        _ => None,
    }
}

/// Runs `f` on the rows of a rank-4 CPU tensor of `E` with unit stride in
/// its last dimension (no copy); `None` otherwise.
pub(crate) fn with_cpu_head_rows<E: KvElement, R>(
    t: &candle_core::Tensor,
    f: impl FnOnce(HeadRows<'_, E>) -> R,
) -> Option<R> {
    let (storage, layout) = t.storage_and_layout();
    let stride = layout.stride();
    if t.dtype() != E::DTYPE || stride.len() != 4 || stride[3] != 1 {
        return None;
    }
    match &*storage {
        candle_core::Storage::Cpu(cpu) => Some(f(HeadRows {
            data: E::slice(cpu)?,
            start: layout.start_offset(),
            stride_b: stride[0],
            stride_h: stride[1],
            stride_s: stride[2],
        })),
        _ => None,
    }
}
