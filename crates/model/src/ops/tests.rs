//! Every op against its composed candle equivalent: values and gradients.

use super::*;
use candle_core::{DType, Device, Tensor, Var, D};

fn randn(shape: &[usize], seed: u64) -> Tensor {
    // Deterministic pseudo-random values in [-1, 1).
    let n: usize = shape.iter().product();
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    let v: Vec<f32> = (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

/// Central finite differences of `sum(f(x) * probe)` against autograd.
fn check_grad(x0: &Tensor, f: impl Fn(&Tensor) -> Tensor) {
    let x = Var::from_tensor(x0).unwrap();
    let probe = randn(f(x0).dims(), 99);
    let loss = (f(x.as_tensor()) * &probe).unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    let g = grads.get(x.as_tensor()).expect("x gets a gradient").flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let flat = x0.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let eps = 1e-2f32;
    for i in (0..flat.len()).step_by((flat.len() / 12).max(1)) {
        let eval = |delta: f32| {
            let mut v = flat.clone();
            v[i] += delta;
            let xt = Tensor::from_vec(v, x0.dims(), &Device::Cpu).unwrap();
            (f(&xt) * &probe).unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap()
        };
        let fd = (eval(eps) - eval(-eps)) / (2.0 * eps);
        assert!(
            (fd - g[i]).abs() <= 2e-2 * fd.abs().max(1.0),
            "element {i}: finite difference {fd}, autograd {}",
            g[i]
        );
    }
}

#[test]
fn fast_and_differentiable_paths_agree() {
    let x = randn(&[2, 3, 4, 8], 1);
    let w = (randn(&[8], 2) + 1.5).unwrap();
    let xv = Var::from_tensor(&x).unwrap();
    assert!(max_diff(&rms_norm(&x, &w, 1e-5).unwrap(), &rms_norm(xv.as_tensor(), &w, 1e-5).unwrap()) < 1e-5);
    assert!(max_diff(&softmax_last(&x).unwrap(), &softmax_last(xv.as_tensor()).unwrap()) < 1e-6);
    let cos = randn(&[2, 4, 4], 3);
    let sin = randn(&[2, 4, 4], 4);
    assert!(max_diff(&rope_half(&x, &cos, &sin).unwrap(), &rope_half(xv.as_tensor(), &cos, &sin).unwrap()) < 1e-6);
    // The hand-written backwards give the composed versions' gradients.
    let probe = randn(&[2, 3, 4, 8], 6);
    let grad_of = |y: Tensor| (y * &probe).unwrap().sum_all().unwrap().backward().unwrap();
    let pairs = [
        (rms_norm(xv.as_tensor(), &w, 1e-5).unwrap(), rms_norm_composed(xv.as_tensor(), &w, 1e-5).unwrap()),
        (rope_half(xv.as_tensor(), &cos, &sin).unwrap(), rope_half_composed(xv.as_tensor(), &cos, &sin).unwrap()),
    ];
    for (fused, composed) in pairs {
        let (a, b) = (grad_of(fused), grad_of(composed));
        assert!(max_diff(a.get(xv.as_tensor()).unwrap(), b.get(xv.as_tensor()).unwrap()) < 1e-5);
    }
    let wl = randn(&[5, 8], 5);
    let direct = x.broadcast_matmul(&wl.t().unwrap()).unwrap();
    assert!(max_diff(&frozen_linear(xv.as_tensor(), &wl.t().unwrap()).unwrap(), &direct) < 1e-5);
}

#[test]
fn differentiable_paths_match_finite_differences() {
    let w = (randn(&[8], 2) + 1.5).unwrap();
    check_grad(&randn(&[2, 3, 8], 7), |x| rms_norm(x, &w, 1e-5).unwrap());
    check_grad(&randn(&[2, 5], 8), |x| softmax_last(x).unwrap());
    let cos = randn(&[1, 3, 4], 3);
    let sin = randn(&[1, 3, 4], 4);
    check_grad(&randn(&[1, 2, 3, 8], 9), |x| rope_half(x, &cos, &sin).unwrap());
}

#[test]
fn attention_matches_the_composed_version_and_finite_differences() {
    let (b, kv, g, t, d) = (2, 2, 2, 3, 4);
    let q = randn(&[b, kv, g * t, d], 31);
    let k = randn(&[b, kv, t, d], 32);
    let v = randn(&[b, kv, t, d], 33);
    let mask = crate::causal_mask(b, t, 0, &Device::Cpu).unwrap();
    let composed = |q: &Tensor, k: &Tensor, v: &Tensor| {
        let sc = (q.matmul(&k.t().unwrap()).unwrap() * 0.5).unwrap();
        let sc = sc
            .reshape((b, kv, g, t, t))
            .unwrap()
            .broadcast_add(&mask.reshape((b, 1, 1, t, t)).unwrap())
            .unwrap()
            .reshape((b, kv, g * t, t))
            .unwrap();
        candle_nn::ops::softmax(&sc, D::Minus1).unwrap().matmul(v).unwrap()
    };
    let qv = Var::from_tensor(&q).unwrap();
    assert!(max_diff(&attention(qv.as_tensor(), &k, &v, Some(&mask), 0.5).unwrap(), &composed(&q, &k, &v)) < 1e-5);
    // Without a mask: the plain softmax of the scores.
    let unmasked = candle_nn::ops::softmax(&(q.matmul(&k.t().unwrap()).unwrap() * 0.5).unwrap(), D::Minus1)
        .unwrap()
        .matmul(&v)
        .unwrap();
    assert!(max_diff(&attention(&q, &k, &v, None, 0.5).unwrap(), &unmasked) < 1e-5);
    check_grad(&q, |x| attention(x, &k, &v, Some(&mask), 0.5).unwrap());
    check_grad(&k, |x| attention(&q, x, &v, Some(&mask), 0.5).unwrap());
    check_grad(&v, |x| attention(&q, &k, x, Some(&mask), 0.5).unwrap());
    // All three at once, as in the model.
    let (kv_, vv) = (Var::from_tensor(&k).unwrap(), Var::from_tensor(&v).unwrap());
    let probe = randn(&[b, kv, g * t, d], 34);
    let ours = (attention(qv.as_tensor(), kv_.as_tensor(), vv.as_tensor(), Some(&mask), 0.5).unwrap() * &probe)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let reference = (composed(qv.as_tensor(), kv_.as_tensor(), vv.as_tensor()) * &probe)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    for x in [qv.as_tensor(), kv_.as_tensor(), vv.as_tensor()] {
        assert!(max_diff(ours.get(x).unwrap(), reference.get(x).unwrap()) < 1e-5);
    }
}

#[test]
fn decoding_attention_reads_a_cache_view_and_matches_the_composed_version() {
    // Keys/values as views of a larger cache (rows contiguous, heads apart),
    // a padded-row mask, one and several query positions, AVX-512 (D = 16..128: key counts
    // below, at and past sixteen), AVX2 (D = 8, 256) and portable (D = 4) dot products.
    for (b, kv, g, t, s, d) in [
        (2, 3, 3, 1, 11, 16),
        (2, 2, 2, 3, 5, 4),
        (1, 2, 2, 4, 19, 8),
        (1, 2, 3, 1, 9, 128),
        (2, 3, 3, 1, 37, 64),
        (1, 2, 4, 2, 32, 32),
        (1, 2, 2, 1, 20, 256),
    ] {
        let q = randn(&[b, kv, g * t, d], 41);
        let k = randn(&[b, kv, s + 4, d], 42).narrow(2, 0, s).unwrap();
        let v = randn(&[b, kv, s + 4, d], 43).narrow(2, 0, s).unwrap();
        assert!(!k.is_contiguous());
        let valid: Vec<Vec<bool>> = (0..b).map(|r| (0..s).map(|j| j >= r).collect()).collect();
        let mask = crate::padded_causal_mask(&valid, t, s - t, &Device::Cpu).unwrap();
        let sc = (q.matmul(&k.t().unwrap()).unwrap() * 0.25).unwrap();
        let sc = sc
            .reshape((b, kv, g, t, s))
            .unwrap()
            .broadcast_add(&mask.reshape((b, 1, 1, t, s)).unwrap())
            .unwrap()
            .reshape((b, kv, g * t, s))
            .unwrap();
        let want = candle_nn::ops::softmax(&sc, D::Minus1).unwrap().matmul(&v.contiguous().unwrap()).unwrap();
        let got = few_query_attention(&q, &k, &v, Some(&mask), 0.25).unwrap().expect("takes the fast path");
        assert!(max_diff(&got, &want) < 1e-5, "{}", max_diff(&got, &want));
        assert!(max_diff(&attention(&q, &k, &v, Some(&mask), 0.25).unwrap(), &want) < 1e-5);
        // An f16 cache (views of it, as the cache hands out) gives the f32
        // result of its rounded values, on every kernel.
        let to_f16 = |x: &Tensor| to_dtype(&x.contiguous().unwrap(), DType::F16).unwrap();
        let (k16, v16) = (to_f16(&randn(&[b, kv, s + 4, d], 42)), to_f16(&randn(&[b, kv, s + 4, d], 43)));
        let (k16, v16) = (k16.narrow(2, 0, s).unwrap(), v16.narrow(2, 0, s).unwrap());
        let (kr, vr) = (k16.to_dtype(DType::F32).unwrap(), v16.to_dtype(DType::F32).unwrap());
        let want = few_query_attention(&q, &kr, &vr, Some(&mask), 0.25).unwrap().unwrap();
        let got = few_query_attention(&q, &k16, &v16, Some(&mask), 0.25).unwrap().expect("reads f16 in place");
        assert!(max_diff(&got, &want) < 1e-6, "f16, d = {d}: {}", max_diff(&got, &want));
        assert!(max_diff(&attention(&q, &k16, &v16, Some(&mask), 0.25).unwrap(), &want) < 1e-5);
    }
}

#[test]
fn rotated_heads_match_the_composed_ops() {
    // A fused projection's parts are views (rows apart); one decoding
    // step and a prompt long enough to run in parallel; both layouts,
    // with and without the q/k norm.
    for (b, t, n, d) in [(3, 1, 4, 16), (2, 40, 4, 64)] {
        let fused = randn(&[b, t, (n + 2) * d], 61);
        let y = fused.narrow(2, d, n * d).unwrap();
        assert!(!y.is_contiguous());
        let angles = (randn(&[b, t, d / 2], 62) * 3.0).unwrap();
        let (cos, sin) = (angles.cos().unwrap(), angles.sin().unwrap());
        let w = (randn(&[d], 63) + 1.5).unwrap();
        for interleaved in [false, true] {
            for norm in [None, Some((&w, 1e-6))] {
                let got = rotated_heads(&y, d, norm, &cos, &sin, interleaved).unwrap().expect("CPU f32");
                let mut h = y.reshape((b, t, n, d)).unwrap().transpose(1, 2).unwrap().contiguous().unwrap();
                if let Some((w, eps)) = norm {
                    h = rms_norm(&h, w, eps).unwrap();
                }
                let want = if interleaved {
                    rope_interleaved(&h, &cos, &sin).unwrap()
                } else {
                    rope_half(&h, &cos, &sin).unwrap()
                };
                assert_eq!(got.dims(), &[b, n, t, d]);
                assert!(max_diff(&got, &want) < 1e-6, "{}", max_diff(&got, &want));
            }
        }
        // With a graph, the caller composes the ops.
        let yv = Var::from_tensor(&y.contiguous().unwrap()).unwrap();
        assert!(rotated_heads(yv.as_tensor(), d, None, &cos, &sin, false).unwrap().is_none());
    }
}

#[test]
fn f16_conversions_match_candles() {
    let x = (randn(&[3, 70], 5) * 1e3).unwrap();
    let x = Tensor::cat(&[x, Tensor::new(&[[65504f32, 65520.0, 1e-8, -0.0, f32::NAN]; 3], &Device::Cpu).unwrap()], 1)
        .unwrap();
    let ours = to_dtype(&x, DType::F16).unwrap().to_vec2::<half::f16>().unwrap();
    let candle = x.to_dtype(DType::F16).unwrap().to_vec2::<half::f16>().unwrap();
    let bits = |v: &Vec<Vec<half::f16>>| v.iter().flatten().map(|h| h.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&ours), bits(&candle));
    // And back: f16 to f32 is exact, as candle's.
    let h = x.to_dtype(DType::F16).unwrap();
    let back = |t: Tensor| t.to_vec2::<f32>().unwrap().concat().iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    assert_eq!(back(to_dtype(&h, DType::F32).unwrap()), back(h.to_dtype(DType::F32).unwrap()));
    // A strided view converts as its contiguous copy.
    let t = x.t().unwrap();
    assert_eq!(bits(&to_dtype(&t, DType::F16).unwrap().t().unwrap().to_vec2::<half::f16>().unwrap()), bits(&candle));
}

#[test]
fn token_logprobs_match_log_softmax_and_finite_differences() {
    let w = randn(&[11, 6], 21);
    let b = randn(&[11], 22);
    let targets = [3u32, 0, 10, 7, 7];
    let h = randn(&[5, 6], 23);
    let plain = |h: &Tensor| {
        let l = h.matmul(&w.t().unwrap()).unwrap().broadcast_add(&b).unwrap();
        let lp = candle_nn::ops::log_softmax(&l, D::Minus1).unwrap();
        let t = Tensor::new(&targets, &Device::Cpu).unwrap().unsqueeze(1).unwrap();
        lp.gather(&t, 1).unwrap().squeeze(1).unwrap()
    };
    for chunk in [1, 2, 5, 64] {
        let hv = Var::from_tensor(&h).unwrap();
        assert!(max_diff(&token_logprobs(hv.as_tensor(), &w, Some(&b), &targets, chunk).unwrap(), &plain(&h)) < 1e-5);
        check_grad(&h, |x| token_logprobs(x, &w, Some(&b), &targets, chunk).unwrap());
    }
    // The weight is frozen: no gradient is computed for it.
    let hv = Var::from_tensor(&h).unwrap();
    let grads = token_logprobs(hv.as_tensor(), &w, None, &targets, 2).unwrap().sum_all().unwrap().backward().unwrap();
    assert!(grads.get(&w).is_none() && grads.get(hv.as_tensor()).is_some());
    let sums = logit_sums(&h, &w, Some(&b)).unwrap();
    let direct = h.matmul(&w.t().unwrap()).unwrap().broadcast_add(&b).unwrap().sum(1).unwrap();
    assert!(max_diff(&sums, &direct) < 1e-4);
}

#[test]
fn frozen_linear_backward_matches_finite_differences_and_skips_the_weight() {
    let w = randn(&[6, 8], 11);
    let wt = w.t().unwrap();
    check_grad(&randn(&[2, 3, 8], 12), |x| frozen_linear(x, &wt).unwrap());
    // The weight is no node of the graph: no gradient is computed for it.
    let x = Var::from_tensor(&randn(&[3, 8], 13)).unwrap();
    let grads = frozen_linear(x.as_tensor(), &wt).unwrap().sum_all().unwrap().backward().unwrap();
    assert!(grads.get(&wt).is_none() && grads.get(&w).is_none());
    assert!(grads.get(x.as_tensor()).is_some());
    // A weight that is a variable (a tied, trained embedding) gets its gradient.
    let wv = Var::from_tensor(&w).unwrap();
    let grads =
        frozen_linear(x.as_tensor(), &wv.as_tensor().t().unwrap()).unwrap().sum_all().unwrap().backward().unwrap();
    assert!(grads.get(wv.as_tensor()).is_some());
}

/// `(B, T, T)` masks: row 0 causal, row 1 laid out as a preference pair
/// `[prompt 100 | chosen 50 | rejected 50]` (each completion sees the
/// prompt and itself), its last 10 slots padding that sees slot 0 only.
fn pair_masks(t: usize) -> Tensor {
    let mut m = vec![f32::NEG_INFINITY; 2 * t * t];
    for q in 0..t {
        m[q * t..q * t + q + 1].fill(0.0);
        let row = &mut m[(t + q) * t..(t + q + 1) * t];
        match q {
            _ if q >= t - 10 => row[0] = 0.0,
            _ if q < 100 => row[..=q].fill(0.0),
            _ if q < 150 => {
                row[..100].fill(0.0);
                row[100..=q].fill(0.0);
            }
            _ => {
                row[..100].fill(0.0);
                row[150..=q].fill(0.0);
            }
        }
    }
    Tensor::from_vec(m, (2, t, t), &Device::Cpu).unwrap()
}

#[test]
fn span_limited_attention_gives_the_dense_values_and_gradients() {
    let (b, kv, g, t, d) = (2, 2, 3, 200, 8);
    let mask = pair_masks(t);
    let plan = SpanPlan::of(&mask, g * t).unwrap().expect("these masks hide over a quarter of the scores");
    assert_eq!(plan.blocks[1].iter().map(|b| b.2).collect::<Vec<_>>(), vec![64, 128, 190, 1]);
    let zeros = Tensor::zeros((b, t, t), candle_core::DType::F32, &Device::Cpu).unwrap();
    assert!(SpanPlan::of(&zeros, g * t).unwrap().is_none(), "nothing to skip");
    let (q, k, v) = (randn(&[b, kv, g * t, d], 41), randn(&[b, kv, t, d], 42), randn(&[b, kv, t, d], 43));
    let probe = randn(&[b, kv, g * t, d], 44);
    let run = |plan: Option<&SpanPlan>| {
        let vars = [&q, &k, &v].map(|x| Var::from_tensor(x).unwrap());
        let [qv, kv_, vv] = vars.each_ref().map(|x| x.as_tensor());
        let out = attention_with(qv, kv_, vv, Some(&mask), 0.3, plan).unwrap();
        let grads = (&out * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        (out, [qv, kv_, vv].map(|x| grads.get(x).unwrap().clone()))
    };
    let (dense, dense_grads) = run(None);
    let (spans, span_grads) = run(Some(&plan));
    assert!(max_diff(&dense, &spans) < 1e-5);
    for (a, b) in dense_grads.iter().zip(&span_grads) {
        assert!(max_diff(a, b) < 1e-5, "gradients differ by {}", max_diff(a, b));
    }
    // Untracked, as in inference and the first checkpointed pass.
    assert!(max_diff(&attention(&q, &k, &v, Some(&mask), 0.3).unwrap(), &dense) < 1e-5);
    check_grad(&k, |x| attention(&q, x, &v, Some(&mask), 0.3).unwrap());
}

/// The values and the three gradients of `f(q, k, v)` under the output probe.
fn with_grads(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    probe: &Tensor,
    f: impl Fn(&Tensor, &Tensor, &Tensor) -> Tensor,
) -> (Tensor, [Tensor; 3]) {
    let vars = [q, k, v].map(|x| Var::from_tensor(x).unwrap());
    let [qv, kv_, vv] = vars.each_ref().map(|x| x.as_tensor());
    let out = f(qv, kv_, vv);
    let grads = (&out * probe).unwrap().sum_all().unwrap().backward().unwrap();
    (out, [qv, kv_, vv].map(|x| grads.get(x).unwrap().clone()))
}

#[test]
fn blocked_attention_gives_the_dense_values_and_gradients() {
    if !crate::kernels::flash::available(16) {
        eprintln!("skipped: no AVX-512F here (the blocked kernels need it)");
        return;
    }
    // (heads of 16 and 64 values; 200 query rows: six full tiles of 32 and
    // a partial one, two partial key tiles), the preference and causal masks
    // of `pair_masks` with padding rows, and no mask.
    for (kv, g, t, d, masked) in [(2, 3, 200, 16, true), (1, 2, 200, 64, true), (2, 2, 45, 32, false)] {
        let b = 2;
        let mask = masked.then(|| pair_masks(t));
        let seed = (d * 10 + t) as u64;
        let (q, k, v) =
            (randn(&[b, kv, g * t, d], seed), randn(&[b, kv, t, d], seed + 1), randn(&[b, kv, t, d], seed + 2));
        let probe = randn(&[b, kv, g * t, d], seed + 3);
        let (dense, dense_grads) =
            with_grads(&q, &k, &v, &probe, |q, k, v| attention_with(q, k, v, mask.as_ref(), 0.3, None).unwrap());
        let (blocked, blocked_grads) = with_grads(&q, &k, &v, &probe, |q, k, v| {
            flash_attention(q, k, v, mask.as_ref(), 0.3).unwrap().expect("takes the blocked kernels")
        });
        assert!(max_diff(&dense, &blocked) < 1e-5, "values differ by {}", max_diff(&dense, &blocked));
        for (name, (a, b)) in ["dq", "dk", "dv"].iter().zip(dense_grads.iter().zip(&blocked_grads)) {
            assert!(max_diff(a, b) < 1e-4, "{name} differs by {} (d = {d}, t = {t})", max_diff(a, b));
        }
        // Without a graph (the checkpointed first pass): the same values as with one.
        assert!(max_diff(&blocked_attention(&q, &k, &v, mask.as_ref(), 0.3).unwrap(), &blocked) == 0.0);
    }
    // More keys than queries (queries at the end of a longer row), causal.
    let (b, kv, g, t, s, d) = (1, 2, 2, 40, 300, 16);
    let mask = crate::causal_mask(b, t, s - t, &Device::Cpu).unwrap();
    let (q, k, v) = (randn(&[b, kv, g * t, d], 91), randn(&[b, kv, s, d], 92), randn(&[b, kv, s, d], 93));
    let probe = randn(&[b, kv, g * t, d], 94);
    let (dense, dense_grads) =
        with_grads(&q, &k, &v, &probe, |q, k, v| attention_with(q, k, v, Some(&mask), 0.25, None).unwrap());
    let (blocked, blocked_grads) = with_grads(&q, &k, &v, &probe, |q, k, v| {
        flash_attention(q, k, v, Some(&mask), 0.25).unwrap().expect("takes the blocked kernels")
    });
    assert!(max_diff(&dense, &blocked) < 1e-5);
    for (a, b) in dense_grads.iter().zip(&blocked_grads) {
        assert!(max_diff(a, b) < 1e-4, "gradients differ by {}", max_diff(a, b));
    }
    // Finite differences on a small case.
    let (q, k, v) = (randn(&[1, 1, 2 * 40, 16], 95), randn(&[1, 1, 40, 16], 96), randn(&[1, 1, 40, 16], 97));
    let mask = crate::causal_mask(1, 40, 0, &Device::Cpu).unwrap();
    let f = |q: &Tensor, k: &Tensor, v: &Tensor| flash_attention(q, k, v, Some(&mask), 0.25).unwrap().unwrap();
    check_grad(&q, |x| f(x, &k, &v));
    check_grad(&k, |x| f(&q, x, &v));
    check_grad(&v, |x| f(&q, &k, x));
}

#[test]
fn silu_mul_reads_the_halves_of_a_fused_product_in_place() {
    // (2, 3, 2n): the gate and up halves are narrow views, rows 2n apart.
    let fused = (randn(&[2, 3, 74], 71) * 4.0).unwrap();
    let (gate, up) = (fused.narrow(2, 0, 37).unwrap(), fused.narrow(2, 37, 37).unwrap());
    assert!(!gate.is_contiguous());
    let rows = |t: &Tensor| crate::kernels::with_cpu_strided_rows(t, |r| (r.start, r.stride, r.rows, r.n));
    assert_eq!((rows(&gate), rows(&up)), (Some((0, 74, 6, 37)), Some((37, 74, 6, 37))));
    let want = (gate.contiguous().unwrap().silu().unwrap() * up.contiguous().unwrap()).unwrap();
    assert!(max_diff(&silu_mul(&gate, &up).unwrap(), &want) < 1e-5);
    // A transposed view is not rows apart: the copying path, the same values.
    let t = randn(&[37, 4], 72).t().unwrap();
    assert_eq!(rows(&t), None);
    let want = (t.contiguous().unwrap().silu().unwrap() * &t).unwrap();
    assert!(max_diff(&silu_mul(&t, &t).unwrap(), &want) < 1e-5);
}

#[test]
fn rms_norm_kernel_matches_candles() {
    // 37 values per row: a partial 16-lane step.
    for (rows, d) in [(5, 37), (3, 576), (130, 64)] {
        let x = (randn(&[rows, d], 61) * 3.0).unwrap();
        let w = randn(&[d], 62);
        let want = candle_nn::ops::rms_norm(&x, &w, 1e-5).unwrap();
        assert!(max_diff(&rms_norm_forward(&x, &w, 1e-5).unwrap(), &want) < 1e-5);
    }
}

#[test]
fn silu_mul_matches_the_composed_ops_and_finite_differences() {
    // 37 values per row: a partial 16-lane step; large inputs saturate σ.
    let gate = (randn(&[3, 37], 51) * 12.0).unwrap();
    let up = randn(&[3, 37], 52);
    let composed = |g: &Tensor, u: &Tensor| (g.silu().unwrap() * u).unwrap();
    assert!(max_diff(&silu_mul(&gate, &up).unwrap(), &composed(&gate, &up)) < 1e-5);
    let (g, u) = (Var::from_tensor(&gate).unwrap(), Var::from_tensor(&up).unwrap());
    let probe = randn(&[3, 37], 53);
    let grads = |y: Tensor| (y * &probe).unwrap().sum_all().unwrap().backward().unwrap();
    let (ours, reference) =
        (grads(silu_mul(g.as_tensor(), u.as_tensor()).unwrap()), grads(composed(g.as_tensor(), u.as_tensor())));
    for x in [g.as_tensor(), u.as_tensor()] {
        assert!(max_diff(ours.get(x).unwrap(), reference.get(x).unwrap()) < 1e-5);
    }
    check_grad(&randn(&[2, 20], 54), |x| silu_mul(x, &up.narrow(0, 0, 2).unwrap().narrow(1, 0, 20).unwrap()).unwrap());
}

#[test]
fn gradient_only_linear_has_the_products_gradient_and_no_value() {
    let wt = randn(&[6, 8], 14).t().unwrap();
    let x = Var::from_tensor(&randn(&[2, 3, 8], 15)).unwrap();
    let dy = randn(&[2, 3, 6], 16);
    let grad_of = |y: Tensor| {
        let grads = (y * &dy).unwrap().sum_all().unwrap().backward().unwrap();
        grads.get(x.as_tensor()).unwrap().clone()
    };
    let y = frozen_linear_gradient_only(x.as_tensor(), &wt).unwrap();
    assert_eq!(y.dims(), &[2, 3, 6]);
    assert_eq!(y.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
    let (want, got) = (grad_of(frozen_linear(x.as_tensor(), &wt).unwrap()), grad_of(y));
    assert!(max_diff(&want, &got) < 1e-6);
    assert!(want.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() > 0.1);
}
