//! How the kernels split their work over the rayon pool: runs of weight rows
//! (each task owning the columns of the product it writes) and runs of rows of
//! an elementwise output.

use rayon::prelude::*;

/// Weight rows per parallel task: a few tasks per thread, so that work
/// balances without paying the pool's dispatch cost hundreds of times per
/// token.
pub(super) fn rows_per_task(n: usize) -> usize {
    let tasks = rayon::current_num_threads() * 4;
    n.div_ceil(tasks).next_multiple_of(16).max(16)
}

/// Runs `chunk(j0, out)` over runs of consecutive weight rows in parallel,
/// where `out` holds the `m` results of each row `j0..` (row-major), and
/// returns the `(m, n)` product.
pub(super) fn by_weight_chunks(m: usize, n: usize, chunk: impl Fn(usize, &mut [f32]) + Sync) -> Vec<f32> {
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
pub(super) struct Columns {
    pub(super) ptr: *mut f32,
    pub(super) m: usize,
    pub(super) n: usize,
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
    pub(super) unsafe fn at(self, i: usize, j: usize) -> *mut f32 {
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
pub(super) unsafe fn by_weight_columns(m: usize, n: usize, chunk: impl Fn(usize, usize, Columns) + Sync) -> Vec<f32> {
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

/// A `len`-element output of rows of length `s`, row `r` written by
/// `row(r, out_r)`, 64 rows per parallel task.
pub(super) fn by_rows(len: usize, s: usize, row: impl Fn(usize, &mut [f32]) + Sync) -> Vec<f32> {
    const ROWS_PER_TASK: usize = 64;
    let mut out = vec![0f32; len];
    out.par_chunks_mut(s * ROWS_PER_TASK).enumerate().for_each(|(c, chunk)| {
        for (i, o) in chunk.chunks_mut(s).enumerate() {
            row(c * ROWS_PER_TASK + i, o);
        }
    });
    out
}
