//! What a GPU computes differently from the CPU path, on the tiny random
//! Qwen3 (`crates/model/tests/data/tiny-qwen3`, 110 KB: small enough to travel
//! to a GPU machine with the work tree).
//!
//! On CUDA the trainer loads the base weights in bf16 (`TrainConfig::device`)
//! while LoRA factors, the loss and AdamW stay f32, and every op takes its
//! composed candle path: the fused kernels with hand-written backwards
//! (RMSNorm, RoPE, SiLU·up, attention, log-probs, the frozen products) run on
//! CPU f32 only. The first test runs that recipe on the CPU (bf16 base,
//! composed ops) against the f32 fast path; the second, built with
//! `--features cuda`, runs the same CPO step on a GPU when one is present and
//! compares it with the CPU's, in f32 and in bf16.

use candle_core::{DType, Device, Tensor};
use tabletrace_model::{read_hf_folder, Adapter, Lora, LoraConfig, Model, Proj};
use tabletrace_train::examples::Sequence;
use tabletrace_train::objective::{preference_loss, score};
use tabletrace_train::{LossConfig, Method};

use crate::trl::cosine;

fn tiny(device: &Device, dtype: DType) -> Model {
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../model/tests/data/tiny-qwen3");
    Model::new(read_hf_folder(&dir, dtype, device).unwrap(), device).unwrap()
}

/// A fixed adapter on every projection; B is not zero, so A gets gradients too.
fn adapter(model: &Model) -> Lora {
    let cfg = LoraConfig { r: 4, alpha: 8.0, dropout: 0.0, target_modules: Proj::ALL.to_vec(), use_rslora: false };
    Lora::init(model, &cfg, |layer, proj, side, rows, cols| {
        (0..rows * cols)
            .map(|i| 0.08 * ((i + 5 * layer + 11 * proj as usize + side as usize) as f32 * 0.37).sin())
            .collect()
    })
    .unwrap()
}

/// Two pairs that share their prompts (the trainer's shared-prompt layout),
/// chosen sequences first, token ids within the tiny vocabulary (128).
fn pairs() -> Vec<Sequence> {
    let prompt = |k: u32| (0..23).map(|i| (i * 7 + k * 13) % 127 + 1).collect::<Vec<u32>>();
    let seq = |k: u32, completion: &[u32]| {
        let mut ids = prompt(k);
        let completion_start = ids.len();
        ids.extend_from_slice(completion);
        Sequence { ids, completion_start }
    };
    vec![
        seq(1, &[40, 41, 42, 43, 44, 2]),
        seq(2, &[90, 12, 77, 2]),
        seq(1, &[40, 41, 50, 51, 2]),
        seq(2, &[90, 13, 78, 79, 80, 2]),
    ]
}

/// One CPO micro-batch: the loss and each LoRA factor's gradient (f32, on the CPU).
fn cpo_step(model: &Model, lora: &Lora) -> (f64, Vec<(String, Tensor)>) {
    let seqs = pairs();
    let refs: Vec<&Sequence> = seqs.iter().collect();
    let chosen_tokens: usize = seqs[..2].iter().map(Sequence::scored).sum();
    let params = LossConfig::default().resolve(Method::Cpo);
    let adapter: &dyn Adapter = lora;
    let scored = score(model, Some(adapter), &refs, true, 0, 16).unwrap();
    let (loss, sums) = preference_loss(&scored, &params, 2, chosen_tokens, model.config().vocab_size).unwrap();
    let grads = loss.backward().unwrap();
    let g = lora
        .named_vars()
        .into_iter()
        .map(|(name, v)| {
            assert_eq!(v.dtype(), DType::F32, "{name}: LoRA factors stay f32 whatever the base's dtype");
            let g = grads.get(v.as_tensor()).unwrap_or_else(|| panic!("{name} got no gradient"));
            (name, g.to_device(&Device::Cpu).unwrap().to_dtype(DType::F32).unwrap())
        })
        .collect();
    (sums.loss, g)
}

/// Loss within `loss_tol` (relative) and every gradient at cosine ≥ `min_cos`;
/// prints both losses and the lowest cosine.
fn agree(what: &str, a: &(f64, Vec<(String, Tensor)>), b: &(f64, Vec<(String, Tensor)>), loss_tol: f64, min_cos: f64) {
    let rel = (a.0 - b.0).abs() / b.0.abs();
    assert!(rel <= loss_tol, "{what}: losses {} and {} (relative {rel:.2e} > {loss_tol:.0e})", a.0, b.0);
    assert_eq!(a.1.len(), b.1.len());
    let mut lowest = (1.0f64, String::new());
    for ((name, ga), (_, gb)) in a.1.iter().zip(&b.1) {
        let c = cosine(ga, gb);
        if c < lowest.0 {
            lowest = (c, name.clone());
        }
    }
    assert!(lowest.0 >= min_cos, "{what}: gradient of {} at cosine {:.6} (< {min_cos})", lowest.1, lowest.0);
    eprintln!("{what}: losses {:.6} / {:.6} (relative {rel:.1e}), lowest gradient cosine {:.6}", a.0, b.0, lowest.0);
}

/// The GPU recipe on the CPU — bf16 base weights, composed ops, f32 LoRA —
/// gives the f32 fast path's loss and gradients up to bf16 rounding. A test
/// that fails when the composed path or the dtype handoffs break (a bf16
/// product fed to an f32 LoRA factor, a mask in the wrong dtype), so that a
/// GPU run starts from a path known to train.
#[test]
fn the_gpu_recipe_on_the_cpu_matches_the_f32_fast_path() {
    let fast = tiny(&Device::Cpu, DType::F32);
    let reference = cpo_step(&fast, &adapter(&fast));
    let bf16 = tiny(&Device::Cpu, DType::BF16);
    let recipe = cpo_step(&bf16, &adapter(&bf16));
    // Measured on this CPU: relative loss difference 1.1e-4, lowest cosine 0.99967 (bf16 keeps 8 bits).
    agree("CPU bf16 base, composed ops vs CPU f32 fast path", &recipe, &reference, 2e-3, 0.998);
    // And the recipe is not the reference by accident: bf16 rounding shows.
    assert_ne!(recipe.0, reference.0, "the bf16 base changed nothing: was it loaded in f32?");
}

/// On a GPU (`--features cuda`, device 0): the same CPO step in f32 equals the
/// CPU's within f32 reordering noise, and in bf16 (the trainer's GPU dtype)
/// the CPU bf16 recipe's within bf16 rounding. Without a GPU the test says so
/// and passes: it runs where one is lent.
#[cfg(feature = "cuda")]
#[test]
fn cuda_matches_the_cpu() {
    let gpu = match Device::new_cuda(0) {
        Ok(d) => d,
        Err(e) => {
            // The first line: candle appends a backtrace under RUST_BACKTRACE.
            eprintln!("skipped: no CUDA device ({})", e.to_string().lines().next().unwrap_or_default());
            return;
        }
    };
    for dtype in [DType::F32, DType::BF16] {
        let cpu = tiny(&Device::Cpu, dtype);
        let on_cpu = cpo_step(&cpu, &adapter(&cpu));
        let cuda = tiny(&gpu, dtype);
        let on_gpu = cpo_step(&cuda, &adapter(&cuda));
        let (loss_tol, min_cos) = if dtype == DType::F32 { (1e-4, 0.9999) } else { (2e-3, 0.998) };
        agree(&format!("CUDA vs CPU, base in {dtype:?}"), &on_gpu, &on_cpu, loss_tol, min_cos);
    }
}
