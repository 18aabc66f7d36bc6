//! Q4_1 and Q8_0 weights laid out for AVX-512 VNNI with one i32 lane per
//! block, for decoding batches.
//!
//! In the natural layout a 512-bit `vpdpbusd` covers four blocks, four lanes
//! each, and every four blocks then pay for their scales (convert, multiply,
//! fused multiply-add, one more for Q4_1's minimum) once per activation row:
//! as many float instructions as products. Here a *group* is sixteen blocks
//! of a row (512 weights). Each 32-block splits into eight *steps* of four
//! values; the group's vector for step `s` holds, in lane `b`, values
//! `4s..4s + 4` of block `b`. Eight `vpdpbusd` then leave each block's whole
//! dot product in its own lane, and the scales are applied once per sixteen
//! blocks (stored in natural block order, sixteen f16 per group).
//!
//! The blocks past a row's last whole group (the *tail*: two of the eighteen
//! at k = 576) are grouped across eight rows instead: lane `l` of tail group
//! `t` holds row `l mod 8`'s tail block `2t + l / 8` (zeros past the tail).
//! A tail group thus serves eight rows at full width, and the sum of its
//! accumulator's two 256-bit halves is the eight rows' tail terms.
//!
//! Q8_0's signed values are stored plus 128 (`vpdpbusd` multiplies unsigned
//! by signed bytes); the activations' block sums times 128 are subtracted
//! from the integer dot products, so the sums are exact before scaling.
//! The layout needs whole chunks of eight rows (`n % 8 == 0`: every model's
//! projections); other weights keep the natural layout.

use super::{BlockFormat, Blocks};

/// Blocks per group: one per i32 lane of a 512-bit vector.
const LANES: usize = 16;
/// Rows whose tail blocks share a group.
pub(super) const TAIL_ROWS: usize = 8;
/// Steps of four values in a 32-block.
const STEPS: usize = 8;

/// How a row of `blocks` 32-blocks divides into groups.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Shape {
    blocks: usize,
    /// Whole groups of sixteen blocks.
    groups: usize,
    /// Groups of the tail: two tail blocks of each of eight rows per group.
    tail_groups: usize,
}

impl Shape {
    fn new(k: usize) -> Shape {
        let blocks = k / 32;
        Shape { blocks, groups: blocks / LANES, tail_groups: (blocks % LANES).div_ceil(2) }
    }

    /// The first tail block of a row.
    fn tail_start(self) -> usize {
        self.groups * LANES
    }
}

/// Bytes of one group's values.
fn group_bytes(format: BlockFormat) -> usize {
    LANES * format.quant_bytes()
}

/// A weight `(n, k)` in the grouped layout (see the module's note).
#[derive(Debug)]
pub(super) struct Grouped {
    /// `(n, groups, group bytes)`: Q4_1, four runs of sixteen 4-byte lanes
    /// (run `q`, lane `b`: block `b`'s bytes `4q..4q + 4`, whose low nibbles
    /// are step `q` and high nibbles step `q + 4`); Q8_0, eight runs (run `s`
    /// = step `s`), values plus 128.
    main: Vec<u8>,
    /// `(n, blocks)`: f16 bits of the block scales, natural order.
    scales: Vec<u16>,
    /// `(n, blocks)`: f16 bits of Q4_1's minima; empty for Q8_0.
    mins: Vec<u16>,
    /// `(n / 8, tail groups, group bytes)`, lanes as in the module's note.
    tail: Vec<u8>,
    /// `(n / 8, tail groups, 16)`: the tail lanes' scales (0 past the tail).
    tail_scales: Vec<u16>,
    /// `(n / 8, tail groups, 16)`: the tail lanes' minima; empty for Q8_0.
    tail_mins: Vec<u16>,
    shape: Shape,
}

impl Grouped {
    /// Regroups natural blocks of an `(n, k)` weight; `None` unless `n % 8 == 0`.
    pub(super) fn new(format: BlockFormat, w: &Blocks, n: usize, k: usize) -> Option<Grouped> {
        if !n.is_multiple_of(TAIL_ROWS) {
            return None;
        }
        let shape = Shape::new(k);
        let (blocks, qb) = (shape.blocks, format.quant_bytes());
        let quants = |j: usize, b: usize| &w.quants[(j * blocks + b) * qb..(j * blocks + b + 1) * qb];
        let q4 = format == BlockFormat::Q4_1;
        let mut g = Grouped {
            main: Vec::with_capacity(n * shape.groups * group_bytes(format)),
            scales: w.scales.clone(),
            mins: w.mins.clone(),
            tail: Vec::new(),
            tail_scales: Vec::new(),
            tail_mins: Vec::new(),
            shape,
        };
        for j in 0..n {
            for group in 0..shape.groups {
                write_group(format, &mut g.main, |lane| Some(quants(j, group * LANES + lane)));
            }
        }
        for chunk in 0..n / TAIL_ROWS {
            for t in 0..shape.tail_groups {
                // Lane `l`: row `l mod 8`, tail block `2t + l / 8`, if there is one.
                let at = |lane: usize| {
                    let b = shape.tail_start() + 2 * t + lane / TAIL_ROWS;
                    (b < blocks).then_some((chunk * TAIL_ROWS + lane % TAIL_ROWS, b))
                };
                write_group(format, &mut g.tail, |lane| at(lane).map(|(j, b)| quants(j, b)));
                for lane in 0..LANES {
                    let (d, m) = at(lane).map_or((0, 0), |(j, b)| {
                        (w.scales[j * blocks + b], if q4 { w.mins[j * blocks + b] } else { 0 })
                    });
                    g.tail_scales.push(d);
                    if q4 {
                        g.tail_mins.push(m);
                    }
                }
            }
        }
        Some(g)
    }

    /// Stacks weights of one shape along the output dimension (whole chunks of eight rows each).
    pub(super) fn concat(parts: &[&Grouped]) -> Option<Grouped> {
        let shape = parts.first()?.shape;
        if parts.iter().any(|p| p.shape != shape) {
            return None;
        }
        let cat = |f: fn(&Grouped) -> &Vec<u8>| parts.iter().flat_map(|p| f(p).iter().copied()).collect();
        let cat16 = |f: fn(&Grouped) -> &Vec<u16>| parts.iter().flat_map(|p| f(p).iter().copied()).collect();
        Some(Grouped {
            main: cat(|p| &p.main),
            scales: cat16(|p| &p.scales),
            mins: cat16(|p| &p.mins),
            tail: cat(|p| &p.tail),
            tail_scales: cat16(|p| &p.tail_scales),
            tail_mins: cat16(|p| &p.tail_mins),
            shape,
        })
    }
}

/// Appends one group of the weight layout; `block(lane)` gives a lane's block
/// values (`None`: a zero block).
fn write_group<'a>(format: BlockFormat, out: &mut Vec<u8>, block: impl Fn(usize) -> Option<&'a [u8]>) {
    let runs = format.quant_bytes() / 4;
    for run in 0..runs {
        for lane in 0..LANES {
            match (format, block(lane)) {
                (BlockFormat::Q4_1, Some(q)) => out.extend_from_slice(&q[4 * run..4 * run + 4]),
                (BlockFormat::Q8_0, Some(q)) => out.extend(q[4 * run..4 * run + 4].iter().map(|v| v ^ 0x80)),
                (BlockFormat::Q4_1, None) => out.extend([0; 4]),
                (BlockFormat::Q8_0, None) => out.extend([0x80; 4]),
            }
        }
    }
}

/// Activation rows quantised to 8 bits per 32-block (the values of
/// [`super::quantize_natural`]) in the grouped layout.
pub(super) struct GroupedRows {
    /// `(m, groups, 8 steps, 16 lanes, 4)`.
    main: Vec<i8>,
    /// `(m, blocks)`: block scales `d`, `d · Σq`, and `128 · Σq`, natural order.
    d: Vec<f32>,
    s: Vec<f32>,
    sum128: Vec<i32>,
    /// `(m, tail groups, 8, 16, 4)`: lane `l` of tail group `t` holds tail block `2t + l / 8`.
    tail: Vec<i8>,
    /// `(m, tail groups, 16)`: `d`, `s` and `128 · Σq` of the tail lanes.
    tail_d: Vec<f32>,
    tail_s: Vec<f32>,
    tail_sum128: Vec<i32>,
    shape: Shape,
    /// Rows.
    m: usize,
}

impl GroupedRows {
    /// Quantises `x (m, k)`.
    pub(super) fn quantize(x: &[f32], m: usize, k: usize) -> GroupedRows {
        #[cfg(target_arch = "x86_64")]
        if super::Isa::detect() == super::Isa::Vnni {
            // SAFETY: the CPU has AVX-512 F and DQ (part of what `detect` checks for VNNI).
            return unsafe { quantize_avx512(x, m, k) };
        }
        GroupedRows::quantize_reference(x, m, k)
    }

    /// [`GroupedRows::quantize`] through [`super::quantize_natural`]: the values the vector path must give.
    fn quantize_reference(x: &[f32], m: usize, k: usize) -> GroupedRows {
        let (q, d, s) = super::quantize_natural(x, m, k);
        let mut rows = GroupedRows::zeros(m, k);
        let blocks = rows.shape.blocks;
        for (at, block) in q.chunks_exact(32).enumerate() {
            let sum: i32 = block.iter().map(|&v| v as i32).sum();
            rows.place(at / blocks, at % blocks, block, d[at], s[at], 128 * sum);
        }
        rows
    }

    /// All values zero (and so every padded tail lane).
    fn zeros(m: usize, k: usize) -> GroupedRows {
        let shape = Shape::new(k);
        let tail_lanes = m * shape.tail_groups * LANES;
        GroupedRows {
            main: vec![0; m * shape.groups * LANES * 32],
            d: vec![0.0; m * shape.blocks],
            s: vec![0.0; m * shape.blocks],
            sum128: vec![0; m * shape.blocks],
            tail: vec![0; tail_lanes * 32],
            tail_d: vec![0.0; tail_lanes],
            tail_s: vec![0.0; tail_lanes],
            tail_sum128: vec![0; tail_lanes],
            shape,
            m,
        }
    }

    /// Puts block `b` of row `i` (its 32 values, scale `d`, `d · Σq` and
    /// `128 · Σq`) where the layout keeps it: eight 4-byte runs, one per
    /// step, in the block's lane of its group; a tail block in each of its
    /// eight lanes.
    #[inline(always)]
    fn place(&mut self, i: usize, b: usize, q: &[i8], d: f32, s: f32, sum128: i32) {
        let shape = self.shape;
        let natural = i * shape.blocks + b;
        (self.d[natural], self.s[natural], self.sum128[natural]) = (d, s, sum128);
        let run = |step: usize| &q[step * 4..step * 4 + 4];
        if b < shape.tail_start() {
            let group = (i * shape.groups + b / LANES) * STEPS;
            for step in 0..STEPS {
                self.main[((group + step) * LANES + b % LANES) * 4..][..4].copy_from_slice(run(step));
            }
        } else {
            let (t, half) = ((b - shape.tail_start()) / 2, (b - shape.tail_start()) % 2);
            let at = (i * shape.tail_groups + t) * LANES;
            for lane in half * TAIL_ROWS..(half + 1) * TAIL_ROWS {
                for step in 0..STEPS {
                    self.tail[((at * STEPS) + step * LANES + lane) * 4..][..4].copy_from_slice(run(step));
                }
                (self.tail_d[at + lane], self.tail_s[at + lane], self.tail_sum128[at + lane]) = (d, s, sum128);
            }
        }
    }
}

/// [`GroupedRows::quantize`] with AVX-512: each block's scale, rounding
/// (halves away from zero, as [`super::quantize_blocks`]), sum and bytes in
/// vector registers, put straight into the layout.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512dq")]
unsafe fn quantize_avx512(x: &[f32], m: usize, k: usize) -> GroupedRows {
    use std::arch::x86_64::*;
    let mut rows = GroupedRows::zeros(m, k);
    let (sign, below_half) = (_mm512_set1_ps(-0.0), _mm512_set1_ps(0.49999997));
    for (at, xs) in x[..m * k].chunks_exact(32).enumerate() {
        let v = [_mm512_loadu_ps(xs.as_ptr()), _mm512_loadu_ps(xs.as_ptr().add(16))];
        let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v[0]), _mm512_abs_ps(v[1])));
        let scale = amax / 127.0;
        let inv = _mm512_set1_ps(if scale > 0.0 { 1.0 / scale } else { 0.0 });
        // round(y) = trunc(y ± (0.5 − ulp/2)): exact for every f32, ties away from zero.
        let round = |v: __m512| {
            let y = _mm512_mul_ps(v, inv);
            _mm512_cvttps_epi32(_mm512_add_ps(y, _mm512_or_ps(_mm512_and_ps(y, sign), below_half)))
        };
        let (lo, hi) = (round(v[0]), round(v[1]));
        let sum = _mm512_reduce_add_epi32(_mm512_add_epi32(lo, hi));
        let mut q = [0i8; 32];
        _mm_storeu_si128(q.as_mut_ptr() as *mut __m128i, _mm512_cvtepi32_epi8(lo));
        _mm_storeu_si128(q.as_mut_ptr().add(16) as *mut __m128i, _mm512_cvtepi32_epi8(hi));
        let blocks = rows.shape.blocks;
        rows.place(at / blocks, at % blocks, &q, scale, scale * sum as f32, 128 * sum);
    }
    rows
}

/// The kernel: `vpdpbusd` over whole groups.
#[cfg(target_arch = "x86_64")]
pub(super) mod vnni {
    use super::{BlockFormat, Grouped, GroupedRows, LANES, STEPS, TAIL_ROWS};
    use crate::kernels::avx::{add_halves, hsums};
    use crate::kernels::Columns;
    use std::arch::x86_64::*;

    /// How far ahead of a group the weight stream is prefetched (bytes).
    const PREFETCH: usize = 4096;

    /// Where one kind of group (main or tail) keeps its activations: the
    /// values and the per-lane `d`, `s`, `128 · Σq` of activation row 0, and
    /// how far apart consecutive rows are.
    #[derive(Clone, Copy)]
    struct Lanes {
        q: *const i8,
        d: *const f32,
        s: *const f32,
        sum128: *const i32,
        /// Elements from one activation row's values to the next's.
        q_row: usize,
        /// Elements from one activation row's lane numbers to the next's.
        lane_row: usize,
    }

    impl Lanes {
        /// The lanes `q` values and `lanes` lane numbers further on.
        fn at(self, q: usize, lanes: usize) -> Lanes {
            Lanes {
                q: self.q.wrapping_add(q),
                d: self.d.wrapping_add(lanes),
                s: self.s.wrapping_add(lanes),
                sum128: self.sum128.wrapping_add(lanes),
                ..self
            }
        }
    }

    /// Weight rows `j0..j0 + rows` (multiples of eight) times every
    /// activation row, into columns `j0..j0 + rows` of `out`.
    ///
    /// # Safety
    /// The CPU has AVX2, FMA, F16C and AVX-512 F, BW, DQ, VL and VNNI; `w` and
    /// `x` come from one `k`; `out` is `(m, n)` for `x`'s `m` rows and the
    /// weight's `n` ≥ `j0 + rows`, and no other task writes these columns.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")]
    pub(in crate::kernels) unsafe fn rows(
        format: BlockFormat,
        w: &Grouped,
        j0: usize,
        rows: usize,
        out: Columns,
        x: &GroupedRows,
    ) {
        match format {
            BlockFormat::Q4_1 => rows_of::<false>(w, j0, rows, out, x),
            BlockFormat::Q8_0 => rows_of::<true>(w, j0, rows, out, x),
        }
    }

    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")]
    unsafe fn rows_of<const Q8: bool>(w: &Grouped, j0: usize, rows: usize, out: Columns, x: &GroupedRows) {
        let mut first = 0;
        while first < x.m {
            first += match x.m - first {
                8.. => rows_for::<Q8, 8>(w, j0, rows, out, x, first),
                4.. => rows_for::<Q8, 4>(w, j0, rows, out, x, first),
                2.. => rows_for::<Q8, 2>(w, j0, rows, out, x, first),
                _ => rows_for::<Q8, 1>(w, j0, rows, out, x, first),
            };
        }
    }

    /// Activation rows `first..first + R` against weight rows `j0..j0 + rows`;
    /// returns `R`.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")]
    unsafe fn rows_for<const Q8: bool, const R: usize>(
        w: &Grouped,
        j0: usize,
        rows: usize,
        out: Columns,
        x: &GroupedRows,
        first: usize,
    ) -> usize {
        let shape = w.shape;
        debug_assert_eq!(shape, x.shape, "weights and activations of one k");
        debug_assert!(j0.is_multiple_of(TAIL_ROWS) && rows.is_multiple_of(TAIL_ROWS));
        let gb = LANES * if Q8 { 32 } else { 16 };
        let main = Lanes {
            q: x.main.as_ptr(),
            d: x.d.as_ptr(),
            s: x.s.as_ptr(),
            sum128: x.sum128.as_ptr(),
            q_row: shape.groups * STEPS * LANES * 4,
            lane_row: shape.blocks,
        }
        .at(first * shape.groups * STEPS * LANES * 4, first * shape.blocks);
        for v in 0..rows {
            let j = j0 + v;
            let mut acc = [_mm512_setzero_ps(); R];
            for group in 0..shape.groups {
                let at = j * shape.blocks + group * LANES;
                let here = w.main.as_ptr().add((j * shape.groups + group) * gb);
                for line in (0..gb).step_by(64) {
                    _mm_prefetch::<_MM_HINT_T0>(here.wrapping_add(PREFETCH + line) as *const i8);
                }
                _mm_prefetch::<_MM_HINT_T0>(w.scales.as_ptr().wrapping_add(at + PREFETCH / 8) as *const i8);
                if !Q8 {
                    _mm_prefetch::<_MM_HINT_T0>(w.mins.as_ptr().wrapping_add(at + PREFETCH / 8) as *const i8);
                }
                let wv = weights::<Q8>(here);
                let mins = if Q8 { std::ptr::null() } else { w.mins.as_ptr().add(at) };
                let lanes = main.at(group * STEPS * LANES * 4, group * LANES);
                add_group::<Q8, R>(&wv, w.scales.as_ptr().add(at), mins, lanes, &mut acc);
            }
            let mut narrow = [_mm256_setzero_ps(); R];
            add_halves(&mut narrow, acc);
            for (r, sum) in hsums(narrow).into_iter().enumerate() {
                out.set(first + r, j, sum);
            }
        }
        if shape.tail_groups > 0 {
            let tail = Lanes {
                q: x.tail.as_ptr(),
                d: x.tail_d.as_ptr(),
                s: x.tail_s.as_ptr(),
                sum128: x.tail_sum128.as_ptr(),
                q_row: shape.tail_groups * STEPS * LANES * 4,
                lane_row: shape.tail_groups * LANES,
            }
            .at(first * shape.tail_groups * STEPS * LANES * 4, first * shape.tail_groups * LANES);
            for c in 0..rows / TAIL_ROWS {
                let chunk = j0 / TAIL_ROWS + c;
                let mut acc = [_mm512_setzero_ps(); R];
                for t in 0..shape.tail_groups {
                    let g = chunk * shape.tail_groups + t;
                    let wv = weights::<Q8>(w.tail.as_ptr().add(g * gb));
                    let mins = if Q8 { std::ptr::null() } else { w.tail_mins.as_ptr().add(g * LANES) };
                    let lanes = tail.at(t * STEPS * LANES * 4, t * LANES);
                    add_group::<Q8, R>(&wv, w.tail_scales.as_ptr().add(g * LANES), mins, lanes, &mut acc);
                }
                // Lanes l and l + 8 belong to row l of the chunk.
                for (r, acc) in acc.iter().enumerate() {
                    let mut eight = [0f32; TAIL_ROWS];
                    let halves = _mm256_add_ps(_mm512_castps512_ps256(*acc), _mm512_extractf32x8_ps::<1>(*acc));
                    _mm256_storeu_ps(eight.as_mut_ptr(), halves);
                    for (v, e) in eight.into_iter().enumerate() {
                        out.add(first + r, chunk * TAIL_ROWS + v, e);
                    }
                }
            }
        }
        R
    }

    /// A group's weight vectors, step by step (Q4_1: the low nibbles of run
    /// `q` are step `q`, the high nibbles step `q + 4`).
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")]
    #[inline]
    unsafe fn weights<const Q8: bool>(p: *const u8) -> [__m512i; STEPS] {
        let mut v = [_mm512_setzero_si512(); STEPS];
        if Q8 {
            for (s, v) in v.iter_mut().enumerate() {
                *v = _mm512_loadu_si512(p.add(64 * s) as *const _);
            }
        } else {
            let nibble = _mm512_set1_epi8(0x0F);
            for q in 0..STEPS / 2 {
                let packed = _mm512_loadu_si512(p.add(64 * q) as *const _);
                v[q] = _mm512_and_si512(packed, nibble);
                v[q + STEPS / 2] = _mm512_and_si512(_mm512_srli_epi16::<4>(packed), nibble);
            }
        }
        v
    }

    /// Adds one group's terms for `R` activation rows to `acc`: per lane,
    /// `d_w · d_x · Σ q_w q_x`, plus `m_w · d_x Σ q_x` for Q4_1 (Q8_0's
    /// stored `q_w + 128` is corrected in the integer sum).
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")]
    #[inline]
    unsafe fn add_group<const Q8: bool, const R: usize>(
        wv: &[__m512i; STEPS],
        scales: *const u16,
        mins: *const u16,
        x: Lanes,
        acc: &mut [__m512; R],
    ) {
        let dw = _mm512_cvtph_ps(_mm256_loadu_si256(scales as *const __m256i));
        let mw = if Q8 { _mm512_setzero_ps() } else { _mm512_cvtph_ps(_mm256_loadu_si256(mins as *const __m256i)) };
        for (r, acc) in acc.iter_mut().enumerate() {
            let y = x.q.add(r * x.q_row);
            // Two chains of four, so that the products of a row overlap.
            let (mut even, mut odd) = (_mm512_setzero_si512(), _mm512_setzero_si512());
            for s in (0..STEPS).step_by(2) {
                even = _mm512_dpbusd_epi32(even, wv[s], _mm512_loadu_si512(y.add(64 * s) as *const _));
                odd = _mm512_dpbusd_epi32(odd, wv[s + 1], _mm512_loadu_si512(y.add(64 * s + 64) as *const _));
            }
            let mut dot = _mm512_add_epi32(even, odd);
            let at = r * x.lane_row;
            if Q8 {
                dot = _mm512_sub_epi32(dot, _mm512_loadu_si512(x.sum128.add(at) as *const _));
            }
            let t = _mm512_mul_ps(_mm512_cvtepi32_ps(dot), _mm512_loadu_ps(x.d.add(at)));
            *acc = _mm512_fmadd_ps(dw, t, *acc);
            if !Q8 {
                *acc = _mm512_fmadd_ps(mw, _mm512_loadu_ps(x.s.add(at)), *acc);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::GroupedRows;

    #[test]
    fn vector_quantisation_gives_the_reference_layout() {
        #[cfg(target_arch = "x86_64")]
        if super::super::Isa::detect() == super::super::Isa::Vnni {
            // Whole groups and tails of 1, 2 and 12 blocks; a zero block and exact halves.
            for (m, k) in [(3, 576), (2, 32), (5, 896), (1, 1536), (8, 96)] {
                let mut x: Vec<f32> = (0..m * k).map(|i| ((i * 7919 + 13) % 2001) as f32 / 1000.0 - 1.0).collect();
                x[..32].iter_mut().for_each(|v| *v = 0.0);
                if x.len() >= 64 {
                    x[32..64].iter_mut().enumerate().for_each(|(i, v)| *v = i as f32 - 15.5);
                    x[40] = 127.0;
                }
                let (a, b) = (GroupedRows::quantize_reference(&x, m, k), unsafe { super::quantize_avx512(&x, m, k) });
                assert_eq!(
                    (&a.main, &a.tail, &a.sum128, &a.tail_sum128),
                    (&b.main, &b.tail, &b.sum128, &b.tail_sum128)
                );
                assert_eq!((&a.d, &a.s, &a.tail_d, &a.tail_s), (&b.d, &b.s, &b.tail_d, &b.tail_s));
            }
        }
    }
}
