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
    if let Some(out) = gemm_f32(a, b)? {
        return Ok(out);
    }
    a.matmul(b)
}

/// Multiply-adds per product below which a batch's products are split over
/// the threads by batch entry rather than each over all threads.
#[cfg(target_arch = "x86_64")]
const SMALL_PRODUCT: usize = 1 << 24;

#[cfg(target_arch = "x86_64")]
fn gemm_f32(a: &Tensor, b: &Tensor) -> Result<Option<Tensor>> {
    use candle_core::{DType, Storage};
    use rayon::prelude::*;
    let f32_cpu = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32 && !t.track_op();
    let rank = a.rank();
    if !(f32_cpu(a) && f32_cpu(b)) || rank < 2 || b.rank() != rank || a.dims()[..rank - 2] != b.dims()[..rank - 2] {
        return Ok(None);
    }
    let (m, k, n) = (a.dims()[rank - 2], a.dims()[rank - 1], b.dims()[rank - 1]);
    if b.dims()[rank - 2] != k {
        return Ok(None);
    }
    let lead = &a.dims()[..rank - 2];
    let batches: usize = lead.iter().product();
    let mut dims = lead.to_vec();
    dims.extend([m, n]);
    if k == 0 || m == 0 || n == 0 {
        return Ok(Some(Tensor::zeros(dims, DType::F32, a.device())?));
    }
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
    let mut out: Vec<f32> = Vec::with_capacity(batches * m * n);
    let dst = SendPtr(out.spare_capacity_mut().as_mut_ptr() as *mut f32);
    let one = |i: usize, parallelism: gemm::Parallelism| {
        let dst = &dst;
        // SAFETY: `starts` checked that every element the strides reach lies
        // inside `av`/`bv`; batch entry `i` writes its own `m·n` of the
        // `batches·m·n` reserved outputs (all of them: `read_dst` false, `k` > 0).
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                dst.0.add(i * m * n),
                1,
                n as isize,
                false,
                av.as_ptr().add(a_at[i]),
                acs,
                ars,
                bv.as_ptr().add(b_at[i]),
                bcs,
                brs,
                0.0,
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
    // SAFETY: the products above wrote all `batches·m·n` elements.
    unsafe { out.set_len(batches * m * n) };
    Ok(Some(Tensor::from_vec(out, dims, a.device())?))
}

/// The output pointer, shared by the tasks that write disjoint parts of it.
#[cfg(target_arch = "x86_64")]
struct SendPtr(*mut f32);
// SAFETY: each task writes only its own batch entry's elements.
#[cfg(target_arch = "x86_64")]
unsafe impl Sync for SendPtr {}
#[cfg(target_arch = "x86_64")]
unsafe impl Send for SendPtr {}

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

    fn first(t: &Tensor) -> Tensor {
        t.narrow(0, 1, 1).unwrap().narrow(1, 2, 1).unwrap().squeeze(0).unwrap().squeeze(0).unwrap()
    }
}
