//! Products of CPU f32 tensors that record no graph, straight through the
//! `gemm` crate. candle's matmul zero-fills its output before the product
//! overwrites it (a serial `memset` on the calling thread: ~2% of a SmolLM2
//! CPO step) and runs the products of a batch one after another, each
//! split over the threads (the attention's per-head products are small, so
//! the threads mostly wait on each other). Here the output is written once,
//! and a batch of small products is split over the threads by batch entry.

use candle_core::{Result, Tensor};

/// `a @ b` for `a` `(.., m, k)` and `b` `(.., k, n)` with the same leading
/// dimensions, as candle's `matmul` computes it (any strides). Tensors that
/// record a graph, other devices and dtypes take candle's matmul.
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    #[cfg(target_arch = "x86_64")]
    if let Some((batches, m, n)) = product_shape(a, b) {
        let mut dims = a.dims()[..a.rank() - 2].to_vec();
        dims.extend([m, n]);
        let mut out: Vec<f32> = Vec::with_capacity(batches * m * n);
        let dst =
            Dst { ptr: out.spare_capacity_mut().as_mut_ptr() as *mut f32, batch: m * n, row: n, len: batches * m * n };
        if gemm_into(a, b, &dst, false)?.is_some() {
            // SAFETY: `gemm_into` wrote all `batches·m·n` elements (`read_dst` false).
            unsafe { out.set_len(batches * m * n) };
            return Tensor::from_vec(out, dims, a.device());
        }
    }
    a.matmul(b)
}

/// `dst[i] += a[i] @ b[i]` for each batch entry `i` of `a` `(.., m, k)` and
/// `b` `(.., k, n)`, where entry `i`'s `(m, n)` block of `dst` starts at
/// `i · batch_stride` with rows `row_stride` apart: gradients summed over
/// blocks of keys without a tensor per block. Any device or dtype of `a`
/// and `b` (converted to f32 first where they are not CPU f32).
pub fn matmul_add(dst: &mut [f32], batch_stride: usize, row_stride: usize, a: &Tensor, b: &Tensor) -> Result<()> {
    let rank = a.rank();
    let (m, n) = (a.dim(rank - 2)?, b.dim(rank - 1)?);
    let batches: usize = a.dims()[..rank - 2].iter().product();
    if batches > 0 && m > 0 && n > 0 && (batches - 1) * batch_stride + (m - 1) * row_stride + n > dst.len() {
        candle_core::bail!("matmul_add: {batches} blocks of ({m}, {n}) do not fit {} values", dst.len());
    }
    #[cfg(target_arch = "x86_64")]
    if product_shape(a, b).is_some() {
        let dst = Dst { ptr: dst.as_mut_ptr(), batch: batch_stride, row: row_stride, len: dst.len() };
        if gemm_into(a, b, &dst, true)?.is_some() {
            return Ok(());
        }
    }
    let p = a.matmul(b)?.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    for (i, block) in p.chunks(m * n).enumerate() {
        for (r, row) in block.chunks(n).enumerate() {
            let at = i * batch_stride + r * row_stride;
            dst[at..at + n].iter_mut().zip(row).for_each(|(d, &v)| *d += v);
        }
    }
    Ok(())
}

/// Multiply-adds per product below which a batch's products are split over
/// the threads by batch entry rather than each over all threads.
#[cfg(target_arch = "x86_64")]
const SMALL_PRODUCT: usize = 1 << 24;

/// `(batches, m, n)` where `gemm_into` can take `a @ b`: CPU f32 tensors
/// without a graph, of one rank, with the same leading dimensions.
#[cfg(target_arch = "x86_64")]
fn product_shape(a: &Tensor, b: &Tensor) -> Option<(usize, usize, usize)> {
    let f32_cpu = |t: &Tensor| t.device().is_cpu() && t.dtype() == candle_core::DType::F32 && !t.track_op();
    let rank = a.rank();
    if !(f32_cpu(a) && f32_cpu(b)) || rank < 2 || b.rank() != rank || a.dims()[..rank - 2] != b.dims()[..rank - 2] {
        return None;
    }
    let (m, k, n) = (a.dims()[rank - 2], a.dims()[rank - 1], b.dims()[rank - 1]);
    (b.dims()[rank - 2] == k).then(|| (a.dims()[..rank - 2].iter().product(), m, n))
}

/// Where a product's blocks go: batch entry `i`'s `(m, n)` block starts at
/// `ptr + i·batch`, its rows `row` apart, inside `len` values.
#[cfg(target_arch = "x86_64")]
struct Dst {
    ptr: *mut f32,
    batch: usize,
    row: usize,
    len: usize,
}
// SAFETY: the tasks of `gemm_into` write disjoint blocks (batch entries).
#[cfg(target_arch = "x86_64")]
unsafe impl Sync for Dst {}

/// `dst ← a @ b` (`accumulate`: `dst ← dst + a @ b`) block by block through
/// `gemm`; `None` (nothing written) where `product_shape` refuses the
/// tensors or their strides reach outside their storage.
#[cfg(target_arch = "x86_64")]
fn gemm_into(a: &Tensor, b: &Tensor, dst: &Dst, accumulate: bool) -> Result<Option<()>> {
    use candle_core::Storage;
    use rayon::prelude::*;
    let Some((batches, m, n)) = product_shape(a, b) else { return Ok(None) };
    let rank = a.rank();
    let k = a.dims()[rank - 1];
    if batches == 0 || m == 0 || n == 0 {
        return Ok(Some(()));
    }
    if (batches - 1) * dst.batch + (m - 1) * dst.row + n > dst.len || (batches > 1 && dst.batch < (m - 1) * dst.row + n)
    {
        return Ok(None);
    }
    if k == 0 {
        if !accumulate {
            for i in 0..batches {
                for r in 0..m {
                    // SAFETY: inside `dst.len` (checked above).
                    unsafe { std::ptr::write_bytes(dst.ptr.add(i * dst.batch + r * dst.row), 0, n) };
                }
            }
        }
        return Ok(Some(()));
    }
    let lead = &a.dims()[..rank - 2];
    let (sa, la) = a.storage_and_layout();
    let (sb, lb) = b.storage_and_layout();
    let (Storage::Cpu(ca), Storage::Cpu(cb)) = (&*sa, &*sb) else { return Ok(None) };
    let (av, bv) = (ca.as_slice::<f32>()?, cb.as_slice::<f32>()?);
    // Where each batch entry starts, checked to stay inside the storage.
    let starts = |l: &candle_core::Layout, len: usize, rows: usize, cols: usize| -> Option<Vec<usize>> {
        let st = l.stride();
        let reach = (rows - 1) * st[rank - 2] + (cols - 1) * st[rank - 1];
        let mut out = Vec::with_capacity(batches);
        for i in 0..batches {
            let (mut rest, mut off) = (i, l.start_offset());
            for d in (0..rank - 2).rev() {
                off += (rest % lead[d]) * st[d];
                rest /= lead[d];
            }
            if off + reach >= len {
                return None;
            }
            out.push(off);
        }
        Some(out)
    };
    let (Some(a_at), Some(b_at)) = (starts(la, av.len(), m, k), starts(lb, bv.len(), k, n)) else {
        return Ok(None);
    };
    let (ars, acs) = (la.stride()[rank - 2] as isize, la.stride()[rank - 1] as isize);
    let (brs, bcs) = (lb.stride()[rank - 2] as isize, lb.stride()[rank - 1] as isize);
    let one = |i: usize, parallelism: gemm::Parallelism| {
        // SAFETY: `starts` checked that every element the strides reach lies
        // inside `av`/`bv`; batch entry `i` writes its own `(m, n)` block of
        // `dst`, inside `dst.len` and apart from the others' (checked above).
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                dst.ptr.add(i * dst.batch),
                1,
                dst.row as isize,
                accumulate,
                av.as_ptr().add(a_at[i]),
                acs,
                ars,
                bv.as_ptr().add(b_at[i]),
                bcs,
                brs,
                if accumulate { 1.0 } else { 0.0 },
                1.0,
                false,
                false,
                false,
                parallelism,
            )
        }
    };
    let threads = rayon::current_num_threads();
    if batches > 1 && m * n * k < SMALL_PRODUCT {
        (0..batches).into_par_iter().for_each(|i| one(i, gemm::Parallelism::None));
    } else {
        let parallelism = if threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
        (0..batches).for_each(|i| one(i, parallelism));
    }
    Ok(Some(()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn products_equal_candles_for_views_transposes_and_batches() {
        let dev = Device::Cpu;
        let t = |dims: &[usize], salt: usize| {
            let n: usize = dims.iter().product();
            let v: Vec<f32> = (0..n).map(|i| (((i * 7919 + salt * 104_729) % 1000) as f32) / 500.0 - 1.0).collect();
            Tensor::from_vec(v, dims, &dev).unwrap()
        };
        let a = t(&[2, 3, 40, 24], 1);
        let b = t(&[2, 3, 24, 33], 2);
        let bt = t(&[2, 3, 33, 24], 3);
        let big_a = t(&[300, 200], 4);
        let big_b = t(&[200, 310], 5);
        let cases: Vec<(Tensor, Tensor)> = vec![
            (a.clone(), b.clone()),
            (a.clone(), bt.t().unwrap()),
            // A narrowed view (a block of rows of each head) against transposed keys.
            (a.narrow(2, 8, 16).unwrap(), bt.narrow(2, 0, 20).unwrap().t().unwrap()),
            // One head of one row: a 2-D view at an offset.
            (first(&a), first(&b)),
            (big_a.clone(), big_b.clone()),
            (big_b.t().unwrap(), big_a.t().unwrap()),
        ];
        for (i, (x, y)) in cases.into_iter().enumerate() {
            let want = x.matmul(&y).unwrap();
            let got = matmul(&x, &y).unwrap();
            assert_eq!(got.dims(), want.dims(), "case {i}");
            let diff = (got - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(diff < 1e-4, "case {i}: max difference {diff}");
        }
    }

    #[test]
    fn products_add_into_blocks_of_a_larger_buffer() {
        let dev = Device::Cpu;
        let (kv, s, d, hi, rows) = (3, 10, 4, 6, 5);
        let p: Vec<f32> = (0..kv * rows * hi).map(|i| (i % 7) as f32 - 3.0).collect();
        let g: Vec<f32> = (0..kv * rows * d).map(|i| (i % 5) as f32 * 0.5).collect();
        let p = Tensor::from_vec(p, (kv, rows, hi), &dev).unwrap();
        let g = Tensor::from_vec(g, (kv, rows, d), &dev).unwrap();
        // dV[h, 0..hi] += Pᵀ dO, twice, into a (kv, s, d) buffer that starts at ones.
        let mut dst = vec![1f32; kv * s * d];
        let pt = p.t().unwrap();
        matmul_add(&mut dst, s * d, d, &pt, &g).unwrap();
        matmul_add(&mut dst, s * d, d, &pt, &g).unwrap();
        let want = (pt.matmul(&g).unwrap() * 2.0).unwrap().pad_with_zeros(1, 0, s - hi).unwrap();
        let want = (want + 1.0).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(dst, want);
        let reach = (kv - 1) * s * d + hi * d;
        assert!(matmul_add(&mut dst[..reach], s * d, d, &pt, &g).is_ok());
        assert!(matmul_add(&mut dst[..reach - 1], s * d, d, &pt, &g).is_err(), "a buffer too short");
    }

    fn first(t: &Tensor) -> Tensor {
        t.narrow(0, 1, 1).unwrap().narrow(1, 2, 1).unwrap().squeeze(0).unwrap().squeeze(0).unwrap()
    }
}
