//! The whole decoder is differentiable: gradients reach every tensor that
//! is a variable (here the embedding and the norms of the tiny Qwen3), match
//! finite differences, and never reach the frozen projection weights. The
//! tiny model's lm_head is untied; SmolLM2 checks the tied case.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor, Var};
use tabletrace_model::{read_hf_folder, Model};

fn tiny_with_vars() -> (Model, Vec<(String, Var)>, Vec<Tensor>) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/tiny-qwen3");
    let mut ck = read_hf_folder(&dir, DType::F32, &Device::Cpu).unwrap();
    let mut vars = Vec::new();
    let mut frozen = Vec::new();
    for (name, t) in ck.tensors.iter_mut() {
        if name.contains("norm") || name.contains("embed_tokens") {
            let v = Var::from_tensor(t).unwrap();
            *t = v.as_tensor().clone();
            vars.push((name.clone(), v));
        } else {
            frozen.push(t.clone());
        }
    }
    (Model::new(ck, &Device::Cpu).unwrap(), vars, frozen)
}

fn loss(model: &Model) -> Tensor {
    let ids = Tensor::new(&[[5u32, 17, 99, 3, 64, 120]], &Device::Cpu).unwrap();
    let pos = Tensor::new(&[[0u32, 1, 2, 3, 4, 5]], &Device::Cpu).unwrap();
    let logits = model.forward(&ids, &pos, None, None, false).unwrap(); // (1, 6, V)
    let logp = candle_nn::ops::log_softmax(&logits, candle_core::D::Minus1).unwrap();
    // Next-token log-likelihood of a fixed target sequence.
    let targets = Tensor::new(&[[17u32, 99, 3, 64, 120, 7]], &Device::Cpu).unwrap().unsqueeze(2).unwrap();
    logp.gather(&targets, 2).unwrap().sum_all().unwrap().neg().unwrap()
}

#[test]
fn every_variable_gets_a_gradient_and_frozen_weights_none() {
    let (model, vars, frozen) = tiny_with_vars();
    let grads = loss(&model).backward().unwrap();
    assert!(vars.len() > 5);
    for (name, v) in &vars {
        let g = grads.get(v.as_tensor()).unwrap_or_else(|| panic!("{name} got no gradient"));
        let norm = g.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(norm > 0.0 && norm.is_finite(), "{name}: |grad|² = {norm}");
    }
    for t in &frozen {
        assert!(grads.get(t).is_none(), "a frozen projection weight got a gradient");
    }
}

#[test]
fn gradient_through_the_model_matches_finite_differences() {
    let (model, vars, _) = tiny_with_vars();
    let grads = loss(&model).backward().unwrap();
    for (name, v) in
        vars.iter().filter(|(n, _)| n == "model.norm.weight" || n.ends_with("layers.0.self_attn.q_norm.weight"))
    {
        let len = v.as_tensor().elem_count();
        let grad = grads.get(v.as_tensor()).unwrap();
        super::util::assert_finite_differences(name, v, grad, &[0, 3, len - 1], || {
            loss(&model).to_scalar::<f32>().unwrap()
        });
    }
}
