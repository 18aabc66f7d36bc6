//! Decoder tests: a tiny random model, forward against a step-by-step reference.

use super::*;

fn values(n: usize, seed: f32) -> Vec<f32> {
    (0..n).map(|i| ((i as f32 + seed) * 0.37).sin()).collect()
}

/// A Q8_0 linear layer `(n, k)` from `w`'s values (one scale per 32).
fn q8_0(w: &[f32], n: usize, k: usize) -> Linear {
    let mut bytes = Vec::new();
    for blk in w.chunks(32) {
        let d = half::f16::from_f32(blk.iter().fold(0f32, |a, v| a.max(v.abs())) / 127.0);
        bytes.extend_from_slice(&d.to_le_bytes());
        bytes.extend(blk.iter().map(|v| (v / d.to_f32()).round() as i8 as u8));
    }
    let q = QuantWeight::new(BlockFormat::Q8_0, bytes, n, k).unwrap();
    Linear { weight: LinearWeight::Blocks(q), bias: None, low_rank: None }
}

fn tensor(v: Vec<f32>, shape: (usize, usize)) -> Tensor {
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

#[test]
fn an_adapter_beside_quantised_weights_adds_exactly_its_update() {
    // 5 rows take the row kernels, 20 candle's matmul.
    for m in [5, 20] {
        adds_exactly(m);
    }
}

fn adds_exactly(m: usize) {
    let k = 64;
    let x = tensor(values(m * k, 1.0), (m, k));
    let sizes = [32, 16, 48];
    let parts: Vec<Linear> =
        sizes.iter().enumerate().map(|(i, &n)| q8_0(&values(n * k, 10.0 * i as f32), n, k)).collect();
    let base: Vec<Tensor> = parts.iter().map(|p| p.forward(&x).unwrap()).collect();
    // Rank 2 on the first part, none on the second, rank 3 on the third.
    let factors: Vec<Option<(Tensor, Tensor)>> = vec![
        Some((tensor(values(2 * k, 3.0), (2, k)), tensor(values(32 * 2, 4.0), (32, 2)))),
        None,
        Some((tensor(values(3 * k, 5.0), (3, k)), tensor(values(48 * 3, 6.0), (48, 3)))),
    ];
    let mut fused = Projections::new(parts).unwrap();
    assert!(fused.fused.is_some(), "Q8_0 parts stack into one product");
    fused.add_low_rank(&factors).unwrap();
    let got = fused.forward(&x, &[Proj::Q, Proj::K, Proj::V], None).unwrap();
    for ((g, b), f) in got.iter().zip(&base).zip(&factors) {
        let want = match f {
            Some((a, bb)) => (b + x.matmul(&bb.matmul(a).unwrap().t().unwrap()).unwrap()).unwrap(),
            None => b.clone(),
        };
        let diff = (g - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-4, "max |diff| {diff}");
    }
    // A second adapter on the same projection adds its update too.
    let mut one = q8_0(&values(32 * k, 0.0), 32, k);
    let (a, b) = factors[0].clone().unwrap();
    one.add_low_rank(LowRank::new(&a, &b).unwrap()).unwrap();
    one.add_low_rank(LowRank::new(&a, &b).unwrap()).unwrap();
    let want = (&base[0] + (x.matmul(&b.matmul(&a).unwrap().t().unwrap()).unwrap() * 2.0).unwrap()).unwrap();
    let diff = (one.forward(&x).unwrap() - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(diff < 1e-4, "twice: max |diff| {diff}");
}
