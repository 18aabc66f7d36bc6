//! LoRA's adapter term on CPU f32 rows, fused with its dropout: the dropout
//! mask as bits ([`DropoutMask`]: one per input element, each computable on
//! its own), the masked input `x ⊙ m` in one pass, and [`add_low_rank`],
//! `base + m ⊙ (c F)` — a rank-r product added to a frozen product's rows
//! (forward: `s·h Bᵀ` onto `x Wᵀ`; backward: `(dh A) ⊙ m` onto `dy W`)
//! without a tensor of its own, a scaling pass or an addition pass.

use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::StridedRows;
use crate::generate::{splitmix_mix, SPLITMIX_GAMMA as GAMMA};

/// Elements per parallel task: whole 64-bit words of mask bits.
const ELEMENTS_PER_TASK: usize = 1 << 14;

/// Inverted dropout over an input of `len` elements (a `(rows, in)` input
/// flattened): element `i` is kept, scaled by `1 / (1 − p)`, unless its
/// 16-bit draw is below `round(p · 65536)`; the draws of elements `4j..4j + 4`
/// are the four 16-bit parts (low first) of SplitMix64's word
/// `mix(seed + (j + 1)·γ)`. One stream over the whole input, every element's
/// draw computed on its own: the same mask on any number of threads, again
/// for a backward, and no two elements share a draw.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DropoutMask {
    seed: u64,
    threshold: u16,
    keep: f32,
}

impl DropoutMask {
    /// The mask of stream `seed` with drop probability `p` (in `[0, 1)`).
    pub fn new(seed: u64, p: f64) -> DropoutMask {
        let threshold = (p.clamp(0.0, 1.0) * 65536.0).round().min(65535.0) as u16;
        DropoutMask { seed, threshold, keep: (1.0 / (1.0 - p)) as f32 }
    }

    /// What a kept element is multiplied by, `1 / (1 − p)`.
    pub fn keep(&self) -> f32 {
        self.keep
    }

    /// Whether element `i` is kept (the definition the fast paths follow).
    pub fn kept(&self, i: usize) -> bool {
        ((self.word(i / 4) >> (16 * (i % 4))) & 0xFFFF) as u16 >= self.threshold
    }

    /// Word `j` of the stream: the draws of elements `4j..4j + 4`.
    fn word(&self, j: usize) -> u64 {
        splitmix_mix(self.seed.wrapping_add((j as u64 + 1).wrapping_mul(GAMMA)))
    }

    /// Bit `i % 64` of word `i / 64` set where element `i` of `len` is kept.
    pub fn bits(&self, len: usize) -> Vec<u64> {
        let mut bits = vec![0u64; len.div_ceil(64)];
        bits.par_chunks_mut(ELEMENTS_PER_TASK / 64)
            .enumerate()
            .for_each(|(c, words)| self.fill_bits(c * ELEMENTS_PER_TASK / 64, words));
        bits
    }

    /// The mask over `len` elements as values: `1 / (1 − p)` where kept, else 0.
    pub fn values(&self, len: usize) -> Vec<f32> {
        let bits = self.bits(len);
        (0..len).map(|i| if bit(&bits, i) { self.keep } else { 0.0 }).collect()
    }

    /// `(x ⊙ m, m's bits)` in one pass over `x`.
    pub fn apply(&self, x: &[f32]) -> (Vec<f32>, Vec<u64>) {
        let mut bits = vec![0u64; x.len().div_ceil(64)];
        let mut out = Vec::with_capacity(x.len());
        out.spare_capacity_mut()[..x.len()]
            .par_chunks_mut(ELEMENTS_PER_TASK)
            .zip(bits.par_chunks_mut(ELEMENTS_PER_TASK / 64))
            .enumerate()
            .for_each(|(c, (o, words))| {
                let at = c * ELEMENTS_PER_TASK;
                self.fill_bits(at / 64, words);
                masked_copy(&x[at..at + o.len()], words, self.keep, o);
            });
        // SAFETY: the chunks above wrote all `x.len()` elements.
        unsafe { out.set_len(x.len()) };
        (out, bits)
    }

    /// The bits of elements `64·first..64·(first + words.len())`.
    fn fill_bits(&self, first: usize, words: &mut [u64]) {
        #[cfg(target_arch = "x86_64")]
        if super::has_avx512_dq_bw() {
            // SAFETY: AVX-512F/DQ/BW checked just above.
            unsafe { self.fill_bits_avx512(first, words) };
            return;
        }
        self.fill_bits_portable(first, words);
    }

    /// [`DropoutMask::fill_bits`] one SplitMix64 word at a time.
    fn fill_bits_portable(&self, first: usize, words: &mut [u64]) {
        for (w, out) in words.iter_mut().enumerate() {
            let mut b = 0u64;
            for q in 0..16 {
                let word = self.word((first + w) * 16 + q);
                for lane in 0..4 {
                    if ((word >> (16 * lane)) & 0xFFFF) as u16 >= self.threshold {
                        b |= 1 << (4 * q + lane);
                    }
                }
            }
            *out = b;
        }
    }

    /// [`DropoutMask::fill_bits`], eight SplitMix64 words (32 draws) per vector.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512dq,avx512bw")]
    unsafe fn fill_bits_avx512(&self, first: usize, words: &mut [u64]) {
        use std::arch::x86_64::*;
        let gamma = |n: u64| _mm512_set1_epi64(GAMMA.wrapping_mul(n) as i64);
        // Lane l of `z` is word 16·first + l + 1 of the stream, before mixing.
        let start = self.seed.wrapping_add((16 * first as u64 + 1).wrapping_mul(GAMMA));
        let mut z = _mm512_add_epi64(
            _mm512_set1_epi64(start as i64),
            _mm512_mullo_epi64(_mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0), gamma(1)),
        );
        let step = gamma(8);
        let threshold = _mm512_set1_epi16(self.threshold as i16);
        let (c1, c2) =
            (_mm512_set1_epi64(0xBF58_476D_1CE4_E5B9_u64 as i64), _mm512_set1_epi64(0x94D0_49BB_1331_11EB_u64 as i64));
        for out in words.iter_mut() {
            let mut b = 0u64;
            for half in 0..2 {
                let mut v = _mm512_mullo_epi64(_mm512_xor_si512(z, _mm512_srli_epi64::<30>(z)), c1);
                v = _mm512_mullo_epi64(_mm512_xor_si512(v, _mm512_srli_epi64::<27>(v)), c2);
                v = _mm512_xor_si512(v, _mm512_srli_epi64::<31>(v));
                // The 32 16-bit lanes in memory order are the draws in element order.
                let dropped = _mm512_cmplt_epu16_mask(v, threshold);
                b |= ((!dropped) as u64) << (32 * half);
                z = _mm512_add_epi64(z, step);
            }
            *out = b;
        }
    }
}

/// `o = x · keep` where the bit is set, else 0 (`words`' bit 0 is `x[0]`'s).
fn masked_copy(x: &[f32], words: &[u64], keep: f32, o: &mut [MaybeUninit<f32>]) {
    #[cfg(target_arch = "x86_64")]
    if super::has_avx512f() {
        // SAFETY: AVX-512F checked just above; `o` and `x` have one length, `words` covers it.
        unsafe { masked_copy_avx512(x, words, keep, o) };
        return;
    }
    masked_copy_portable(x, words, keep, o);
}

fn masked_copy_portable(x: &[f32], words: &[u64], keep: f32, o: &mut [MaybeUninit<f32>]) {
    for (i, (o, &x)) in o.iter_mut().zip(x).enumerate() {
        o.write(if bit(words, i) { x * keep } else { 0.0 });
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn masked_copy_avx512(x: &[f32], words: &[u64], keep: f32, o: &mut [MaybeUninit<f32>]) {
    use std::arch::x86_64::*;
    assert_eq!(x.len(), o.len());
    let k = _mm512_set1_ps(keep);
    let out = o.as_mut_ptr() as *mut f32;
    for i in (0..x.len()).step_by(16) {
        let lanes = super::avx512::lanes(x.len() - i);
        let m = bits16(words, i) & lanes;
        let v = _mm512_maskz_loadu_ps(lanes, x.as_ptr().add(i));
        _mm512_mask_storeu_ps(out.add(i), lanes, _mm512_maskz_mul_ps(m, v, k));
    }
}

/// Whether bit `i` of the mask's words is set (element `i` kept).
#[inline]
fn bit(words: &[u64], i: usize) -> bool {
    (words[i / 64] >> (i % 64)) & 1 == 1
}

/// 16 mask bits from element `i` on (bit 0: element `i`).
#[inline]
fn bits16(words: &[u64], i: usize) -> u16 {
    let (w, s) = (i / 64, i % 64);
    let lo = words[w] >> s;
    let hi = if s > 48 { words.get(w + 1).map_or(0, |h| h << (64 - s)) } else { 0 };
    (lo | hi) as u16
}

/// Rows per parallel task of [`add_low_rank`].
const ROWS_PER_TASK: usize = 32;

/// `base + m ⊙ (c F)` row by row, as a new `(rows, n)` buffer: `base`
/// `(rows, n)` (rows where they lie: a part of a fused product is read in
/// place), `c` `(rows, r)`, `f` `(r, n)`, `mask` the bits and scale of `m`
/// over the `(rows, n)` elements (`m` = 1 without).
pub(crate) fn add_low_rank(
    base: &StridedRows<'_>,
    c: &[f32],
    f: &[f32],
    r: usize,
    mask: Option<(&[u64], f32)>,
) -> Vec<f32> {
    let (rows, n) = (base.rows, base.n);
    assert!(r > 0 && f.len() == r * n && c.len() == rows * r);
    assert!(rows == 0 || base.start + (rows - 1) * base.stride + n <= base.data.len());
    let mut out = Vec::with_capacity(rows * n);
    if n == 0 {
        return out;
    }
    out.spare_capacity_mut()[..rows * n].par_chunks_mut(ROWS_PER_TASK * n).enumerate().for_each(|(task, o)| {
        let row0 = task * ROWS_PER_TASK;
        let task_rows = o.len() / n;
        let rows = Rows {
            // SAFETY: rows `row0..row0 + task_rows` of `base` lie inside its data (asserted above).
            base: unsafe { base.data.as_ptr().add(base.start + row0 * base.stride) },
            base_stride: base.stride,
            out: o.as_mut_ptr() as *mut f32,
            rows: task_rows,
            n,
        };
        // SAFETY: the task's rows of `base` and `o` hold `n` values each; `c` holds theirs.
        unsafe { low_rank_rows(&rows, &c[row0 * r..(row0 + task_rows) * r], f, r, row0, mask) };
    });
    // SAFETY: the tasks above wrote every element.
    unsafe { out.set_len(rows * n) };
    out
}

/// `y += c F` in place, `y` `(rows, n)` with `n = f.len() / r`: an
/// adapter's factors beside a quantised product (prefill, sampling).
pub(crate) fn add_low_rank_into(y: &mut [f32], c: &[f32], f: &[f32], r: usize) {
    let n = if r == 0 { 0 } else { f.len() / r };
    assert!(r > 0 && f.len() == r * n && y.len() % n.max(1) == 0 && c.len() == y.len() / n.max(1) * r);
    if n == 0 {
        return;
    }
    y.par_chunks_mut(ROWS_PER_TASK * n).enumerate().for_each(|(task, yc)| {
        let row0 = task * ROWS_PER_TASK;
        let task_rows = yc.len() / n;
        let ptr = yc.as_mut_ptr();
        let rows = Rows { base: ptr, base_stride: n, out: ptr, rows: task_rows, n };
        // SAFETY: each element is read, then written, by the same iteration; `c` holds the task's rows.
        unsafe { low_rank_rows(&rows, &c[row0 * r..(row0 + task_rows) * r], f, r, row0, None) };
    });
}

/// Rows `i < rows` of the base at `base + i·base_stride` and of the output
/// at `out + i·n`, `n` values each (the output may be the base itself).
struct Rows {
    base: *const f32,
    base_stride: usize,
    out: *mut f32,
    rows: usize,
    n: usize,
}

/// `out = base + m ⊙ (c F)` for the rows of one task (`row0`: the first
/// row's index in the whole, for the mask's bits).
///
/// # Safety
/// `rows` must describe readable base rows and writable output rows of `n`
/// values; `c` holds `rows.rows · r` values, `f` `r · n`.
unsafe fn low_rank_rows(rows: &Rows, c: &[f32], f: &[f32], r: usize, row0: usize, mask: Option<(&[u64], f32)>) {
    #[cfg(target_arch = "x86_64")]
    if r <= 16 && super::has_avx512f() {
        low_rank_rows_avx512(rows, c, f, r, row0, mask);
        return;
    }
    let n = rows.n;
    let mut term = vec![0f32; n];
    for t in 0..rows.rows {
        term.fill(0.0);
        for (j, fj) in f.chunks(n).enumerate() {
            let cj = c[t * r + j];
            term.iter_mut().zip(fj).for_each(|(s, &w)| *s += cj * w);
        }
        for (col, &s) in term.iter().enumerate() {
            let s = match mask {
                Some((words, keep)) if bit(words, (row0 + t) * n + col) => s * keep,
                Some(_) => 0.0,
                None => s,
            };
            let b = *rows.base.add(t * rows.base_stride + col);
            *rows.out.add(t * n + col) = b + s;
        }
    }
}

/// [`low_rank_rows`] with the `r` (≤ 16) rows of `F` for sixteen columns
/// held in registers while every row of the task meets them.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn low_rank_rows_avx512(rows: &Rows, c: &[f32], f: &[f32], r: usize, row0: usize, mask: Option<(&[u64], f32)>) {
    use std::arch::x86_64::*;
    let n = rows.n;
    assert!(r <= 16 && c.len() == rows.rows * r && f.len() == r * n);
    // The coefficients padded to sixteen per row, zeros past `r`.
    let mut cp = vec![0f32; rows.rows * 16];
    for (t, row) in c.chunks(r).enumerate() {
        cp[t * 16..t * 16 + r].copy_from_slice(row);
    }
    let keep = _mm512_set1_ps(mask.map_or(1.0, |m| m.1));
    for col in (0..n).step_by(16) {
        let lanes = super::avx512::lanes(n - col);
        let fv: [__m512; 16] = std::array::from_fn(|j| {
            if j < r {
                _mm512_maskz_loadu_ps(lanes, f.as_ptr().add(j * n + col))
            } else {
                _mm512_setzero_ps()
            }
        });
        for t in 0..rows.rows {
            let ct = cp.as_ptr().add(t * 16);
            let mut acc = _mm512_setzero_ps();
            for (j, fj) in fv.iter().enumerate() {
                acc = _mm512_fmadd_ps(_mm512_set1_ps(*ct.add(j)), *fj, acc);
            }
            if let Some((words, _)) = mask {
                let m = bits16(words, (row0 + t) * n + col) & lanes;
                acc = _mm512_maskz_mul_ps(m, acc, keep);
            }
            let b = _mm512_maskz_loadu_ps(lanes, rows.base.add(t * rows.base_stride + col));
            _mm512_mask_storeu_ps(rows.out.add(t * n + col), lanes, _mm512_add_ps(b, acc));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_bits_follow_the_definition_at_any_offset_and_drop_about_p() {
        let mask = DropoutMask::new(0xC0FFEE, 0.05);
        let len = 3 * ELEMENTS_PER_TASK + 77;
        let bits = mask.bits(len);
        let mut n_kept = 0;
        for i in 0..len {
            let kept = bit(&bits, i);
            assert_eq!(kept, mask.kept(i), "element {i}");
            n_kept += kept as usize;
        }
        let dropped = 1.0 - n_kept as f64 / len as f64;
        assert!((dropped - 0.05).abs() < 0.005, "dropped {dropped}");
        // Words from any offset on, on the vector path (where the CPU has one) and the portable one.
        let (mut words, mut portable) = (vec![0u64; 40], vec![0u64; 40]);
        mask.fill_bits(5, &mut words);
        mask.fill_bits_portable(5, &mut portable);
        for (w, (&word, &p)) in words.iter().zip(&portable).enumerate() {
            let expect = (0..64).filter(|&b| mask.kept((5 + w) * 64 + b)).fold(0u64, |acc, b| acc | 1 << b);
            assert_eq!((word, p), (expect, expect), "word {w}");
        }
    }

    #[test]
    fn masks_of_different_rows_are_not_shifted_copies() {
        // The masks of one chunk of 16,384 elements used to reappear in the
        // next, shifted by four elements (the chunks' streams overlapped).
        let mask = DropoutMask::new(7, 0.5);
        let bits = mask.bits(4 * ELEMENTS_PER_TASK);
        let same = (0..ELEMENTS_PER_TASK - 4)
            .filter(|&i| {
                let j = i + ELEMENTS_PER_TASK - 4;
                bit(&bits, i) == bit(&bits, j)
            })
            .count();
        let share = same as f64 / (ELEMENTS_PER_TASK - 4) as f64;
        assert!((share - 0.5).abs() < 0.03, "{share} of the elements agree");
    }

    #[test]
    fn apply_keeps_scaled_values_where_the_bits_say() {
        let mask = DropoutMask::new(3, 0.25);
        let x: Vec<f32> = (0..1000).map(|i| i as f32 - 400.0).collect();
        let (xm, bits) = mask.apply(&x);
        for i in 0..x.len() {
            let expect = if mask.kept(i) { x[i] * mask.keep() } else { 0.0 };
            assert_eq!(xm[i], expect, "element {i}");
            assert_eq!(bit(&bits, i), mask.kept(i));
        }
        assert_eq!(mask.values(x.len()), mask.apply(&vec![1.0; x.len()]).0);
        let mut portable = Vec::with_capacity(x.len());
        masked_copy_portable(&x, &bits, mask.keep(), &mut portable.spare_capacity_mut()[..x.len()]);
        // SAFETY: the portable copy wrote every element.
        unsafe { portable.set_len(x.len()) };
        assert_eq!(portable, xm);
    }

    /// `base + m ⊙ (c F)` computed plainly.
    fn reference(base: &[f32], c: &[f32], f: &[f32], r: usize, mask: Option<&DropoutMask>) -> Vec<f32> {
        let n = f.len() / r;
        (0..base.len())
            .map(|i| {
                let (t, col) = (i / n, i % n);
                let s: f32 = (0..r).map(|j| c[t * r + j] * f[j * n + col]).sum();
                base[i] + mask.map_or(s, |m| if m.kept(i) { s * m.keep() } else { 0.0 })
            })
            .collect()
    }

    #[test]
    fn add_low_rank_matches_the_plain_sums_for_ranks_shapes_and_masks() {
        let value = |i: usize, salt: usize| ((i * 7919 + salt * 104_729) % 1000) as f32 / 500.0 - 1.0;
        // Ranks below, at and past the sixteen registers; widths with tails;
        // more rows than one task holds.
        for (rows, n, r) in [(70, 40, 16), (33, 37, 4), (5, 16, 1), (40, 21, 20), (1, 3, 16)] {
            let base: Vec<f32> = (0..rows * n).map(|i| value(i, 1)).collect();
            let c: Vec<f32> = (0..rows * r).map(|i| value(i, 2)).collect();
            let f: Vec<f32> = (0..r * n).map(|i| value(i, 3)).collect();
            let mask = DropoutMask::new(11, 0.3);
            let bits = mask.bits(rows * n);
            for m in [None, Some(&mask)] {
                let got = add_low_rank(&StridedRows::contiguous(&base, n), &c, &f, r, m.map(|m| (&bits[..], m.keep())));
                let want = reference(&base, &c, &f, r, m);
                // The same rows read in place as the middle part of wider rows.
                let wide: Vec<f32> =
                    base.chunks(n).flat_map(|row| [&[7.0; 3][..], row, &[9.0; 5][..]].concat()).collect();
                let view = StridedRows { data: &wide, start: 3, stride: n + 8, rows, n };
                assert_eq!(add_low_rank(&view, &c, &f, r, m.map(|m| (&bits[..], m.keep()))), got);
                if m.is_none() {
                    let mut y = base.clone();
                    add_low_rank_into(&mut y, &c, &f, r);
                    assert_eq!(y, got, "in place");
                }
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (g - w).abs() <= 1e-5 * (1.0 + w.abs()),
                        "rows {rows} n {n} r {r} mask {}: element {i}: {g} vs {w}",
                        m.is_some()
                    );
                }
            }
        }
    }
}
