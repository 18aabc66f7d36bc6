//! LoRA on the tiny Qwen3: the adapter's forward equals the merged model's,
//! every adapter tensor gets a gradient and the base weights none.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use tabletrace_model::{read_hf_folder, Lora, LoraConfig, Model, Proj};

fn tiny() -> Model {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/tiny-qwen3");
    Model::new(read_hf_folder(&dir, DType::F32, &Device::Cpu).unwrap(), &Device::Cpu).unwrap()
}

fn adapter(model: &Model) -> Lora {
    let cfg = LoraConfig { r: 2, alpha: 4.0, dropout: 0.0, target_modules: Proj::ALL.to_vec(), use_rslora: false };
    Lora::init(model, &cfg, |layer, proj, side, rows, cols| {
        (0..rows * cols)
            .map(|i| 0.05 * ((i + 3 * layer + 7 * proj as usize + side as usize) as f32 * 0.7).sin())
            .collect()
    })
    .unwrap()
}

fn inputs() -> (Tensor, Tensor) {
    let ids = Tensor::new(&[[5u32, 17, 99, 3, 64, 120]], &Device::Cpu).unwrap();
    let pos = Tensor::new(&[[0u32, 1, 2, 3, 4, 5]], &Device::Cpu).unwrap();
    (ids, pos)
}

#[test]
fn merged_weights_give_the_adapters_logits() {
    let model = tiny();
    let lora = adapter(&model);
    let (ids, pos) = inputs();
    let hidden = model.hidden_states(&ids, &pos, None, Some(&lora)).unwrap();
    let (w, _) = model.output_weight().unwrap();
    let with_adapter = hidden.broadcast_matmul(&w.t().unwrap()).unwrap();
    let base = model.forward(&ids, &pos, None, None, false).unwrap();
    let mut merged = tiny();
    merged.merge_adapter(&lora).unwrap();
    let merged_logits = merged.forward(&ids, &pos, None, None, false).unwrap();
    let diff = |a: &Tensor, b: &Tensor| (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(diff(&base, &with_adapter) > 1e-3, "the adapter changes the logits");
    assert!(diff(&merged_logits, &with_adapter) < 1e-4, "merged {}", diff(&merged_logits, &with_adapter));
    // Merged weights record no graph: generation with them keeps inference memory.
    assert!(!merged_logits.track_op(), "the merged model's outputs track gradients");
}

#[test]
fn every_adapter_tensor_gets_a_gradient() {
    let model = tiny();
    let lora = adapter(&model);
    let (ids, pos) = inputs();
    let loss = model.hidden_states(&ids, &pos, None, Some(&lora)).unwrap().sqr().unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    for (name, v) in lora.named_vars() {
        let g = grads.get(v.as_tensor()).unwrap_or_else(|| panic!("{name} got no gradient"));
        assert!(g.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() > 0.0, "{name}: zero gradient");
    }
    assert_eq!(lora.named_vars().len(), 2 * 7 * model.config().num_layers);
}

#[test]
fn adapter_gradients_with_dropout_match_finite_differences() {
    // The fused CPU projection draws each projection's dropout mask from the
    // step's seed and applies the same mask in the backward (to A's gradient
    // and to the input's): with the seed fixed the loss is a plain function
    // of the adapter, whose gradients finite differences check.
    let model = tiny();
    let cfg = LoraConfig { r: 2, alpha: 4.0, dropout: 0.3, target_modules: Proj::ALL.to_vec(), use_rslora: false };
    let lora = Lora::init(&model, &cfg, |layer, proj, side, rows, cols| {
        (0..rows * cols)
            .map(|i| 0.05 * ((i + 3 * layer + 7 * proj as usize + side as usize) as f32 * 0.7).sin())
            .collect()
    })
    .unwrap();
    let (ids, pos) = inputs();
    let loss = || model.hidden_states(&ids, &pos, None, Some(&lora)).unwrap().sqr().unwrap().sum_all().unwrap();
    let without = loss().to_scalar::<f32>().unwrap();
    lora.set_dropout_seed(Some(9));
    let with = loss().to_scalar::<f32>().unwrap();
    assert!((with - without).abs() > 1e-3 * without.abs(), "dropout changed nothing: {with} vs {without}");
    assert_eq!(loss().to_scalar::<f32>().unwrap(), with, "one seed, one mask");
    let grads = loss().backward().unwrap();
    let mut checked = 0;
    for (name, v) in lora.named_vars() {
        // The first layer's gradients pass through every later layer's masked input gradient.
        if !(name.contains("layers.0.") && (name.contains("q_proj") || name.contains("down_proj"))) {
            continue;
        }
        let len = v.as_tensor().elem_count();
        let grad = grads.get(v.as_tensor()).unwrap();
        super::util::assert_finite_differences(&name, v, grad, &[0, 5, len - 1], || loss().to_scalar::<f32>().unwrap());
        checked += 3;
    }
    assert_eq!(checked, 12);
}
