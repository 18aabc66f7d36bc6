//! CPU kernels for the shapes that decoding produces: a few activation rows
//! (`m` ≤ 16) against a large row-major weight. candle's matmul repacks the
//! whole weight on every such call, and its quantised matmul has no SIMD
//! path for Q4_1; these kernels stream each weight row once, dot it with
//! every activation row while it is in L1, and split the weight rows over
//! the rayon pool.
//!
//! - [`f32_rows`]: f32 weights `(n, k)`; with AVX-512VL, eight activation
//!   rows at a time meet two weight rows (each activation load feeds two
//!   FMAs), in `k`-blocks that keep the activations in L1, with the weight
//!   stream prefetched.
//! - [`QuantWeight`]: Q4_1 and Q8_0 GGUF blocks, multiplied after quantising
//!   the activations to 8 bits per 32-block (as ggml does). With AVX-512
//!   VNNI the blocks of sixteen rows are interleaved on load, one i32 lane
//!   per row ([`interleaved`]); otherwise they keep their natural order.
//! - [`few_query_attention`]: decoding attention that reads the KV cache in
//!   place (AVX-512F for heads of up to 128 values, else AVX2, else portable).
//!
//! The instruction set is checked at run time (AVX2+FMA+F16C, AVX-512); a
//! portable loop computes the same sums where the CPU has neither.

use rayon::prelude::*;

mod amx;
mod interleaved;
mod kquants;

pub use amx::{available as amx_available, matmul as bf16_matmul, Bf16Tiles};
pub use kquants::q5_0_to_q8_0;

/// Weight rows per parallel task: a few tasks per thread, so that work
/// balances without paying the pool's dispatch cost hundreds of times per
/// token.
fn rows_per_task(n: usize) -> usize {
    let tasks = rayon::current_num_threads() * 4;
    n.div_ceil(tasks).next_multiple_of(16).max(16)
}

/// AVX-512F and VL: 32 vector registers, which the f32 2×8 tile needs.
fn has_avx512vl() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512vl")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

fn has_avx512f() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

fn has_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
            && std::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Runs `chunk(j0, out)` over runs of consecutive weight rows in parallel,
/// where `out` holds the `m` results of each row `j0..` (row-major), and
/// returns the `(m, n)` product.
fn by_weight_chunks(m: usize, n: usize, chunk: impl Fn(usize, &mut [f32]) + Sync) -> Vec<f32> {
    let per_task = rows_per_task(n);
    if m == 1 {
        let mut out = vec![0f32; n];
        out.par_chunks_mut(per_task).enumerate().for_each(|(c, out)| chunk(c * per_task, out));
        return out;
    }
    // Each task turns its `(rows, m)` results into `(m, rows)` while they are
    // in cache; the runs are then copied into place.
    let mut parts = vec![0f32; n * m]; // task c: (m, rows_c)
    parts.par_chunks_mut(per_task * m).enumerate().for_each(|(c, part)| {
        let rows = part.len() / m;
        let mut by_row = vec![0f32; part.len()]; // (rows, m)
        chunk(c * per_task, &mut by_row);
        for i in 0..m {
            for r in 0..rows {
                part[i * rows + r] = by_row[r * m + i];
            }
        }
    });
    let mut out = vec![0f32; m * n];
    for (c, part) in parts.chunks(per_task * m).enumerate() {
        let (j0, rows) = (c * per_task, part.len() / m);
        for (i, run) in part.chunks(rows).enumerate() {
            out[i * n + j0..i * n + j0 + rows].copy_from_slice(run);
        }
    }
    out
}

/// The `(m, n)` result of a product, written by parallel tasks that each own
/// a run of columns (weight rows): no task-local buffer, transposition or
/// copy, which at batch 8 cost as much as a tenth of a decoding step.
#[derive(Clone, Copy)]
struct Columns {
    ptr: *mut f32,
    m: usize,
    n: usize,
}

// SAFETY: tasks write disjoint columns (see `by_weight_columns`).
unsafe impl Send for Columns {}
unsafe impl Sync for Columns {}

impl Columns {
    /// Where element `(i, j)` is, for a kernel that writes a run of the
    /// row's columns.
    ///
    /// # Safety
    /// `i < m`, and every column written through the pointer is below `n`
    /// and in the calling task's run.
    #[inline(always)]
    unsafe fn at(self, i: usize, j: usize) -> *mut f32 {
        debug_assert!(i < self.m && j < self.n);
        self.ptr.add(i * self.n + j)
    }
}

/// Runs `chunk(j0, rows, out)` over runs of consecutive weight rows in
/// parallel (`j0` and `rows` multiples of 16 except at the end), where the
/// task writes every element of columns `j0..j0 + rows` of the `(m, n)`
/// product `out`, and returns the product. The result is not zeroed first
/// (for the lm_head at batch 8, 1.5 MB per token that the kernel overwrites).
///
/// # Safety
/// `chunk` writes each element of its columns (before reading any).
unsafe fn by_weight_columns(m: usize, n: usize, chunk: impl Fn(usize, usize, Columns) + Sync) -> Vec<f32> {
    let per_task = rows_per_task(n);
    let mut out = Vec::<f32>::with_capacity(m * n);
    let columns = Columns { ptr: out.as_mut_ptr(), m, n };
    (0..n.div_ceil(per_task)).into_par_iter().for_each(|c| {
        let j0 = c * per_task;
        chunk(j0, per_task.min(n - j0), columns);
    });
    // SAFETY: the tasks wrote all m · n elements (the caller's promise).
    out.set_len(m * n);
    out
}

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

/// Attention probabilities in one pass per row: `softmax(scale · scores + mask)`.
///
/// `scores` holds `batches` blocks of `rows` rows of length `s`; row `r` of
/// block `b` adds mask row `b · t + r mod t` (`mask` is `(batches, t, s)`:
/// the grouped query heads stacked as `G·T` rows share the mask). With
/// AVX-512F the row is done 16 lanes at a time with a polynomial `exp`
/// (`avx512::softmax_row`, within 2 ulp of libm's); masked (`-inf`)
/// slots give exactly 0 either way.
pub fn masked_softmax(
    scores: &[f32],
    mask: Option<&[f32]>,
    batches: usize,
    t: usize,
    s: usize,
    scale: f32,
) -> Vec<f32> {
    let rows = scores.len() / s.max(1) / batches.max(1);
    let simd = has_avx512f();
    by_rows(scores.len(), s, |r, o| {
        let x = &scores[r * s..(r + 1) * s];
        let m = mask.map(|m| {
            let (b, q) = (r / rows, (r % rows) % t);
            &m[(b * t + q) * s..(b * t + q + 1) * s]
        });
        #[cfg(target_arch = "x86_64")]
        if simd {
            // SAFETY: AVX-512F checked above; `x`, `m` and `o` hold `s` values.
            unsafe { avx512::softmax_row(x, m, scale, o) };
            return;
        }
        let _ = simd;
        softmax_row(x, m, scale, o);
    })
}

/// One row of [`masked_softmax`], portable.
fn softmax_row(x: &[f32], m: Option<&[f32]>, scale: f32, o: &mut [f32]) {
    let mut max = f32::NEG_INFINITY;
    for j in 0..x.len() {
        let v = x[j] * scale + m.map_or(0.0, |m| m[j]);
        o[j] = v;
        max = max.max(v);
    }
    let mut sum = 0f32;
    for v in o.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    for v in o.iter_mut() {
        *v /= sum;
    }
}

/// The softmax backward per row of length `s`: `P ⊙ (dP − Σ_j P_j dP_j)`.
pub fn softmax_backward(p: &[f32], dp: &[f32], s: usize) -> Vec<f32> {
    let simd = has_avx512f();
    by_rows(p.len(), s, |r, o| {
        let (p, dp) = (&p[r * s..(r + 1) * s], &dp[r * s..(r + 1) * s]);
        #[cfg(target_arch = "x86_64")]
        if simd {
            // SAFETY: AVX-512F checked above; all three rows hold `s` values.
            unsafe { avx512::softmax_backward_row(p, dp, o) };
            return;
        }
        let _ = simd;
        let dot: f32 = p.iter().zip(dp).map(|(a, b)| a * b).sum();
        for j in 0..s {
            o[j] = p[j] * (dp[j] - dot);
        }
    })
}

/// Elements per parallel task of the elementwise kernels.
const ELEMENTS_PER_TASK: usize = 1 << 14;

/// `silu(g) ⊙ u`, elementwise (the gated MLP's activation).
pub fn silu_mul(g: &[f32], u: &[f32]) -> Vec<f32> {
    let simd = has_avx512f();
    let mut out = vec![0f32; g.len()];
    out.par_chunks_mut(ELEMENTS_PER_TASK).enumerate().for_each(|(c, o)| {
        let at = c * ELEMENTS_PER_TASK;
        silu_mul_into(&g[at..at + o.len()], &u[at..at + o.len()], o, simd);
    });
    out
}

/// `o = silu(g) ⊙ u` for slices of one length; `simd`: the CPU has AVX-512F.
fn silu_mul_into(g: &[f32], u: &[f32], o: &mut [f32], simd: bool) {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: the caller checked AVX-512F; the three slices have one length.
        unsafe { avx512::silu_mul(g, u, o) };
        return;
    }
    let _ = simd;
    for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
        *o = g / (1.0 + (-g).exp()) * u;
    }
}

/// RMSNorm of each row of `x` (rows of `w.len()` values): `x / √(mean(x²) + ε) ⊙ w`.
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let (d, simd) = (w.len(), has_avx512f());
    by_rows(x.len(), d, |r, out| rms_norm_into(&x[r * d..(r + 1) * d], w, eps, out, simd))
}

/// One row of [`rms_norm`] into `out`, with AVX-512F when `simd`.
fn rms_norm_into(x: &[f32], w: &[f32], eps: f32, out: &mut [f32], simd: bool) {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: the caller checked AVX-512F; the three slices have one length.
        unsafe { avx512::rms_norm_row(x, w, eps, out) };
        return;
    }
    let _ = simd;
    let inv = 1.0 / (x.iter().map(|v| v * v).sum::<f32>() / w.len() as f32 + eps).sqrt();
    for ((o, &x), &w) in out.iter_mut().zip(x).zip(w) {
        *o = x * inv * w;
    }
}

/// A rotary embedding's angles for rows of heads: `cos`/`sin` `(rows, D/2)`,
/// pairing dimensions `(i, i + D/2)` or, `interleaved`, `(2i, 2i + 1)`.
pub(crate) struct Rotation<'a> {
    pub cos: &'a [f32],
    pub sin: &'a [f32],
    pub interleaved: bool,
}

/// The heads of `y` — rows `(b, t)` of `n` heads of `d` values — as one
/// `(B, N, T, D)` buffer: each head RMS-normalised by `norm` (weight, ε)
/// if given (Qwen3's q/k norm), then rotated by its row's angles. One pass
/// instead of a transposing copy, a norm and a rotation.
pub(crate) fn rotated_heads(
    y: &StridedRows<'_>,
    t: usize,
    d: usize,
    norm: Option<(&[f32], f32)>,
    rotation: &Rotation<'_>,
) -> Vec<f32> {
    let (n, half, simd) = (y.n / d, d / 2, has_avx512f());
    let mut out = vec![0f32; y.rows * y.n];
    let head = |block: usize, out: &mut [f32]| {
        // Block (b, j): head j of the t rows of batch row b.
        let (b, j) = (block / n, block % n);
        let mut normed = vec![0f32; if norm.is_some() { d } else { 0 }];
        for (tt, o) in out.chunks_exact_mut(d).enumerate() {
            let row = b * t + tt;
            let mut x = &y.row(row)[j * d..(j + 1) * d];
            if let Some((w, eps)) = norm {
                rms_norm_into(x, w, eps, &mut normed, simd);
                x = &normed;
            }
            let (cos, sin) = (&rotation.cos[row * half..(row + 1) * half], &rotation.sin[row * half..(row + 1) * half]);
            // (a, b) ↦ (a cos − b sin, a sin + b cos), written as zipped
            // slices so that it vectorises.
            if rotation.interleaved {
                for (((o, x), &c), &s) in o.chunks_exact_mut(2).zip(x.chunks_exact(2)).zip(cos).zip(sin) {
                    o[0] = x[0] * c - x[1] * s;
                    o[1] = x[0] * s + x[1] * c;
                }
            } else {
                let ((o1, o2), (x1, x2)) = (o.split_at_mut(half), x.split_at(half));
                for (((((o1, o2), &a), &b), &c), &s) in o1.iter_mut().zip(o2).zip(x1).zip(x2).zip(cos).zip(sin) {
                    *o1 = a * c - b * s;
                    *o2 = a * s + b * c;
                }
            }
        }
    };
    // Decoding's few heads in one go; a prompt's in parallel.
    if out.len() < ELEMENTS_PER_TASK {
        out.chunks_exact_mut(t * d).enumerate().for_each(|(block, o)| head(block, o));
    } else {
        out.par_chunks_exact_mut(t * d).enumerate().for_each(|(block, o)| head(block, o));
    }
    out
}

/// The gradients `(dg, du)` of [`silu_mul`] for the output's gradient `dy`.
pub fn silu_mul_backward(g: &[f32], u: &[f32], dy: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let simd = has_avx512f();
    let (mut dg, mut du) = (vec![0f32; g.len()], vec![0f32; g.len()]);
    dg.par_chunks_mut(ELEMENTS_PER_TASK).zip(du.par_chunks_mut(ELEMENTS_PER_TASK)).enumerate().for_each(
        |(c, (dg, du))| {
            let at = c * ELEMENTS_PER_TASK;
            let n = dg.len();
            let (g, u, dy) = (&g[at..at + n], &u[at..at + n], &dy[at..at + n]);
            #[cfg(target_arch = "x86_64")]
            if simd {
                // SAFETY: AVX-512F checked above; the five slices have one length.
                unsafe { avx512::silu_mul_backward(g, u, dy, dg, du) };
                return;
            }
            let _ = simd;
            for i in 0..n {
                let s = 1.0 / (1.0 + (-g[i]).exp());
                du[i] = dy[i] * g[i] * s;
                dg[i] = dy[i] * u[i] * s * (1.0 + g[i] * (1.0 - s));
            }
        },
    );
    (dg, du)
}

/// A `len`-element output of rows of length `s`, row `r` written by
/// `row(r, out_r)`, 64 rows per parallel task.
fn by_rows(len: usize, s: usize, row: impl Fn(usize, &mut [f32]) + Sync) -> Vec<f32> {
    const ROWS_PER_TASK: usize = 64;
    let mut out = vec![0f32; len];
    out.par_chunks_mut(s * ROWS_PER_TASK).enumerate().for_each(|(c, chunk)| {
        for (i, o) in chunk.chunks_mut(s).enumerate() {
            row(c * ROWS_PER_TASK + i, o);
        }
    });
    out
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
    data: &'a [E],
    start: usize,
    stride_b: usize,
    stride_h: usize,
    stride_s: usize,
}

impl<E> HeadRows<'_, E> {
    /// Row `j` of head `h` of batch row `b`.
    fn row(&self, b: usize, h: usize, j: usize, d: usize) -> &[E] {
        let at = self.start + b * self.stride_b + h * self.stride_h + j * self.stride_s;
        &self.data[at..at + d]
    }

    /// The `s` rows of head `h` of batch row `b` as one `(s, d)` slice, when
    /// they are back to back.
    fn rows(&self, b: usize, h: usize, s: usize, d: usize) -> Option<&[E]> {
        let at = self.start + b * self.stride_b + h * self.stride_h;
        (self.stride_s == d).then(|| &self.data[at..at + s * d])
    }
}

impl<'a> HeadRows<'a, f32> {
    /// One `(s, d)` block standing for every `(b, h)`: a head's rows
    /// converted to f32, for the kernels that read f32 only.
    fn one_block(data: &'a [f32], d: usize) -> HeadRows<'a, f32> {
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

impl StridedRows<'_> {
    fn row(&self, r: usize) -> &[f32] {
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

/// [`silu_mul`] of two tensors given as rows (such as the gate and up halves
/// of a fused product), into a contiguous `(rows, n)` result.
pub(crate) fn silu_mul_rows(g: &StridedRows<'_>, u: &StridedRows<'_>) -> Vec<f32> {
    assert!(g.rows == u.rows && g.n == u.n);
    let (n, simd) = (g.n, has_avx512f());
    by_rows(g.rows * n, n, |r, o| silu_mul_into(g.row(r), u.row(r), o, simd))
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

/// Shapes of one [`few_query_attention`] call.
pub(crate) struct AttentionDims {
    /// Batch rows, key/value heads, stacked query rows per head (`G·T`),
    /// query positions `T`, key slots `S`, head size `D`.
    pub b: usize,
    pub kv: usize,
    pub gt: usize,
    pub t: usize,
    pub s: usize,
    pub d: usize,
}

/// `softmax(scale · q kᵀ + mask) v` per `(b, head)` for a few query rows, as
/// decoding has: `q` `(B, KV, G·T, D)` contiguous, `k`/`v` `(B, KV, S, D)`
/// read in place (f32 or f16), `mask` `(B, T, S)` (query row `r` uses mask
/// row `r mod T`). Returns `(B, KV, G·T, D)`.
pub(crate) fn few_query_attention<E: KvElement>(
    q: &[f32],
    k: &HeadRows<'_, E>,
    v: &HeadRows<'_, E>,
    mask: Option<&[f32]>,
    dims: &AttentionDims,
    scale: f32,
) -> Vec<f32> {
    let AttentionDims { b, kv, gt, d, .. } = *dims;
    debug_assert_eq!(q.len(), b * kv * gt * d);
    let simd = has_avx2_fma();
    let wide = has_avx512f() && d.is_multiple_of(16) && d <= avx512::MAX_HEAD;
    let mut out = vec![0f32; q.len()];
    let call = FewQuery { q, k, v, mask, dims, scale };
    // A few tasks per thread: one (b, head) block is about a microsecond of
    // work at decoding size, as little as a task's dispatch.
    let blocks_per_task = (b * kv).div_ceil(rayon::current_num_threads() * 2).max(1);
    out.par_chunks_mut(gt * d * blocks_per_task).enumerate().for_each(|(task, outs)| {
        let mut scratch = Scratch::default();
        let blocks = outs.len() / (gt * d);
        for (i, out) in outs.chunks_mut(gt * d).enumerate() {
            let block = task * blocks_per_task + i;
            // This task's next block, whose rows are fetched while this one is computed.
            let next = (i + 1 < blocks).then_some(block + 1);
            call.block_with(block, next, out, &mut scratch, simd, wide);
        }
    });
    out
}

/// A task's buffers between [`FewQuery::block_with`] calls: scores, and
/// f16 key/value rows converted for the kernels that read f32 only.
#[derive(Default)]
struct Scratch {
    scores: Vec<f32>,
    keys: Vec<f32>,
    values: Vec<f32>,
}

/// The inputs of one [`few_query_attention`] call, shared by its `(b, head)` blocks.
struct FewQuery<'a, E = f32> {
    q: &'a [f32],
    k: &'a HeadRows<'a, E>,
    v: &'a HeadRows<'a, E>,
    mask: Option<&'a [f32]>,
    dims: &'a AttentionDims,
    scale: f32,
}

impl<E: KvElement> FewQuery<'_, E> {
    /// The `G·T` query rows of block `block`.
    fn rows(&self, block: usize) -> &[f32] {
        let AttentionDims { gt, d, .. } = *self.dims;
        &self.q[block * gt * d..(block + 1) * gt * d]
    }

    /// The additive mask of query row `r` of batch row `bi` (mask row `r mod T`).
    fn mask_row(&self, bi: usize, r: usize) -> Option<&[f32]> {
        let AttentionDims { t, s, .. } = *self.dims;
        self.mask.map(|m| &m[(bi * t + r % t) * s..(bi * t + r % t + 1) * s])
    }

    /// The key and value rows of block `block`, when each head's rows are back to back.
    fn block_rows(&self, block: usize) -> Option<(&[E], &[E])> {
        let AttentionDims { kv, s, d, .. } = *self.dims;
        self.k.rows(block / kv, block % kv, s, d).zip(self.v.rows(block / kv, block % kv, s, d))
    }

    /// Block `block` into `out` with the widest kernel that fits; the AVX-512
    /// kernel fetches block `next`'s rows meanwhile.
    fn block_with(
        &self,
        block: usize,
        next: Option<usize>,
        out: &mut [f32],
        scratch: &mut Scratch,
        simd: bool,
        wide: bool,
    ) {
        let AttentionDims { kv, s, d, .. } = *self.dims;
        let (bi, h) = (block / kv, block % kv);
        #[cfg(target_arch = "x86_64")]
        if wide {
            if let Some((keys, values)) = self.block_rows(block) {
                let mask_row = |r: usize| self.mask_row(bi, r);
                let (q, next) = (self.rows(block), next.and_then(|n| self.block_rows(n)));
                // SAFETY: the CPU has AVX-512F; d % 16 == 0, d ≤ MAX_HEAD; keys and values hold s rows of d.
                unsafe {
                    avx512::attention_rows(q, keys, values, next, mask_row, self.scale, d, out, &mut scratch.scores)
                };
                return;
            }
        }
        let _ = (wide, next);
        let (q, mask, dims, scale) = (self.q, self.mask, self.dims, self.scale);
        if let (Some(k), Some(v)) = (E::as_f32(self.k), E::as_f32(self.v)) {
            return FewQuery { q, k, v, mask, dims, scale }.block_f32(block, out, simd);
        }
        // The other kernels read f32: this head's rows, converted.
        let Scratch { keys, values, .. } = scratch;
        for (rows, to) in [(self.k, &mut *keys), (self.v, &mut *values)] {
            to.clear();
            to.extend((0..s).flat_map(|j| rows.row(bi, h, j, d).iter().map(|x| x.to_f32())));
        }
        let (k, v) = (&HeadRows::one_block(keys, d), &HeadRows::one_block(values, d));
        FewQuery { q, k, v, mask, dims, scale }.block_f32(block, out, simd)
    }
}

impl FewQuery<'_, f32> {
    /// Block `block` into `out` with AVX2 or the portable loop.
    fn block_f32(&self, block: usize, out: &mut [f32], simd: bool) {
        #[cfg(target_arch = "x86_64")]
        if simd {
            // SAFETY: the CPU has AVX2 and FMA (checked by the caller).
            unsafe { attention_block_avx2(self, block, out) };
            return;
        }
        let _ = simd;
        let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(a, b)| a * b).sum();
        attention_block(self, block, out, dot, |_, _| None, weighted_rows);
    }
}

/// One `(b, head)` block of [`few_query_attention`]: `q` and `out` are its
/// `G·T` rows; `dot` is the dot product of two rows of `D` values, `dot8`
/// that of one row with eight consecutive rows, where it has a kernel.
#[inline(always)]
fn attention_block(
    call: &FewQuery<'_>,
    block: usize,
    out: &mut [f32],
    dot: impl Fn(&[f32], &[f32]) -> f32,
    dot8: impl Fn(&[f32], &[f32]) -> Option<[f32; 8]>,
    weighted: impl Fn(&[f32], &HeadRows<'_>, Head, &mut [f32]),
) {
    let AttentionDims { kv, gt, s, d, .. } = *call.dims;
    let (q, k, v, scale) = (call.rows(block), call.k, call.v, call.scale);
    let (bi, h) = (block / kv, block % kv);
    let mut p = vec![0f32; s];
    for r in 0..gt {
        let qr = &q[r * d..(r + 1) * d];
        let m = call.mask_row(bi, r);
        let mut j = 0;
        if let Some(keys) = k.rows(bi, h, s, d) {
            while j + 8 <= s {
                let Some(dots) = dot8(qr, &keys[j * d..(j + 8) * d]) else { break };
                p[j..j + 8].copy_from_slice(&dots);
                j += 8;
            }
        }
        for (j, pj) in p.iter_mut().enumerate().skip(j) {
            *pj = dot(qr, k.row(bi, h, j, d));
        }
        let mut max = f32::NEG_INFINITY;
        for (j, pj) in p.iter_mut().enumerate() {
            *pj = *pj * scale + m.map_or(0.0, |m| m[j]);
            max = max.max(*pj);
        }
        let mut sum = 0f32;
        for pj in p.iter_mut() {
            *pj = (*pj - max).exp();
            sum += *pj;
        }
        let o = &mut out[r * d..(r + 1) * d];
        weighted(&p, v, Head { b: bi, h, d }, o);
        let inv = 1.0 / sum;
        o.iter_mut().for_each(|o| *o *= inv);
    }
}

/// One head of one batch row of [`HeadRows`], with its row size.
#[derive(Clone, Copy)]
struct Head {
    b: usize,
    h: usize,
    d: usize,
}

/// `out += Σ_j p_j · v_j` over the rows of one head, skipping the rows that
/// softmax gave no weight.
#[inline(always)]
fn weighted_rows(p: &[f32], v: &HeadRows<'_>, head: Head, out: &mut [f32]) {
    for (j, &pj) in p.iter().enumerate() {
        if pj != 0.0 {
            for (o, x) in out.iter_mut().zip(v.row(head.b, head.h, j, head.d)) {
                *o += pj * x;
            }
        }
    }
}

/// [`attention_block`] compiled for AVX2 and FMA (the dot products and the
/// weighted sums of value rows vectorise).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn attention_block_avx2(call: &FewQuery<'_>, block: usize, out: &mut [f32]) {
    let d = call.dims.d;
    let dot = |a: &[f32], b: &[f32]| {
        if d.is_multiple_of(8) {
            // SAFETY: this function runs with AVX2 and FMA; both rows hold `d` values.
            unsafe { avx::dot_f32(a, b) }
        } else {
            a.iter().zip(b).map(|(a, b)| a * b).sum()
        }
    };
    // SAFETY: as above; the rows hold 8 · `d` values, d % 8 == 0.
    let dot8 = |a: &[f32], rows: &[f32]| d.is_multiple_of(8).then(|| unsafe { avx::dot_f32_rows::<8>(a, rows, d) });
    let weighted = |p: &[f32], v: &HeadRows<'_>, head: Head, out: &mut [f32]| {
        if d.is_multiple_of(64) {
            // SAFETY: as above; every row holds `d` values, d % 64 == 0.
            unsafe { avx::weighted_rows_64(p, v, head, out) }
        } else {
            weighted_rows(p, v, head, out)
        }
    };
    attention_block(call, block, out, dot, dot8, weighted)
}

/// `x (m, k) @ w (n, k)^T` for row-major f32 slices.
pub fn f32_rows(x: &[f32], m: usize, w: &[f32], n: usize, k: usize) -> Vec<f32> {
    debug_assert_eq!(x.len(), m * k);
    debug_assert_eq!(w.len(), n * k);
    let simd = has_avx2_fma() && k.is_multiple_of(8);
    let tiles = simd && m >= 8 && has_avx512vl();
    by_weight_chunks(m, n, |j0, out| {
        let rows = out.len() / m;
        let mut first = 0;
        #[cfg(target_arch = "x86_64")]
        if tiles {
            // Eight activation rows at a time against two weight rows.
            let wc = &w[j0 * k..(j0 + rows) * k];
            while first + 8 <= m {
                // SAFETY: the CPU has AVX2, FMA, F16C, AVX-512F and VL (checked above); k % 8 == 0.
                unsafe { avx::f32_tiles_2x8(wc, &x[first * k..(first + 8) * k], k, &mut out[first..], m) };
                first += 8;
            }
        }
        for (r, out) in out.chunks_mut(m).enumerate() {
            let wj = &w[(j0 + r) * k..(j0 + r + 1) * k];
            let mut i = first;
            #[cfg(target_arch = "x86_64")]
            if simd {
                // Eight, then four activation rows per pass: the weight row is
                // loaded once for eight (four) FMAs, and streamed from memory once.
                while i + 8 <= m {
                    // SAFETY: the CPU has AVX2, FMA and F16C (checked above); k % 8 == 0.
                    let r = unsafe { avx::dot_f32_rows::<8>(wj, &x[i * k..(i + 8) * k], k) };
                    out[i..i + 8].copy_from_slice(&r);
                    i += 8;
                }
                while i + 4 <= m {
                    // SAFETY: the CPU has AVX2, FMA and F16C (checked above); k % 8 == 0.
                    let r = unsafe { avx::dot_f32_rows::<4>(wj, &x[i * k..(i + 4) * k], k) };
                    out[i..i + 4].copy_from_slice(&r);
                    i += 4;
                }
                while i < m {
                    // SAFETY: as above.
                    out[i] = unsafe { avx::dot_f32(wj, &x[i * k..(i + 1) * k]) };
                    i += 1;
                }
            }
            for (o, xi) in out[i..].iter_mut().zip(x[i * k..].chunks(k)) {
                *o = wj.iter().zip(xi).map(|(a, b)| a * b).sum();
            }
        }
    })
}

/// Activations quantised to 8 bits per 32-block as ggml's reference
/// quantiser does (halves round away from zero): `q = round(x / d)`, `d = max|x| / 127`, laid out
/// for the kernels of one weight format.
struct Q8Rows {
    /// `(m, k)`. For Q4_1 the halves of blocks are reordered to match the
    /// weights' low and high nibbles (`lo` = values 0..16 of a block, `hi` =
    /// 16..32): each group of four blocks as `[lo₀ lo₁ lo₂ lo₃ hi₀ hi₁ hi₂
    /// hi₃]`, then a remaining pair as `[lo₀ lo₁ hi₀ hi₁]`, then a last
    /// block as is; [`q4_1_halves`] says where each half is.
    q: Vec<i8>,
    /// `(m, blocks)`: the block scales.
    d: Vec<f32>,
    /// `(m, 4 · blocks)`: each scale four times, one per i32 lane that a
    /// 32-byte dot product leaves for a block's 16 bytes.
    d4: Vec<f32>,
    /// `(m, blocks)`: `d · Σq`, for Q4_1's minimum.
    s: Vec<f32>,
    /// `(m, 4 · blocks)`: each `s / 4` four times, to add Q4_1's minimum
    /// term lane by lane alongside the scaled dot products.
    s4: Vec<f32>,
    k: usize,
    blocks: usize,
}

fn quantize_rows(x: &[f32], m: usize, k: usize, format: BlockFormat) -> Q8Rows {
    let blocks = k / 32;
    let Natural8 { mut q, d, sum } = quantize_natural(x, m, k);
    let s = scaled_sums(&d, &sum);
    if format == BlockFormat::Q4_1 {
        let natural = q.clone();
        for (row, src) in q.chunks_mut(k).zip(natural.chunks(k)) {
            for b in 0..blocks {
                let (lo, hi) = q4_1_halves(b, blocks);
                row[lo..lo + 16].copy_from_slice(&src[b * 32..b * 32 + 16]);
                row[hi..hi + 16].copy_from_slice(&src[b * 32 + 16..b * 32 + 32]);
            }
        }
    }
    let d4 = d.iter().flat_map(|&v| [v; 4]).collect();
    let s4 = s.iter().flat_map(|&v| [v / 4.0; 4]).collect();
    Q8Rows { q, d, d4, s, s4, k, blocks }
}

/// Activations quantised per 32-block in natural order (see [`quantize_blocks`]).
struct Natural8 {
    /// `(m, k)`.
    q: Vec<i8>,
    /// `(m, blocks)`: the block scales.
    d: Vec<f32>,
    /// `(m, blocks)`: each block's `Σq`.
    sum: Vec<i32>,
}

fn quantize_natural(x: &[f32], m: usize, k: usize) -> Natural8 {
    let blocks = k / 32;
    let mut q = vec![0i8; m * k];
    let mut d = vec![0f32; m * blocks];
    let mut sum = vec![0i32; m * blocks];
    #[cfg(target_arch = "x86_64")]
    if has_avx512f() {
        // SAFETY: the CPU has AVX-512F.
        unsafe { quantize_blocks_avx512(x, &mut q, &mut d, &mut sum) };
    } else if has_avx2_fma() {
        // SAFETY: the CPU has AVX2 (and so SSE4.1's rounding instruction).
        unsafe { quantize_blocks_avx2(x, &mut q, &mut d, &mut sum) };
    } else {
        quantize_blocks(x, &mut q, &mut d, &mut sum);
    }
    #[cfg(not(target_arch = "x86_64"))]
    quantize_blocks(x, &mut q, &mut d, &mut sum);
    Natural8 { q, d, sum }
}

/// `d · Σq` per block: the activations' share of Q4_1's minimum term.
fn scaled_sums(d: &[f32], sum: &[i32]) -> Vec<f32> {
    d.iter().zip(sum).map(|(&d, &sum)| d * sum as f32).collect()
}

/// Where block `b` of a row of `blocks` Q4_1-ordered activations keeps its
/// values 0..16 and 16..32 (offsets in the row; see [`Q8Rows::q`]).
fn q4_1_halves(b: usize, blocks: usize) -> (usize, usize) {
    let quads = blocks / 4 * 4;
    if b < quads {
        let (group, i) = (b / 4 * 128, b % 4 * 16);
        (group + i, group + 64 + i)
    } else if b < blocks / 2 * 2 {
        let (pair, i) = (b / 2 * 64, b % 2 * 16);
        (pair + i, pair + 32 + i)
    } else {
        (b * 32, b * 32 + 16)
    }
}

/// Quantises each 32-block of `x` into `q`, with its scale in `d` and `Σq` in `sum`.
#[inline(always)]
fn quantize_blocks(x: &[f32], q: &mut [i8], d: &mut [f32], sums: &mut [i32]) {
    for (b, (xs, qs)) in x.chunks_exact(32).zip(q.chunks_exact_mut(32)).enumerate() {
        let amax = xs.iter().fold(0f32, |a, v| a.max(v.abs()));
        let scale = amax / 127.0;
        let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
        let mut sum = 0i32;
        for (o, v) in qs.iter_mut().zip(xs) {
            *o = (v * inv).round() as i8;
            sum += *o as i32;
        }
        d[b] = scale;
        sums[b] = sum;
    }
}

/// [`quantize_blocks`] with AVX2: the same values (multiplied by the same
/// inverse scale, halves rounded away from zero), without a call to `roundf`
/// per value.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn quantize_blocks_avx2(x: &[f32], q: &mut [i8], d: &mut [f32], sums: &mut [i32]) {
    use std::arch::x86_64::*;
    let sign = _mm256_set1_ps(-0.0);
    // packs interleave the 128-bit lanes; this puts the 4-byte runs back in order.
    let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for b in 0..x.len() / 32 {
        let p = x.as_ptr().add(b * 32);
        let v = [_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8)), _mm256_loadu_ps(p.add(16)), _mm256_loadu_ps(p.add(24))];
        let abs = |v: __m256| _mm256_andnot_ps(sign, v);
        let a = _mm256_max_ps(_mm256_max_ps(abs(v[0]), abs(v[1])), _mm256_max_ps(abs(v[2]), abs(v[3])));
        let a = _mm_max_ps(_mm256_extractf128_ps(a, 1), _mm256_castps256_ps128(a));
        let a = _mm_max_ps(a, _mm_movehl_ps(a, a));
        let amax = _mm_cvtss_f32(_mm_max_ss(a, _mm_movehdup_ps(a)));
        let scale = amax / 127.0;
        let inv = _mm256_set1_ps(if scale > 0.0 { 1.0 / scale } else { 0.0 });
        // round(y) = trunc(y ± (0.5 − ulp/2)): exact for every f32, ties away from zero.
        let round = |v: __m256| {
            let y = _mm256_mul_ps(v, inv);
            let half = _mm256_or_ps(_mm256_and_ps(y, sign), _mm256_set1_ps(0.49999997));
            _mm256_cvttps_epi32(_mm256_add_ps(y, half))
        };
        let i = [round(v[0]), round(v[1]), round(v[2]), round(v[3])];
        let total = _mm256_add_epi32(_mm256_add_epi32(i[0], i[1]), _mm256_add_epi32(i[2], i[3]));
        let t = _mm_add_epi32(_mm256_extracti128_si256(total, 1), _mm256_castsi256_si128(total));
        let t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0b01_00_11_10));
        let sum = _mm_cvtsi128_si32(_mm_add_epi32(t, _mm_shuffle_epi32(t, 0b10_11_00_01)));
        let packed = _mm256_packs_epi16(_mm256_packs_epi32(i[0], i[1]), _mm256_packs_epi32(i[2], i[3]));
        _mm256_storeu_si256(q.as_mut_ptr().add(b * 32) as *mut __m256i, _mm256_permutevar8x32_epi32(packed, order));
        d[b] = scale;
        sums[b] = sum;
    }
}

/// [`quantize_blocks`] with AVX-512F: a block in two registers, sixteen
/// blocks' maxima and sums each from one transposing reduction (one block
/// at a time, the reductions' latency made it 2.9% of a batch-8 decoding
/// step; now 1.5%).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn quantize_blocks_avx512(x: &[f32], q: &mut [i8], d: &mut [f32], sums: &mut [i32]) {
    use std::arch::x86_64::*;
    let (sign, below_half) = (_mm512_set1_epi32(i32::MIN), _mm512_castps_si512(_mm512_set1_ps(0.49999997)));
    // round(y) = trunc(y ± (0.5 − ulp/2)): exact for every f32, ties away from zero.
    let round = |v: __m512, inv: __m512| {
        let y = _mm512_mul_ps(v, inv);
        let half = _mm512_or_si512(_mm512_and_si512(_mm512_castps_si512(y), sign), below_half);
        _mm512_cvttps_epi32(_mm512_add_ps(y, _mm512_castsi512_ps(half)))
    };
    let blocks = x.len() / 32;
    // Sixteen blocks at a time: their maxima and sums come out of one
    // transposing reduction each, with the scales divided as one vector.
    for g in 0..blocks / 16 {
        let (x, q) = (x.as_ptr().add(g * 512), q.as_mut_ptr().add(g * 512) as *mut __m128i);
        let amax: [__m512; 16] = std::array::from_fn(|b| {
            _mm512_max_ps(
                _mm512_abs_ps(_mm512_loadu_ps(x.add(32 * b))),
                _mm512_abs_ps(_mm512_loadu_ps(x.add(32 * b + 16))),
            )
        });
        let scale = _mm512_div_ps(avx512::lane_reduce(amax, |a, b| _mm512_max_ps(a, b)), _mm512_set1_ps(127.0));
        let inv = _mm512_maskz_div_ps(
            _mm512_cmp_ps_mask::<_CMP_GT_OQ>(scale, _mm512_setzero_ps()),
            _mm512_set1_ps(1.0),
            scale,
        );
        _mm512_storeu_ps(d.as_mut_ptr().add(g * 16), scale);
        let mut invs = [0f32; 16];
        _mm512_storeu_ps(invs.as_mut_ptr(), inv);
        let block_sums: [__m512; 16] = std::array::from_fn(|b| {
            let inv = _mm512_set1_ps(invs[b]);
            let (lo, hi) =
                (round(_mm512_loadu_ps(x.add(32 * b)), inv), round(_mm512_loadu_ps(x.add(32 * b + 16)), inv));
            _mm_storeu_si128(q.add(2 * b), _mm512_cvtepi32_epi8(lo));
            _mm_storeu_si128(q.add(2 * b + 1), _mm512_cvtepi32_epi8(hi));
            _mm512_castsi512_ps(_mm512_add_epi32(lo, hi))
        });
        let add = |a: __m512, b: __m512| {
            _mm512_castsi512_ps(_mm512_add_epi32(_mm512_castps_si512(a), _mm512_castps_si512(b)))
        };
        _mm512_storeu_si512(
            sums.as_mut_ptr().add(g * 16) as *mut _,
            _mm512_castps_si512(avx512::lane_reduce(block_sums, add)),
        );
    }
    for b in blocks / 16 * 16..blocks {
        let p = x.as_ptr().add(b * 32);
        let v = [_mm512_loadu_ps(p), _mm512_loadu_ps(p.add(16))];
        let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v[0]), _mm512_abs_ps(v[1])));
        let scale = amax / 127.0;
        let inv = _mm512_set1_ps(if scale > 0.0 { 1.0 / scale } else { 0.0 });
        let (lo, hi) = (round(v[0], inv), round(v[1], inv));
        let out = q.as_mut_ptr().add(32 * b) as *mut __m128i;
        _mm_storeu_si128(out, _mm512_cvtepi32_epi8(lo));
        _mm_storeu_si128(out.add(1), _mm512_cvtepi32_epi8(hi));
        d[b] = scale;
        sums[b] = _mm512_reduce_add_epi32(_mm512_add_epi32(lo, hi));
    }
}

/// A GGUF-quantised weight `(n, k)` in one of the block formats these
/// kernels multiply, repacked on load: the f16 scales (and Q4_1's minima)
/// apart from the quantised values, so that a kernel reads each as a
/// contiguous stream. Same bytes as the GGUF blocks.
#[derive(Debug, Clone)]
pub struct QuantWeight {
    format: BlockFormat,
    packed: std::sync::Arc<Packed>,
    n: usize,
    k: usize,
}

/// The layout of a weight's blocks, chosen for the kernel that will run.
#[derive(Debug)]
enum Packed {
    /// For the portable, AVX2 and natural-order VNNI kernels.
    Natural(Blocks),
    /// For the VNNI kernel with one lane per weight row ([`interleaved`]).
    Interleaved(interleaved::Interleaved),
}

#[derive(Debug)]
struct Blocks {
    /// `(n, k / 32)`: f16 bits of each block's scale `d`.
    scales: Vec<u16>,
    /// `(n, k / 32)`: f16 bits of each Q4_1 block's minimum `m`; empty for Q8_0.
    mins: Vec<u16>,
    /// `(n, k / 32 · quant_bytes)`: Q4_1, 16 bytes of nibbles per block (low
    /// nibble of byte `j` = value `j`, high = value `j + 16`); Q8_0, 32 signed bytes.
    quants: Vec<u8>,
}

/// The block formats with kernels here. (Q5_0 becomes Q8_0 on load:
/// [`q5_0_to_q8_0`].)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockFormat {
    /// 32 weights: f16 scale `d`, f16 minimum `m`, 16 bytes of nibbles; `w = d q + m`.
    Q4_1,
    /// 32 weights: f16 scale `d`, 32 signed bytes; `w = d q`.
    Q8_0,
    /// 256 weights in eight 32-groups with 6-bit scales and minima under f16
    /// super-scales (see [`kquants`]); the VNNI kernel only.
    Q4K,
    /// 256 weights of 6 bits in sixteen 16-groups with i8 scales under an
    /// f16 super-scale (see [`kquants`]); the VNNI kernel only.
    Q6K,
}

impl BlockFormat {
    /// Weights per GGUF block.
    fn block_values(self) -> usize {
        match self {
            BlockFormat::Q4_1 | BlockFormat::Q8_0 => 32,
            BlockFormat::Q4K | BlockFormat::Q6K => kquants::SUPER,
        }
    }

    /// Bytes of one GGUF block.
    fn block_bytes(self) -> usize {
        match self {
            BlockFormat::Q4_1 => 20,
            BlockFormat::Q8_0 => 34,
            BlockFormat::Q4K => kquants::Q4_K_BYTES,
            BlockFormat::Q6K => kquants::Q6_K_BYTES,
        }
    }

    /// Bytes of a 32-block's quantised values, as the kernels hold them.
    fn quant_bytes(self) -> usize {
        match self {
            BlockFormat::Q4_1 | BlockFormat::Q4K => 16,
            BlockFormat::Q8_0 | BlockFormat::Q6K => 32,
        }
    }
}

/// The instruction set the quantised kernels run with, found at run time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Isa {
    Portable,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Vnni,
}

impl Isa {
    /// The instruction set of the quantised kernels: the best this CPU has,
    /// or a lower one named by `TABLETRACE_QUANT_KERNELS` (`avx2`, `portable`),
    /// to measure on one machine what a CPU without AVX-512 VNNI gets.
    fn detect() -> Isa {
        static ISA: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
        *ISA.get_or_init(|| {
            let best = Isa::best();
            match std::env::var("TABLETRACE_QUANT_KERNELS").as_deref() {
                Ok("portable") => Isa::Portable,
                #[cfg(target_arch = "x86_64")]
                Ok("avx2") if best != Isa::Portable => Isa::Avx2,
                _ => best,
            }
        })
    }

    /// The best instruction set this CPU has for the quantised kernels.
    fn best() -> Isa {
        #[cfg(target_arch = "x86_64")]
        if has_avx2_fma() {
            if std::is_x86_feature_detected!("avx512f")
                && std::is_x86_feature_detected!("avx512bw")
                && std::is_x86_feature_detected!("avx512dq")
                && std::is_x86_feature_detected!("avx512vl")
                && std::is_x86_feature_detected!("avx512vnni")
            {
                return Isa::Vnni;
            }
            return Isa::Avx2;
        }
        Isa::Portable
    }

    /// Every instruction set this CPU can run, for tests.
    #[cfg(test)]
    fn available() -> Vec<Isa> {
        let mut all = vec![Isa::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            if has_avx2_fma() {
                all.push(Isa::Avx2);
            }
            if Isa::detect() == Isa::Vnni {
                all.push(Isa::Vnni);
            }
        }
        all
    }
}

impl QuantWeight {
    /// Repacks raw GGUF blocks of an `(n, k)` weight. `None` when the sizes
    /// do not fit the format.
    pub fn new(format: BlockFormat, data: Vec<u8>, n: usize, k: usize) -> Option<QuantWeight> {
        QuantWeight::with_isa(Isa::detect(), format, data, n, k)
    }

    /// [`QuantWeight::new`] laid out for the kernels of `isa`: interleaved
    /// for VNNI where the rows come in whole chunks of sixteen, natural otherwise.
    /// K-quants have the interleaved layout only: `None` for them without
    /// VNNI or where `n % 16 != 0`.
    fn with_isa(isa: Isa, format: BlockFormat, data: Vec<u8>, n: usize, k: usize) -> Option<QuantWeight> {
        let (bb, per_block) = (format.block_bytes(), format.block_values());
        if !k.is_multiple_of(per_block) || data.len() != n * (k / per_block) * bb {
            return None;
        }
        if matches!(format, BlockFormat::Q4K | BlockFormat::Q6K) {
            #[cfg(target_arch = "x86_64")]
            if isa == Isa::Vnni {
                let groups = if format == BlockFormat::Q4K {
                    kquants::q4_k_groups(&data)?
                } else {
                    kquants::q6_k_groups(&data)?
                };
                let w = interleaved::Interleaved::from_groups(format, &groups, n, k)?;
                return Some(QuantWeight { format, packed: std::sync::Arc::new(Packed::Interleaved(w)), n, k });
            }
            return None;
        }
        let count = n * (k / 32);
        let mut blocks = Blocks {
            scales: Vec::with_capacity(count),
            mins: Vec::with_capacity(if format == BlockFormat::Q4_1 { count } else { 0 }),
            quants: Vec::with_capacity(count * format.quant_bytes()),
        };
        for blk in data.chunks_exact(bb) {
            blocks.scales.push(u16::from_le_bytes([blk[0], blk[1]]));
            match format {
                BlockFormat::Q4_1 => {
                    blocks.mins.push(u16::from_le_bytes([blk[2], blk[3]]));
                    blocks.quants.extend_from_slice(&blk[4..]);
                }
                BlockFormat::Q8_0 => blocks.quants.extend_from_slice(&blk[2..]),
                BlockFormat::Q4K | BlockFormat::Q6K => unreachable!("K-quants returned above"),
            }
        }
        #[cfg(target_arch = "x86_64")]
        if isa == Isa::Vnni {
            if let Some(w) = interleaved::Interleaved::new(format, &blocks, n, k) {
                return Some(QuantWeight { format, packed: std::sync::Arc::new(Packed::Interleaved(w)), n, k });
            }
        }
        let _ = isa;
        Some(QuantWeight { format, packed: std::sync::Arc::new(Packed::Natural(blocks)), n, k })
    }

    /// Output features.
    pub fn n(&self) -> usize {
        self.n
    }

    /// Input features.
    pub fn k(&self) -> usize {
        self.k
    }

    /// Stacks weights with the same format and input size along the output
    /// dimension (to run several projections as one product).
    pub fn concat(parts: &[&QuantWeight]) -> Option<QuantWeight> {
        let first = parts.first()?;
        if parts.iter().any(|p| p.format != first.format || p.k != first.k) {
            return None;
        }
        let natural: Option<Vec<&Blocks>> = parts
            .iter()
            .map(|p| match &*p.packed {
                Packed::Natural(b) => Some(b),
                Packed::Interleaved(_) => None,
            })
            .collect();
        let interleaved: Option<Vec<&interleaved::Interleaved>> = parts
            .iter()
            .map(|p| match &*p.packed {
                Packed::Interleaved(w) => Some(w),
                Packed::Natural(_) => None,
            })
            .collect();
        let packed = match (natural, interleaved) {
            (Some(blocks), _) => Packed::Natural(Blocks {
                scales: blocks.iter().flat_map(|b| b.scales.iter().copied()).collect(),
                mins: blocks.iter().flat_map(|b| b.mins.iter().copied()).collect(),
                quants: blocks.iter().flat_map(|b| b.quants.iter().copied()).collect(),
            }),
            (None, Some(ws)) => Packed::Interleaved(interleaved::Interleaved::concat(&ws)?),
            (None, None) => return None,
        };
        Some(QuantWeight {
            format: first.format,
            packed: std::sync::Arc::new(packed),
            n: parts.iter().map(|p| p.n).sum(),
            k: first.k,
        })
    }

    /// `x (m, k) @ w^T`, with `x` quantised to 8 bits per block.
    pub fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        self.matmul_with(Isa::detect(), x, m)
    }

    fn matmul_with(&self, isa: Isa, x: &[f32], m: usize) -> Vec<f32> {
        let format = self.format;
        let w = match &*self.packed {
            Packed::Natural(w) => w,
            #[cfg(target_arch = "x86_64")]
            Packed::Interleaved(w) => {
                assert_eq!(isa, Isa::Vnni, "an interleaved weight runs on the VNNI kernel");
                let xq = interleaved::Q8Natural::quantize(x, m, self.k, format);
                // SAFETY: interleaved weights exist only where `detect` found VNNI (and AVX2, FMA, F16C,
                // AVX-512 F, BW, DQ, VL); `n % 16 == 0`, and `by_weight_columns` splits at multiples of 16;
                // the kernel stores every activation row of each chunk of its columns.
                return unsafe {
                    by_weight_columns(m, self.n, |j0, rows, out| interleaved::vnni::rows(w, j0, rows, out, &xq))
                };
            }
            #[cfg(not(target_arch = "x86_64"))]
            Packed::Interleaved(_) => unreachable!("interleaved weights are built for VNNI only"),
        };
        let xq = quantize_rows(x, m, self.k, format);
        by_weight_chunks(m, self.n, |j0, out| match isa {
            Isa::Portable => portable::rows(format, w, j0, out, &xq, m),
            // SAFETY: `detect` found AVX2, FMA and F16C; `Blocks` and `Q8Rows` hold whole rows of whole blocks.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { quant_avx2::rows(format, w, j0, out, &xq, m) },
            // SAFETY: as above, and AVX-512 F, BW, DQ, VL and VNNI.
            #[cfg(target_arch = "x86_64")]
            Isa::Vnni => unsafe { quant_vnni::rows(format, w, j0, out, &xq, m) },
        })
    }
}

/// The portable kernels: the sums the SIMD kernels compute, loop by loop.
mod portable {
    use super::{q4_1_halves, BlockFormat, Blocks, Q8Rows};

    fn f16(bits: u16) -> f32 {
        half::f16::from_bits(bits).to_f32()
    }

    /// Weight rows `j0..` (as many as `out` holds, `m` results each) times every activation row.
    pub(super) fn rows(format: BlockFormat, w: &Blocks, j0: usize, out: &mut [f32], x: &Q8Rows, m: usize) {
        let (k, blocks) = (x.k, x.blocks);
        let qb = format.quant_bytes();
        for (r, out) in out.chunks_mut(m).enumerate() {
            let j = j0 + r;
            let qw = &w.quants[j * blocks * qb..(j + 1) * blocks * qb];
            for (i, o) in out.iter_mut().enumerate() {
                let qx = &x.q[i * k..(i + 1) * k];
                let mut sum = 0f32;
                for b in 0..blocks {
                    let acc: i32 = match format {
                        BlockFormat::Q4_1 => {
                            let (lo, hi) = q4_1_halves(b, blocks);
                            (0..16)
                                .map(|t| {
                                    let byte = qw[b * 16 + t];
                                    (byte & 0x0F) as i32 * qx[lo + t] as i32 + (byte >> 4) as i32 * qx[hi + t] as i32
                                })
                                .sum()
                        }
                        BlockFormat::Q8_0 => (0..32).map(|t| qw[b * 32 + t] as i8 as i32 * qx[b * 32 + t] as i32).sum(),
                        BlockFormat::Q4K | BlockFormat::Q6K => unreachable!("K-quants are interleaved only"),
                    };
                    sum += f16(w.scales[j * blocks + b]) * x.d[i * blocks + b] * acc as f32;
                    if format == BlockFormat::Q4_1 {
                        sum += f16(w.mins[j * blocks + b]) * x.s[i * blocks + b];
                    }
                }
                *o = sum;
            }
        }
    }
}

/// The x86 kernels for Q4_1 and Q8_0, written once and instantiated per
/// instruction set by the 8-bit dot product they use: `$dot(acc, u, s)`
/// adds to each i32 lane of `acc` the four products of unsigned bytes of `u`
/// with signed bytes of `s` in that lane.
#[cfg(target_arch = "x86_64")]
macro_rules! quant_kernels {
    ($name:ident, $features:literal, $dot:item, $q4_1_quads:item, $q8_0_pairs:item) => {
        mod $name {
            use super::avx::hsums;
            use super::{q4_1_halves, BlockFormat, Blocks, Q8Rows};
            use std::arch::x86_64::*;

            $dot

            $q4_1_quads

            $q8_0_pairs

            /// Weight rows `j0..` (as many as `out` holds, `m` results each)
            /// times every activation row: eight, four, then one activation
            /// rows per pass over a weight row, so that each weight block is
            /// loaded and unpacked once for up to eight rows.
            #[target_feature(enable = $features)]
            pub(super) unsafe fn rows(
                format: BlockFormat,
                w: &Blocks,
                j0: usize,
                out: &mut [f32],
                x: &Q8Rows,
                m: usize,
            ) {
                let mut done = 0; // activation rows done for every weight row
                if format == BlockFormat::Q4_1 {
                    let rows = out.len() / m;
                    while done + 8 <= m {
                        for r in (0..rows).step_by(2) {
                            let at = r * m + done;
                            if r + 1 < rows {
                                let [a, b] = q4_1::<2, 8>(w, j0 + r, x, done);
                                out[at..at + 8].copy_from_slice(&a);
                                out[at + m..at + m + 8].copy_from_slice(&b);
                            } else {
                                let [a] = q4_1::<1, 8>(w, j0 + r, x, done);
                                out[at..at + 8].copy_from_slice(&a);
                            }
                        }
                        done += 8;
                    }
                }
                for (r, out) in out.chunks_mut(m).enumerate() {
                    let j = j0 + r;
                    let mut i = done;
                    while i + 8 <= m {
                        out[i..i + 8].copy_from_slice(&row::<8>(format, w, j, x, i));
                        i += 8;
                    }
                    while i + 4 <= m {
                        out[i..i + 4].copy_from_slice(&row::<4>(format, w, j, x, i));
                        i += 4;
                    }
                    while i < m {
                        out[i] = row::<1>(format, w, j, x, i)[0];
                        i += 1;
                    }
                }
            }

            #[target_feature(enable = $features)]
            #[inline]
            unsafe fn row<const R: usize>(format: BlockFormat, w: &Blocks, j: usize, x: &Q8Rows, first: usize) -> [f32; R] {
                match format {
                    BlockFormat::Q4_1 => q4_1::<1, R>(w, j, x, first)[0],
                    BlockFormat::Q8_0 => q8_0::<R>(w, j, x, first),
                    BlockFormat::Q4K | BlockFormat::Q6K => unreachable!("K-quants are interleaved only"),
                }
            }

            #[target_feature(enable = $features)]
            #[inline]
            unsafe fn f16(bits: u16) -> f32 {
                _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
            }

            /// Q4_1 weight rows `j..j + W` against activation rows `first..first + R`,
            /// two blocks per step: 32 bytes of nibbles give the low values of
            /// both blocks and the high values of both, dotted with the
            /// activations in the same order; lanes 0..4 of the i32 sums
            /// belong to the first block and 4..8 to the second, scaled by
            /// `[d₀ d₀ d₀ d₀ d₁ d₁ d₁ d₁]`. Where 512-bit steps exist, each activation
            /// load serves all `W` weight rows.
            #[target_feature(enable = $features)]
            #[inline]
            unsafe fn q4_1<const W: usize, const R: usize>(w: &Blocks, j: usize, x: &Q8Rows, first: usize) -> [[f32; R]; W] {
                let mut acc = [[_mm256_setzero_ps(); R]; W];
                let b = q4_1_quads::<W, R>(w, j, x, first, &mut acc);
                let mut out = [[0f32; R]; W];
                for (v, (out, acc)) in out.iter_mut().zip(acc).enumerate() {
                    *out = q4_1_from::<R>(w, j + v, x, first, b, acc);
                }
                out
            }

            /// Blocks `b..` of weight row `j` in [`q4_1`], added to the lane sums `acc` of the blocks before.
            #[target_feature(enable = $features)]
            #[inline]
            unsafe fn q4_1_from<const R: usize>(
                w: &Blocks,
                j: usize,
                x: &Q8Rows,
                first: usize,
                mut b: usize,
                mut acc: [__m256; R],
            ) -> [f32; R] {
                let (k, blocks) = (x.k, x.blocks);
                let sc = w.scales.as_ptr().add(j * blocks);
                let mn = w.mins.as_ptr().add(j * blocks);
                let qw = w.quants.as_ptr().add(j * blocks * 16);
                let nibble = _mm256_set1_epi8(0x0F);
                let spread = _mm_setr_epi8(0, 1, 0, 1, 0, 1, 0, 1, 2, 3, 2, 3, 2, 3, 2, 3);
                while b + 2 <= blocks {
                    let packed = _mm256_loadu_si256(qw.add(b * 16) as *const __m256i);
                    let lo = _mm256_and_si256(packed, nibble);
                    let hi = _mm256_and_si256(_mm256_srli_epi16(packed, 4), nibble);
                    let pair = _mm_cvtsi32_si128((sc.add(b) as *const i32).read_unaligned());
                    let dw = _mm256_cvtph_ps(_mm_shuffle_epi8(pair, spread));
                    let pair = _mm_cvtsi32_si128((mn.add(b) as *const i32).read_unaligned());
                    let mw = _mm256_cvtph_ps(_mm_shuffle_epi8(pair, spread));
                    for (r, acc) in acc.iter_mut().enumerate() {
                        let row = first + r;
                        let (lo_at, hi_at) = q4_1_halves(b, blocks);
                        let y = x.q.as_ptr().add(row * k);
                        let ylo = _mm256_loadu_si256(y.add(lo_at) as *const __m256i);
                        let yhi = _mm256_loadu_si256(y.add(hi_at) as *const __m256i);
                        let dot = dot(dot(_mm256_setzero_si256(), lo, ylo), hi, yhi);
                        let at = row * blocks * 4 + b * 4;
                        let scale = _mm256_mul_ps(dw, _mm256_loadu_ps(x.d4.as_ptr().add(at)));
                        *acc = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(dot), *acc);
                        *acc = _mm256_fmadd_ps(mw, _mm256_loadu_ps(x.s4.as_ptr().add(at)), *acc);
                    }
                    b += 2;
                }
                let mut out = hsums(acc);
                if b < blocks {
                    // A last, unpaired block, stored in natural order.
                    for (r, o) in out.iter_mut().enumerate() {
                        let row = first + r;
                        let y = x.q.as_ptr().add(row * k + b * 32);
                        let mut dot = 0i32;
                        for t in 0..16 {
                            let byte = *qw.add(b * 16 + t);
                            dot += (byte & 0x0F) as i32 * *y.add(t) as i32 + (byte >> 4) as i32 * *y.add(16 + t) as i32;
                        }
                        let i = row * blocks + b;
                        *o += f16(*sc.add(b)) * x.d[i] * dot as f32 + f16(*mn.add(b)) * x.s[i];
                    }
                }
                out
            }

            /// Q8_0 weight row `j` against activation rows `first..first + R`,
            /// a block per step (the dot takes an unsigned operand: `|w|`
            /// times `y` with `w`'s sign).
            #[target_feature(enable = $features)]
            #[inline]
            unsafe fn q8_0<const R: usize>(w: &Blocks, j: usize, x: &Q8Rows, first: usize) -> [f32; R] {
                let (k, blocks) = (x.k, x.blocks);
                let sc = w.scales.as_ptr().add(j * blocks);
                let qw = w.quants.as_ptr().add(j * blocks * 32);
                let mut acc = [_mm256_setzero_ps(); R];
                for b in q8_0_pairs::<R>(w, j, x, first, &mut acc)..blocks {
                    let wv = _mm256_loadu_si256(qw.add(b * 32) as *const __m256i);
                    let aw = _mm256_sign_epi8(wv, wv);
                    let dw = f16(*sc.add(b));
                    for (r, acc) in acc.iter_mut().enumerate() {
                        let row = first + r;
                        let y = _mm256_loadu_si256(x.q.as_ptr().add(row * k + b * 32) as *const __m256i);
                        let dot = dot(_mm256_setzero_si256(), aw, _mm256_sign_epi8(y, wv));
                        let scale = _mm256_set1_ps(dw * *x.d.as_ptr().add(row * blocks + b));
                        *acc = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(dot), *acc);
                    }
                }
                hsums(acc)
            }
        }
    };
}

#[cfg(target_arch = "x86_64")]
quant_kernels!(
    quant_avx2,
    "avx2,fma,f16c",
    /// `maddubs` to i16 pairs (no overflow: |u| ≤ 128, |s| ≤ 127), then `madd` to i32.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn dot(acc: __m256i, u: __m256i, s: __m256i) -> __m256i {
        _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)))
    },
    /// No 512-bit steps: every block goes through the 256-bit loop.
    #[inline(always)]
    fn q4_1_quads<const W: usize, const R: usize>(
        _: &Blocks,
        _: usize,
        _: &Q8Rows,
        _: usize,
        _: &mut [[__m256; R]; W],
    ) -> usize {
        0
    },
    /// As above.
    #[inline(always)]
    fn q8_0_pairs<const R: usize>(_: &Blocks, _: usize, _: &Q8Rows, _: usize, _: &mut [__m256; R]) -> usize {
        0
    }
);

#[cfg(target_arch = "x86_64")]
quant_kernels!(
    quant_vnni,
    "avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vl,avx512vnni",
    /// One `vpdpbusd`.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")]
    #[inline]
    unsafe fn dot(acc: __m256i, u: __m256i, s: __m256i) -> __m256i {
        _mm256_dpbusd_epi32(acc, u, s)
    },
    /// Q4_1 blocks four at a time in 512-bit registers (64 bytes of nibbles;
    /// the activations' groups of four, see `Q8Rows::q`): lanes 4i..4i+4 of
    /// the sums belong to block i. Weight rows `j..j + W` at once: the
    /// activations and their scales are loaded once for all (`W = 2` at
    /// batch 8: a decoding run of SmolLM2-135M Q4_1 at one thread took 12%
    /// fewer cycles). Returns the blocks done; the sums are folded into `acc`.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")]
    #[inline]
    #[allow(clippy::needless_range_loop)] // `r` indexes the `W` accumulator arrays and the activations
    unsafe fn q4_1_quads<const W: usize, const R: usize>(
        w: &Blocks,
        j: usize,
        x: &Q8Rows,
        first: usize,
        acc: &mut [[__m256; R]; W],
    ) -> usize {
        let (k, blocks) = (x.k, x.blocks);
        let quads = blocks / 4 * 4;
        let (sc, mn) = (w.scales.as_ptr().add(j * blocks), w.mins.as_ptr().add(j * blocks));
        let qw = w.quants.as_ptr().add(j * blocks * 16);
        let nibble = _mm512_set1_epi8(0x0F);
        let spread = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
        let four = |p: *const u16| {
            _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(_mm_cvtph_ps(_mm_loadl_epi64(p as *const __m128i))))
        };
        let mut wide = [[_mm512_setzero_ps(); R]; W];
        let mut b = 0;
        while b < quads {
            let (mut lo, mut hi) = ([_mm512_setzero_si512(); W], [_mm512_setzero_si512(); W]);
            let (mut dw, mut mw) = ([_mm512_setzero_ps(); W], [_mm512_setzero_ps(); W]);
            for v in 0..W {
                let packed = _mm512_loadu_si512(qw.add(v * blocks * 16 + b * 16) as *const _);
                lo[v] = _mm512_and_si512(packed, nibble);
                hi[v] = _mm512_and_si512(_mm512_srli_epi16(packed, 4), nibble);
                dw[v] = four(sc.add(v * blocks + b));
                mw[v] = four(mn.add(v * blocks + b));
            }
            for r in 0..R {
                let row = first + r;
                let y = x.q.as_ptr().add(row * k + b * 32);
                let ylo = _mm512_loadu_si512(y as *const _);
                let yhi = _mm512_loadu_si512(y.add(64) as *const _);
                let at = row * blocks * 4 + b * 4;
                let (d4, s4) = (_mm512_loadu_ps(x.d4.as_ptr().add(at)), _mm512_loadu_ps(x.s4.as_ptr().add(at)));
                for v in 0..W {
                    let dot = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo[v], ylo), hi[v], yhi);
                    wide[v][r] = _mm512_fmadd_ps(_mm512_mul_ps(dw[v], d4), _mm512_cvtepi32_ps(dot), wide[v][r]);
                    wide[v][r] = _mm512_fmadd_ps(mw[v], s4, wide[v][r]);
                }
            }
            b += 4;
        }
        for (acc, wide) in acc.iter_mut().zip(wide) {
            super::avx::add_halves(acc, wide);
        }
        quads
    },
    /// Q8_0 blocks two at a time in 512-bit registers: `|w|` times `y` with
    /// `w`'s sign (negated under a mask, 512-bit has no `vpsignb`); lanes
    /// 0..8 of the sums belong to the first block, 8..16 to the second.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")]
    #[inline]
    unsafe fn q8_0_pairs<const R: usize>(
        w: &Blocks,
        j: usize,
        x: &Q8Rows,
        first: usize,
        acc: &mut [__m256; R],
    ) -> usize {
        let (k, blocks) = (x.k, x.blocks);
        let pairs = blocks / 2 * 2;
        let sc = w.scales.as_ptr().add(j * blocks);
        let qw = w.quants.as_ptr().add(j * blocks * 32);
        let spread = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
        let mut wide = [_mm512_setzero_ps(); R];
        let mut b = 0;
        while b < pairs {
            let wv = _mm512_loadu_si512(qw.add(b * 32) as *const _);
            let negative = _mm512_movepi8_mask(wv);
            let aw = _mm512_abs_epi8(wv);
            let two = _mm_cvtph_ps(_mm_cvtsi32_si128((sc.add(b) as *const i32).read_unaligned()));
            let dw = _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(two));
            for (r, wide) in wide.iter_mut().enumerate() {
                let row = first + r;
                let y = _mm512_loadu_si512(x.q.as_ptr().add(row * k + b * 32) as *const _);
                let sy = _mm512_mask_sub_epi8(y, negative, _mm512_setzero_si512(), y);
                let dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), aw, sy);
                let dy = _mm_castpd_ps(_mm_load_sd(x.d.as_ptr().add(row * blocks + b) as *const f64));
                let scale = _mm512_mul_ps(dw, _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(dy)));
                *wide = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(dot), *wide);
            }
            b += 2;
        }
        super::avx::add_halves(acc, wide);
        pairs
    }
);

#[cfg(target_arch = "x86_64")]
mod avx {
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn hsum(x: __m256) -> f32 {
        let hi = _mm256_extractf128_ps(x, 1);
        let s = _mm_add_ps(hi, _mm256_castps256_ps128(x));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    /// Dot product of two f32 slices whose length is a multiple of 8.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len();
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        while i + 32 <= n {
            for (u, acc) in acc.iter_mut().enumerate() {
                *acc = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i + 8 * u)), _mm256_loadu_ps(pb.add(i + 8 * u)), *acc);
            }
            i += 32;
        }
        while i + 8 <= n {
            acc[0] = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), acc[0]);
            i += 8;
        }
        hsum(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])))
    }

    /// `out += Σ_j p_j · row(j)` for rows of a multiple of 64 values: 64
    /// lanes of `out` stay in registers while the rows stream by.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn weighted_rows_64(p: &[f32], v: &super::HeadRows<'_>, head: super::Head, out: &mut [f32]) {
        for c in (0..out.len()).step_by(64) {
            let po = out.as_mut_ptr().add(c);
            let mut acc = [_mm256_setzero_ps(); 8];
            for (u, a) in acc.iter_mut().enumerate() {
                *a = _mm256_loadu_ps(po.add(8 * u));
            }
            for (j, &pj) in p.iter().enumerate() {
                if pj != 0.0 {
                    let (w, pr) = (_mm256_set1_ps(pj), v.row(head.b, head.h, j, head.d).as_ptr().add(c));
                    for (u, a) in acc.iter_mut().enumerate() {
                        *a = _mm256_fmadd_ps(w, _mm256_loadu_ps(pr.add(8 * u)), *a);
                    }
                }
            }
            for (u, a) in acc.iter().enumerate() {
                _mm256_storeu_ps(po.add(8 * u), *a);
            }
        }
    }

    /// How far ahead of its dot products [`dot_f32_rows`] asks for weight
    /// values (8 KB): with `R` activation rows of 1,536 values (48 KB, all
    /// of L1) the hardware prefetcher alone streamed the weights at 11 GB/s
    /// instead of 27 (`R = 8`: 44 → 71 GFLOP/s at one thread; no change at
    /// `k = 576`).
    const PREFETCH_F32: usize = 2048;

    /// Dot products of one f32 row with `R` consecutive rows of `x`
    /// (`R * k` values), `k` a multiple of 8: the weight vector is loaded
    /// once for `R` FMAs. The weight row is read as part of a stream over
    /// consecutive rows: values past its end are prefetched.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_f32_rows<const R: usize>(w: &[f32], x: &[f32], k: usize) -> [f32; R] {
        let (pw, px) = (w.as_ptr(), x.as_ptr());
        let mut acc = [_mm256_setzero_ps(); R];
        let mut c = 0;
        while c + 16 <= k {
            // A prefetch never faults: the address may lie past the weights.
            _mm_prefetch::<_MM_HINT_T0>(pw.wrapping_add(c + PREFETCH_F32) as *const i8);
            for h in [c, c + 8] {
                let wv = _mm256_loadu_ps(pw.add(h));
                for (r, acc) in acc.iter_mut().enumerate() {
                    *acc = _mm256_fmadd_ps(wv, _mm256_loadu_ps(px.add(r * k + h)), *acc);
                }
            }
            c += 16;
        }
        while c + 8 <= k {
            let wv = _mm256_loadu_ps(pw.add(c));
            for (r, acc) in acc.iter_mut().enumerate() {
                *acc = _mm256_fmadd_ps(wv, _mm256_loadu_ps(px.add(r * k + c)), *acc);
            }
            c += 8;
        }
        hsums(acc)
    }

    /// Activation values per block of [`f32_tiles_2x8`]: eight rows of up to
    /// 1,024 values (32 KB) stay in L1 while the weight rows stream by.
    const F32_BLOCK: usize = 1024;

    /// `out[j · stride + a] += w_j · x_a` for every weight row `j` of `w`
    /// (`rows × k`) and the eight activation rows `a` of `x` (`8 × k`), `k`
    /// a multiple of 8; `out` starts at zero. Two weight rows at a time (16
    /// accumulators: AVX-512VL's 32 registers), so that each activation
    /// load feeds two FMAs; `k` in equal blocks of at most [`F32_BLOCK`]
    /// values, and the next pair's weights prefetched. Measured at one
    /// thread for 8 rows, from DRAM, against [`dot_f32_rows`]: k = 576:
    /// 109 → 127 GFLOP/s, 1536: 70 → 108, 4864: 76 → 87.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl")]
    pub unsafe fn f32_tiles_2x8(w: &[f32], x: &[f32], k: usize, out: &mut [f32], stride: usize) {
        let rows = w.len() / k;
        let blocks = k.div_ceil(F32_BLOCK);
        let kb = k.div_ceil(blocks).next_multiple_of(16);
        let ahead = (2 * k).max(PREFETCH_F32);
        let px = x.as_ptr();
        for c0 in (0..k).step_by(kb) {
            let c1 = (c0 + kb).min(k);
            for j in (0..rows).step_by(2) {
                let pw0 = w.as_ptr().add(j * k);
                // An odd last row is computed twice and stored once.
                let pw1 = if j + 1 < rows { pw0.add(k) } else { pw0 };
                let mut a0 = [_mm256_setzero_ps(); 8];
                let mut a1 = [_mm256_setzero_ps(); 8];
                let mut step = |c: usize| {
                    let (w0, w1) = (_mm256_loadu_ps(pw0.add(c)), _mm256_loadu_ps(pw1.add(c)));
                    for a in 0..8 {
                        let xv = _mm256_loadu_ps(px.add(a * k + c));
                        a0[a] = _mm256_fmadd_ps(w0, xv, a0[a]);
                        a1[a] = _mm256_fmadd_ps(w1, xv, a1[a]);
                    }
                };
                let mut c = c0;
                while c + 16 <= c1 {
                    // A prefetch never faults: the address may lie past the weights.
                    _mm_prefetch::<_MM_HINT_T0>(pw0.wrapping_add(c + ahead) as *const i8);
                    _mm_prefetch::<_MM_HINT_T0>(pw1.wrapping_add(c + ahead) as *const i8);
                    step(c);
                    step(c + 8);
                    c += 16;
                }
                if c < c1 {
                    step(c); // k % 16 == 8: the last block ends with 8 values
                }
                for (row, acc) in [(j, a0), (j + 1, a1)] {
                    if row < rows {
                        let o = &mut out[row * stride..row * stride + 8];
                        for (o, v) in o.iter_mut().zip(hsums(acc)) {
                            *o += v;
                        }
                    }
                }
            }
        }
    }

    /// Adds both 256-bit halves of each of `wide` to `acc`.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512dq")]
    #[inline]
    pub unsafe fn add_halves<const R: usize>(acc: &mut [__m256; R], wide: [__m512; R]) {
        for (a, v) in acc.iter_mut().zip(wide) {
            let halves = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps::<1>(v));
            *a = _mm256_add_ps(*a, halves);
        }
    }

    /// The lane sums of `R` vectors; for eight, one transposing reduction
    /// instead of eight.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    pub unsafe fn hsums<const R: usize>(v: [__m256; R]) -> [f32; R] {
        let mut out = [0f32; R];
        if R == 8 {
            let h = |a: __m256, b: __m256| _mm256_hadd_ps(a, b);
            // Per 128-bit lane: [s0 s1 s2 s3] partial sums, likewise s4..s8.
            let (a, b) = (h(h(v[0], v[1]), h(v[2], v[3])), h(h(v[4], v[5]), h(v[6], v[7])));
            let (lo, hi) = (_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
            _mm256_storeu_ps(out.as_mut_ptr(), _mm256_add_ps(lo, hi));
        } else {
            for (o, v) in out.iter_mut().zip(v) {
                *o = hsum(v);
            }
        }
        out
    }
}

/// Softmax rows with AVX-512F.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    /// `e^x` lane-wise (Cephes' `expf` scheme: `x = n ln 2 + r`, `|r| ≤ ln 2 / 2`,
    /// `e^r = 1 + r + r² P(r)`, `2^n` by `scalef`): relative error about
    /// 1e-7. Inputs below −104 (and −∞) give 0; inputs above 88 give e⁸⁸.
    #[target_feature(enable = "avx512f")]
    #[inline]
    pub unsafe fn exp(x: __m512) -> __m512 {
        let x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-104.0)), _mm512_set1_ps(88.0));
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm512_mul_ps(
            x,
            _mm512_set1_ps(std::f32::consts::LOG2_E),
        ));
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_359_4), x);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.121_944_4e-4), r);
        let mut p = _mm512_set1_ps(1.987_569_1e-4);
        for c in [1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 0.5] {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
        }
        let e = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0)));
        _mm512_scalef_ps(e, n)
    }

    /// The largest head size [`attention_rows`] takes: a query row in eight registers.
    pub const MAX_HEAD: usize = 128;

    /// Few-query attention for one key/value head ([`super::few_query_attention`]):
    /// query rows `q` `(r, d)`, `keys` and `values` `(s, d)`, `mask(row)`
    /// the additive mask of a query row; `out` `(r, d)`. The scores of
    /// sixteen keys come out of one transposing reduction as one vector,
    /// the softmax is [`softmax_row`], and each value row, loaded once, is
    /// weighted into up to four query rows at a time (skipping the rows that
    /// softmax gave no weight). `d` a multiple of 16, at most [`MAX_HEAD`];
    /// `scratch` holds the scores between calls. Keys and values are f32 or
    /// f16 (converted as they are loaded). `next`, the key and value rows of
    /// the block computed after this one, are prefetched a row of each per
    /// value row weighted here: the jump to another head's rows is one the
    /// hardware prefetcher does not follow, and without this one core read
    /// the cache at ~20 GB/s (`examples/decode_attention.rs`: 30 layers at
    /// batch 8, context 270, f16, one thread: 2,380-2,450 → 1,780-1,810 µs
    /// per step).
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn attention_rows<'m, E: super::KvElement>(
        q: &[f32],
        keys: &[E],
        values: &[E],
        next: Option<(&[E], &[E])>,
        mask: impl Fn(usize) -> Option<&'m [f32]>,
        scale: f32,
        d: usize,
        out: &mut [f32],
        scratch: &mut Vec<f32>,
    ) {
        assert!(d.is_multiple_of(16) && d <= MAX_HEAD && values.len() == keys.len() && out.len() == q.len());
        // The head size as a constant, so that a row's vectors stay in registers.
        match d / 16 {
            1 => attention_rows_of::<E, 1, 4>(q, (keys, values), next, mask, scale, out, scratch),
            2 => attention_rows_of::<E, 2, 4>(q, (keys, values), next, mask, scale, out, scratch),
            3 => attention_rows_of::<E, 3, 4>(q, (keys, values), next, mask, scale, out, scratch),
            4 => attention_rows_of::<E, 4, 4>(q, (keys, values), next, mask, scale, out, scratch),
            5 => attention_rows_of::<E, 5, 2>(q, (keys, values), next, mask, scale, out, scratch),
            6 => attention_rows_of::<E, 6, 2>(q, (keys, values), next, mask, scale, out, scratch),
            7 => attention_rows_of::<E, 7, 2>(q, (keys, values), next, mask, scale, out, scratch),
            _ => attention_rows_of::<E, 8, 2>(q, (keys, values), next, mask, scale, out, scratch),
        }
    }

    /// [`attention_rows`] for heads of `16 C` values, `W` query rows per pass over the values.
    #[target_feature(enable = "avx512f")]
    unsafe fn attention_rows_of<'m, E: super::KvElement, const C: usize, const W: usize>(
        q: &[f32],
        (keys, values): (&[E], &[E]),
        next: Option<(&[E], &[E])>,
        mask: impl Fn(usize) -> Option<&'m [f32]>,
        scale: f32,
        out: &mut [f32],
        scratch: &mut Vec<f32>,
    ) {
        let d = 16 * C;
        let (s, rows) = (keys.len() / d, q.len() / d);
        scratch.resize(s + rows * s, 0.0);
        let (scores, p) = scratch.split_at_mut(s); // p: (rows, s)
        for (r, qr) in q.chunks_exact(d).enumerate() {
            let qv: [__m512; C] = std::array::from_fn(|c| _mm512_loadu_ps(qr.as_ptr().add(16 * c)));
            for j0 in (0..s).step_by(16) {
                let n = (s - j0).min(16);
                let acc: [__m512; 16] = std::array::from_fn(|jj| {
                    let mut acc = _mm512_setzero_ps();
                    if jj < n {
                        let key = keys.as_ptr().add((j0 + jj) * d);
                        for (c, qc) in qv.iter().enumerate() {
                            acc = _mm512_fmadd_ps(*qc, load16(key.add(16 * c)), acc);
                        }
                        if r == 0 {
                            // The value rows come next: on their way while the scores are made.
                            let value = values.as_ptr().add((j0 + jj) * d) as *const i8;
                            for line in (0..d * std::mem::size_of::<E>()).step_by(64) {
                                _mm_prefetch::<_MM_HINT_T0>(value.add(line));
                            }
                        }
                    }
                    acc
                });
                _mm512_mask_storeu_ps(scores.as_mut_ptr().add(j0), lanes(n), lane_sums(acc));
            }
            softmax_row(scores, mask(r), scale, &mut p[r * s..(r + 1) * s]);
        }
        for r0 in (0..rows).step_by(W) {
            let w = (rows - r0).min(W);
            let mut acc = [[_mm512_setzero_ps(); C]; W];
            for j in 0..s {
                if let (0, Some((nk, nv))) = (r0, next) {
                    // The next block's rows, a few lines per value row: in L2 when it starts.
                    let bytes = d * std::mem::size_of::<E>();
                    for rows in [nk, nv] {
                        if j * d < rows.len() {
                            let at = rows.as_ptr().add(j * d) as *const i8;
                            for line in (0..bytes).step_by(64) {
                                _mm_prefetch::<_MM_HINT_T0>(at.add(line));
                            }
                        }
                    }
                }
                let row = values.as_ptr().add(j * d);
                let v: [__m512; C] = std::array::from_fn(|c| load16(row.add(16 * c)));
                for (r, acc) in acc.iter_mut().enumerate().take(w) {
                    let pj = *p.get_unchecked((r0 + r) * s + j);
                    if pj != 0.0 {
                        let pj = _mm512_set1_ps(pj);
                        for (acc, v) in acc.iter_mut().zip(v) {
                            *acc = _mm512_fmadd_ps(pj, v, *acc);
                        }
                    }
                }
            }
            for (r, acc) in acc.iter().enumerate().take(w) {
                for (c, acc) in acc.iter().enumerate() {
                    _mm512_storeu_ps(out.as_mut_ptr().add((r0 + r) * d + 16 * c), *acc);
                }
            }
        }
    }

    /// Sixteen f32 or f16 values as f32.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn load16<E: super::KvElement>(p: *const E) -> __m512 {
        if E::HALF {
            _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i))
        } else {
            _mm512_loadu_ps(p as *const f32)
        }
    }

    /// Lane `j` of the result is the sum of the lanes of `v[j]`: a
    /// transposing reduction (45 instructions for sixteen sums).
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn lane_sums(v: [__m512; 16]) -> __m512 {
        lane_reduce(v, |a, b| _mm512_add_ps(a, b))
    }

    /// Lane `j` of the result is `op` over the lanes of `v[j]`, for an
    /// associative and commutative `op` (sums, maxima; integer ones work
    /// on the bits).
    #[target_feature(enable = "avx512f")]
    #[inline]
    pub(super) unsafe fn lane_reduce(v: [__m512; 16], op: impl Fn(__m512, __m512) -> __m512) -> __m512 {
        // Per 128-bit lane c: [a₀∘a₂, b₀∘b₂, a₁∘a₃, b₁∘b₃] of each pair (a, b).
        let x: [__m512; 8] = std::array::from_fn(|i| {
            op(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]))
        });
        // Per 128-bit lane c: vectors 4i..4i + 4 reduced over that lane.
        let z: [__m512; 4] = std::array::from_fn(|i| {
            let (a, b) = (x[2 * i], x[2 * i + 1]);
            op(_mm512_shuffle_ps::<0b01_00_01_00>(a, b), _mm512_shuffle_ps::<0b11_10_11_10>(a, b))
        });
        // 128-bit lanes [z₀(c₀∘c₂), z₀(c₁∘c₃), z₁(c₀∘c₂), z₁(c₁∘c₃)], likewise for z₂, z₃.
        let u: [__m512; 2] = std::array::from_fn(|i| {
            let (a, b) = (z[2 * i], z[2 * i + 1]);
            op(_mm512_shuffle_f32x4::<0b01_00_01_00>(a, b), _mm512_shuffle_f32x4::<0b11_10_11_10>(a, b))
        });
        op(_mm512_shuffle_f32x4::<0b10_00_10_00>(u[0], u[1]), _mm512_shuffle_f32x4::<0b11_01_11_01>(u[0], u[1]))
    }

    /// Lanes `0..n` of 16 set.
    #[inline]
    fn lanes(n: usize) -> __mmask16 {
        if n >= 16 {
            0xffff
        } else {
            (1u16 << n) - 1
        }
    }

    /// `o = softmax(scale · x + m)` for one row.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn softmax_row(x: &[f32], m: Option<&[f32]>, scale: f32, o: &mut [f32]) {
        let s = x.len();
        assert!(o.len() == s && m.is_none_or(|m| m.len() == s));
        let (sc, ninf) = (_mm512_set1_ps(scale), _mm512_set1_ps(f32::NEG_INFINITY));
        let mut max = ninf;
        let mut j = 0;
        while j < s {
            let k = lanes(s - j);
            let mut v = _mm512_mul_ps(_mm512_maskz_loadu_ps(k, x.as_ptr().add(j)), sc);
            if let Some(m) = m {
                v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(k, m.as_ptr().add(j)));
            }
            max = _mm512_mask_max_ps(max, k, max, v);
            _mm512_mask_storeu_ps(o.as_mut_ptr().add(j), k, v);
            j += 16;
        }
        let mx = _mm512_set1_ps(_mm512_reduce_max_ps(max));
        let mut sum = _mm512_setzero_ps();
        j = 0;
        while j < s {
            let k = lanes(s - j);
            let e = exp(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, o.as_ptr().add(j)), mx));
            sum = _mm512_mask_add_ps(sum, k, sum, e);
            _mm512_mask_storeu_ps(o.as_mut_ptr().add(j), k, e);
            j += 16;
        }
        let inv = _mm512_set1_ps(1.0 / _mm512_reduce_add_ps(sum));
        j = 0;
        while j < s {
            let k = lanes(s - j);
            let p = o.as_mut_ptr().add(j);
            _mm512_mask_storeu_ps(p, k, _mm512_mul_ps(_mm512_maskz_loadu_ps(k, p), inv));
            j += 16;
        }
    }

    /// One row of [`super::rms_norm`].
    #[target_feature(enable = "avx512f")]
    pub unsafe fn rms_norm_row(x: &[f32], w: &[f32], eps: f32, o: &mut [f32]) {
        let d = x.len();
        assert!(w.len() == d && o.len() == d);
        let mut sum = _mm512_setzero_ps();
        let mut j = 0;
        while j < d {
            let v = _mm512_maskz_loadu_ps(lanes(d - j), x.as_ptr().add(j));
            sum = _mm512_fmadd_ps(v, v, sum);
            j += 16;
        }
        let inv = _mm512_set1_ps(1.0 / (_mm512_reduce_add_ps(sum) / d as f32 + eps).sqrt());
        j = 0;
        while j < d {
            let k = lanes(d - j);
            let v = _mm512_mul_ps(_mm512_maskz_loadu_ps(k, x.as_ptr().add(j)), inv);
            _mm512_mask_storeu_ps(
                o.as_mut_ptr().add(j),
                k,
                _mm512_mul_ps(v, _mm512_maskz_loadu_ps(k, w.as_ptr().add(j))),
            );
            j += 16;
        }
    }

    /// `σ(x)` lane-wise.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn sigmoid(x: __m512) -> __m512 {
        let one = _mm512_set1_ps(1.0);
        _mm512_div_ps(one, _mm512_add_ps(one, exp(_mm512_sub_ps(_mm512_setzero_ps(), x))))
    }

    /// `o = g σ(g) u`.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn silu_mul(g: &[f32], u: &[f32], o: &mut [f32]) {
        assert!(u.len() == g.len() && o.len() == g.len());
        let mut j = 0;
        while j < g.len() {
            let k = lanes(g.len() - j);
            let gv = _mm512_maskz_loadu_ps(k, g.as_ptr().add(j));
            let uv = _mm512_maskz_loadu_ps(k, u.as_ptr().add(j));
            _mm512_mask_storeu_ps(o.as_mut_ptr().add(j), k, _mm512_mul_ps(_mm512_mul_ps(gv, sigmoid(gv)), uv));
            j += 16;
        }
    }

    /// `dg = dy u σ(g) (1 + g (1 − σ(g)))`, `du = dy g σ(g)`.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn silu_mul_backward(g: &[f32], u: &[f32], dy: &[f32], dg: &mut [f32], du: &mut [f32]) {
        let n = g.len();
        assert!(u.len() == n && dy.len() == n && dg.len() == n && du.len() == n);
        let one = _mm512_set1_ps(1.0);
        let mut j = 0;
        while j < n {
            let k = lanes(n - j);
            let gv = _mm512_maskz_loadu_ps(k, g.as_ptr().add(j));
            let uv = _mm512_maskz_loadu_ps(k, u.as_ptr().add(j));
            let d = _mm512_maskz_loadu_ps(k, dy.as_ptr().add(j));
            let sg = sigmoid(gv);
            let silu = _mm512_mul_ps(gv, sg);
            _mm512_mask_storeu_ps(du.as_mut_ptr().add(j), k, _mm512_mul_ps(d, silu));
            let ds = _mm512_mul_ps(sg, _mm512_fmadd_ps(gv, _mm512_sub_ps(one, sg), one));
            _mm512_mask_storeu_ps(dg.as_mut_ptr().add(j), k, _mm512_mul_ps(_mm512_mul_ps(d, uv), ds));
            j += 16;
        }
    }

    /// `o = p ⊙ (dp − Σ p ⊙ dp)` for one row.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn softmax_backward_row(p: &[f32], dp: &[f32], o: &mut [f32]) {
        let s = p.len();
        assert!(dp.len() == s && o.len() == s);
        let mut acc = _mm512_setzero_ps();
        let mut j = 0;
        while j < s {
            let k = lanes(s - j);
            acc = _mm512_fmadd_ps(
                _mm512_maskz_loadu_ps(k, p.as_ptr().add(j)),
                _mm512_maskz_loadu_ps(k, dp.as_ptr().add(j)),
                acc,
            );
            j += 16;
        }
        let dot = _mm512_set1_ps(_mm512_reduce_add_ps(acc));
        j = 0;
        while j < s {
            let k = lanes(s - j);
            let (pv, dv) = (_mm512_maskz_loadu_ps(k, p.as_ptr().add(j)), _mm512_maskz_loadu_ps(k, dp.as_ptr().add(j)));
            _mm512_mask_storeu_ps(o.as_mut_ptr().add(j), k, _mm512_mul_ps(pv, _mm512_sub_ps(dv, dot)));
            j += 16;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn values(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(1664525).wrapping_add(1013904223);
                (s >> 8) as f32 / (1u32 << 24) as f32 * 2.0 - 1.0
            })
            .collect()
    }

    pub(super) fn naive(x: &[f32], m: usize, w: &[f32], n: usize, k: usize) -> Vec<f32> {
        let mut out = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k).map(|c| x[i * k + c] * w[j * k + c]).sum();
            }
        }
        out
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn vector_exp_is_within_two_ulp_of_libm() {
        if !has_avx512f() {
            return;
        }
        let xs: Vec<f32> = (0..=20_000).map(|i| -103.0 + i as f32 * (103.0 + 88.0) / 20_000.0).collect();
        for x in xs.chunks(16) {
            let mut got = [0f32; 16];
            // SAFETY: AVX-512F checked above.
            unsafe {
                use std::arch::x86_64::*;
                let mut lanes = [0f32; 16];
                lanes[..x.len()].copy_from_slice(x);
                _mm512_storeu_ps(got.as_mut_ptr(), avx512::exp(_mm512_loadu_ps(lanes.as_ptr())));
            }
            for (&x, &g) in x.iter().zip(&got) {
                let want = x.exp();
                let ulp = (want.to_bits() as i64 - g.to_bits() as i64).abs();
                assert!(ulp <= 2 || (want < 1e-37 && (g - want).abs() < 1e-38), "exp({x}) = {g}, libm {want}");
            }
        }
        // SAFETY: AVX-512F checked above.
        let at = |x: f32| unsafe {
            use std::arch::x86_64::*;
            _mm512_reduce_max_ps(avx512::exp(_mm512_set1_ps(x)))
        };
        assert_eq!(at(f32::NEG_INFINITY), 0.0);
        assert_eq!(at(0.0), 1.0);
    }

    #[test]
    fn masked_softmax_matches_the_portable_rows_and_masks_exactly() {
        // Two batches, t = 3 mask rows shared by 2 stacked heads (6 rows per
        // batch); row lengths that end in a partial 16-lane step.
        for s in [5, 37, 640] {
            let (batches, t, g) = (2, 3, 2);
            let scores: Vec<f32> = values(batches * g * t * s, s as u32).iter().map(|v| v * 30.0).collect();
            let mask: Vec<f32> = (0..batches * t * s)
                .map(|i| if (i % s) > (i / s) % t + s / 2 { f32::NEG_INFINITY } else { 0.0 })
                .collect();
            let got = masked_softmax(&scores, Some(&mask), batches, t, s, 0.125);
            for r in 0..batches * g * t {
                let (b, q) = (r / (g * t), (r % (g * t)) % t);
                let m = &mask[(b * t + q) * s..(b * t + q + 1) * s];
                let mut want = vec![0f32; s];
                softmax_row(&scores[r * s..(r + 1) * s], Some(m), 0.125, &mut want);
                let row = &got[r * s..(r + 1) * s];
                for j in 0..s {
                    assert!((row[j] - want[j]).abs() <= 1e-6, "row {r} slot {j}: {} vs {}", row[j], want[j]);
                    if m[j] == f32::NEG_INFINITY {
                        assert_eq!(row[j], 0.0);
                    }
                }
                assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-5);
            }
            let dp = values(scores.len(), 7);
            let ds = softmax_backward(&got, &dp, s);
            for r in 0..batches * g * t {
                let (p, d) = (&got[r * s..(r + 1) * s], &dp[r * s..(r + 1) * s]);
                let dot: f32 = p.iter().zip(d).map(|(a, b)| a * b).sum();
                for j in 0..s {
                    assert!((ds[r * s + j] - p[j] * (d[j] - dot)).abs() <= 1e-6);
                }
            }
        }
    }

    #[test]
    fn f32_rows_matches_a_naive_product() {
        // 2×8 tiles (with an odd weight row per task), then 8-, 4- and 1-row
        // passes; k for the SIMD (96, 40: a last step of 8) and portable (12)
        // loops, and k = 1544 for the tiles' two k-blocks (the last ending in 8).
        for (m, n, k) in [(13, 37, 96), (13, 5, 40), (3, 4, 12), (16, 37, 1544), (8, 3, 40)] {
            let (x, w) = (values(m * k, 1), values(n * k, 2));
            let got = f32_rows(&x, m, &w, n, k);
            let want = naive(&x, m, &w, n, k);
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() < 1e-4 * w.abs().max(1.0), "{m}x{n}x{k}: {g} vs {w}");
            }
        }
    }

    /// Quantises `w` to Q4_1 or Q8_0 blocks the way ggml does, and returns
    /// the blocks with the dequantised weights they stand for.
    fn quantize(format: BlockFormat, w: &[f32]) -> (Vec<u8>, Vec<f32>) {
        let mut bytes = Vec::new();
        let mut deq = Vec::new();
        for blk in w.chunks(32) {
            match format {
                BlockFormat::Q4_1 => {
                    let (lo, hi) = blk.iter().fold((f32::MAX, f32::MIN), |(a, b), v| (a.min(*v), b.max(*v)));
                    let d = half::f16::from_f32((hi - lo) / 15.0);
                    let m = half::f16::from_f32(lo);
                    let (df, mf) = (d.to_f32(), m.to_f32());
                    let q: Vec<u8> = blk.iter().map(|v| (((v - mf) / df).round().clamp(0.0, 15.0)) as u8).collect();
                    bytes.extend_from_slice(&d.to_le_bytes());
                    bytes.extend_from_slice(&m.to_le_bytes());
                    bytes.extend((0..16).map(|j| q[j] | (q[j + 16] << 4)));
                    deq.extend(q.iter().map(|&q| df * q as f32 + mf));
                }
                BlockFormat::Q8_0 => {
                    let amax = blk.iter().fold(0f32, |a, v| a.max(v.abs()));
                    let d = half::f16::from_f32(amax / 127.0);
                    let df = d.to_f32();
                    let q: Vec<i8> = blk.iter().map(|v| (v / df).round() as i8).collect();
                    bytes.extend_from_slice(&d.to_le_bytes());
                    bytes.extend(q.iter().map(|&q| q as u8));
                    deq.extend(q.iter().map(|&q| df * q as f32));
                }
                BlockFormat::Q4K | BlockFormat::Q6K => unreachable!("K-quants are tested in kquants"),
            }
        }
        (bytes, deq)
    }

    #[test]
    fn quantized_kernels_match_the_dequantized_product_on_every_instruction_set() {
        // 13 and 15 rows take the 8-, 4-, 2- and 1-row paths; k = 96 leaves an unpaired Q4_1 block,
        // k = 512 a multiple of eight blocks (the vector loop over Q4_1's minima). Where n is a
        // multiple of 16 VNNI takes the interleaved layout (one block to 48 per row).
        for (m, n, k) in [
            (13, 21, 96),
            (1, 7, 512),
            (5, 3, 32),
            (12, 40, 576),
            (8, 9, 1536),
            (15, 48, 576),
            (1, 32, 576),
            (8, 16, 1536),
            (3, 32, 896),
            (13, 16, 96),
            (2, 16, 32),
            (9, 64, 512),
        ] {
            let x = values(m * k, 3);
            for format in [BlockFormat::Q4_1, BlockFormat::Q8_0] {
                let (bytes, deq) = quantize(format, &values(n * k, 4));
                let for_isa = |isa| QuantWeight::with_isa(isa, format, bytes.clone(), n, k).unwrap();
                let want = naive(&x, m, &deq, n, k);
                let scale = want.iter().fold(0f32, |a, v| a.max(v.abs()));
                let portable = for_isa(Isa::Portable).matmul_with(Isa::Portable, &x, m);
                for (g, w) in portable.iter().zip(&want) {
                    // Activations are rounded to 8 bits: a relative error of ~1%.
                    assert!((g - w).abs() < 0.02 * scale, "{format:?} {m}x{n}x{k}: {g} vs {w}");
                }
                // Exactly the product of the rounded activations with the weights.
                let xq = quantize_rows(&x, m, k, BlockFormat::Q8_0);
                let rounded: Vec<f32> = xq.q.iter().enumerate().map(|(i, &q)| q as f32 * xq.d[i / 32]).collect();
                let exact = naive(&rounded, m, &deq, n, k);
                for (g, w) in portable.iter().zip(&exact) {
                    assert!((g - w).abs() < 1e-4 * scale.max(1.0), "{format:?} {m}x{n}x{k}: {g} vs {w}");
                }
                // Every SIMD path gives the portable loop's sums (up to f32 summation order).
                for isa in Isa::available() {
                    let got = for_isa(isa).matmul_with(isa, &x, m);
                    for (g, p) in got.iter().zip(&portable) {
                        assert!((g - p).abs() < 1e-4 * scale.max(1.0), "{isa:?} {format:?} {m}x{n}x{k}: {g} vs {p}");
                    }
                }
            }
        }
        assert!(QuantWeight::new(BlockFormat::Q8_0, vec![0; 10], 1, 32).is_none());
    }

    #[test]
    fn simd_quantisation_gives_the_portable_values() {
        // 37 blocks: two groups of sixteen (the AVX-512 loop's) and five more.
        let mut x = values(32 * 37, 8);
        x[40] = 0.0; // ties and zeros: a block of zeros has scale 0
        x[64..96].iter_mut().for_each(|v| *v = 0.0);
        x[32 * 20..32 * 21].iter_mut().for_each(|v| *v = 0.0);
        // Blocks of other magnitudes, so that each scale is its own block's.
        x[32 * 17..32 * 18].iter_mut().for_each(|v| *v *= 1e-3);
        x[32 * 30..32 * 31].iter_mut().for_each(|v| *v *= -40.0);
        // A block with scale 1: halves (which round away from zero) and their neighbours.
        let ties = [127.0, 2.5, -2.5, 0.5, -0.5, 126.5, -126.5, 0.49999997, -1.5, 1.5000001, 2.4999998];
        x[96..96 + ties.len()].copy_from_slice(&ties);
        let blocks = x.len() / 32;
        let (mut q, mut d, mut s) = (vec![0i8; x.len()], vec![0f32; blocks], vec![0i32; blocks]);
        quantize_blocks(&x, &mut q, &mut d, &mut s);
        assert!(q[64..96].iter().all(|&v| v == 0) && d[2] == 0.0 && d[20] == 0.0);
        assert_eq!(d[3], 1.0);
        assert_eq!(&q[96..96 + ties.len()], &[127, 3, -3, 1, -1, 127, -127, 0, -2, 2, 2]);
        assert!(q.iter().any(|&v| v == 127 || v == -127));
        #[cfg(target_arch = "x86_64")]
        if has_avx2_fma() {
            let (mut q2, mut d2, mut s2) = (vec![0i8; x.len()], vec![0f32; blocks], vec![0i32; blocks]);
            // SAFETY: the CPU has AVX2.
            unsafe { quantize_blocks_avx2(&x, &mut q2, &mut d2, &mut s2) };
            assert_eq!((&q, &d, &s), (&q2, &d2, &s2));
        }
        #[cfg(target_arch = "x86_64")]
        if has_avx512f() {
            let (mut q3, mut d3, mut s3) = (vec![0i8; x.len()], vec![0f32; blocks], vec![0i32; blocks]);
            // SAFETY: the CPU has AVX-512F.
            unsafe { quantize_blocks_avx512(&x, &mut q3, &mut d3, &mut s3) };
            assert_eq!((q, d, s), (q3, d3, s3));
        }
    }

    #[test]
    fn concatenated_weights_give_the_stacked_products() {
        // Row counts of 4 and 5 keep the natural layout; 16 and 32 take the interleaved one on VNNI.
        for (m, k, na, nb) in [(3, 64, 4, 5), (3, 576, 16, 32), (9, 96, 32, 16)] {
            let x = values(m * k, 5);
            for format in [BlockFormat::Q4_1, BlockFormat::Q8_0] {
                let (a, b) = (quantize(format, &values(na * k, 6)).0, quantize(format, &values(nb * k, 7)).0);
                let (qa, qb) =
                    (QuantWeight::new(format, a, na, k).unwrap(), QuantWeight::new(format, b, nb, k).unwrap());
                let both = QuantWeight::concat(&[&qa, &qb]).unwrap();
                let (ya, yb, y) = (qa.matmul(&x, m), qb.matmul(&x, m), both.matmul(&x, m));
                let n = na + nb;
                for i in 0..m {
                    assert_eq!(&y[i * n..i * n + na], &ya[i * na..i * na + na]);
                    assert_eq!(&y[i * n + na..i * n + n], &yb[i * nb..i * nb + nb]);
                }
            }
        }
    }
}
