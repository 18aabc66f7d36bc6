use candle_core::{DType, Device, Tensor};
use tabletrace_model::{read_gguf, Model};

use crate::util::smollm2;

fn logits(quantized: bool, ids: &[u32]) -> Vec<f32> {
    let ck = read_gguf(&smollm2(), quantized).unwrap();
    let model = Model::new(ck, &Device::Cpu).unwrap();
    let t = ids.len();
    let ids_t = Tensor::from_vec(ids.to_vec(), (1, t), &Device::Cpu).unwrap();
    let pos = Tensor::from_vec((0..t as u32).collect::<Vec<_>>(), (1, t), &Device::Cpu).unwrap();
    model.forward(&ids_t, &pos, None, None, true).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

#[test]
fn quantized_and_float_paths_agree() {
    let ids = [1u32, 4093, 198, 2683, 314, 260, 3575, 282, 4649, 47, 2, 198];
    let f = logits(false, &ids);
    let q = logits(true, &ids);
    let argmax = |v: &[f32]| v.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0;
    let max_diff = f.iter().zip(&q).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert_eq!(argmax(&f), argmax(&q), "max |diff| {max_diff}");
    assert!(max_diff < 1.0, "max |diff| {max_diff}");
}

fn incremental_logits(quantized: bool, ids: &[u32]) -> Vec<f32> {
    let ck = read_gguf(&smollm2(), quantized).unwrap();
    let model = Model::new(ck, &Device::Cpu).unwrap();
    // Quantised models keep the cache in f16 (as llama.cpp does), float ones in their dtype.
    assert_eq!(model.kv_dtype(), if quantized { DType::F16 } else { DType::F32 });
    let t = ids.len();
    let mut cache = model.new_cache(t);
    let ids_t = Tensor::from_vec(ids[..t - 1].to_vec(), (1, t - 1), &Device::Cpu).unwrap();
    let pos = Tensor::from_vec((0..t as u32 - 1).collect::<Vec<_>>(), (1, t - 1), &Device::Cpu).unwrap();
    model.forward(&ids_t, &pos, None, Some(&mut cache), true).unwrap();
    let ids_t = Tensor::from_vec(vec![ids[t - 1]], (1, 1), &Device::Cpu).unwrap();
    let pos = Tensor::from_vec(vec![t as u32 - 1], (1, 1), &Device::Cpu).unwrap();
    model.forward(&ids_t, &pos, None, Some(&mut cache), true).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

#[test]
fn cached_decoding_matches_a_full_forward() {
    let ids = [1u32, 4093, 198, 2683, 314, 260, 3575, 282, 4649, 47, 2, 198];
    let argmax = |v: &[f32]| v.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0;
    for quantized in [false, true] {
        let full = logits(quantized, &ids);
        let inc = incremental_logits(quantized, &ids);
        let max_diff = full.iter().zip(&inc).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        // Quantised products round activations to 8 bits, so a last-bit
        // difference in summation order can move a rounding, and the cache
        // holds f16 keys and values: looser bound.
        let bound = if quantized { 1.0 } else { 1e-3 };
        assert!(max_diff < bound, "quantized={quantized}: max |diff| {max_diff}");
        assert_eq!(argmax(&full), argmax(&inc), "quantized={quantized}");
    }
}

#[test]
fn a_padded_batch_generates_what_each_row_generates_alone() {
    use tabletrace_model::{generate, load_model, ChatMessage, GenerateOptions, LoadOptions};
    let m = load_model(smollm2().to_str().unwrap(), &LoadOptions::default()).unwrap();
    let prompts: Vec<Vec<u32>> =
        ["Name a colour.", "Which table lists the singers, and how many columns does it have?", "Hi"]
            .iter()
            .map(|q| {
                let text = m.tokenizer.apply_chat_template(&[ChatMessage::new("user", *q)], true).unwrap();
                m.tokenizer.encode(&text, true).unwrap()
            })
            .collect();
    let opts = GenerateOptions { max_new_tokens: 12, ..GenerateOptions::default() };
    let batch = generate(&m.model, &m.tokenizer, &prompts, &opts).unwrap();
    for (i, p) in prompts.iter().enumerate() {
        let alone = generate(&m.model, &m.tokenizer, std::slice::from_ref(p), &opts).unwrap();
        assert_eq!(batch[i].tokens, alone[0].tokens, "row {i}");
    }
}

/// Rows that stop at different steps (stop strings, EOS) stop as they would
/// alone, and the others go on as they would alone (f32 path: bit for bit).
#[test]
fn rows_that_finish_early_do_not_change_the_rest_of_the_batch() {
    use tabletrace_model::{generate, load_model, ChatMessage, FinishReason, GenerateOptions, LoadOptions};
    let m = load_model(smollm2().to_str().unwrap(), &LoadOptions::default()).unwrap();
    let prompts: Vec<Vec<u32>> = [
        "What is the capital of France?",
        "Which table lists the singers, and how many columns does it have?",
        "Name three colours.",
        "Hi",
    ]
    .iter()
    .map(|q| {
        let text = m.tokenizer.apply_chat_template(&[ChatMessage::new("user", *q)], true).unwrap();
        m.tokenizer.encode(&text, true).unwrap()
    })
    .collect();
    let opts = GenerateOptions { max_new_tokens: 24, stop: vec![",".into(), ".".into()], ..GenerateOptions::default() };
    let batch = generate(&m.model, &m.tokenizer, &prompts, &opts).unwrap();
    let lengths: std::collections::BTreeSet<usize> = batch.iter().map(|g| g.tokens.len()).collect();
    assert!(lengths.len() >= 3, "rows should end at different steps for this test to mean anything: {lengths:?}");
    assert!(batch.iter().any(|g| g.finish != FinishReason::Length), "some row stops early");
    for (i, p) in prompts.iter().enumerate() {
        let alone = generate(&m.model, &m.tokenizer, std::slice::from_ref(p), &opts).unwrap();
        assert_eq!((&batch[i].tokens, batch[i].finish), (&alone[0].tokens, alone[0].finish), "row {i}");
    }
}

#[test]
fn samples_of_one_prompt_share_its_prefill_and_equal_rows_run_alone() {
    use tabletrace_model::{generate, load_model, ChatMessage, GenerateOptions, LoadOptions, Sampling};
    for quantized in [false, true] {
        let m = load_model(smollm2().to_str().unwrap(), &LoadOptions { quantized, ..LoadOptions::default() }).unwrap();
        let ids = |q: &str| {
            let text = m.tokenizer.apply_chat_template(&[ChatMessage::new("user", q)], true).unwrap();
            m.tokenizer.encode(&text, true).unwrap()
        };
        let (p, q) = (ids("Which table lists the singers?"), ids("Name a colour."));
        // Four samples of p (one prefill, its cache copied to four rows) beside one row of q.
        let prompts = vec![p.clone(), p.clone(), q.clone(), p.clone(), p.clone()];
        let seeds = vec![11, 12, 13, 14, 15];
        let opts = GenerateOptions {
            max_new_tokens: 10,
            sampling: Sampling::Sample { temperature: 1.0, top_p: 0.95, seed: 0 },
            row_seeds: seeds.clone(),
            ..GenerateOptions::default()
        };
        let batch = generate(&m.model, &m.tokenizer, &prompts, &opts).unwrap();
        let distinct: std::collections::HashSet<_> = batch.iter().map(|g| g.tokens.clone()).collect();
        assert!(distinct.len() >= 3, "the samples differ: {distinct:?}");
        for (i, prompt) in prompts.iter().enumerate() {
            let alone = GenerateOptions { row_seeds: vec![seeds[i]], ..opts.clone() };
            let one = generate(&m.model, &m.tokenizer, std::slice::from_ref(prompt), &alone).unwrap();
            if quantized {
                // 8-bit activations: a batch may round differently from a single row,
                // so only the first sampled token (from the shared prefill's logits) must agree.
                assert_eq!(batch[i].tokens[0], one[0].tokens[0], "quantized row {i}");
            } else {
                assert_eq!(batch[i].tokens, one[0].tokens, "row {i}");
            }
        }
    }
}

#[test]
fn stop_strings_cut_the_text() {
    use tabletrace_model::{generate, load_model, ChatMessage, FinishReason, GenerateOptions, LoadOptions};
    let m = load_model(smollm2().to_str().unwrap(), &LoadOptions::default()).unwrap();
    let text =
        m.tokenizer.apply_chat_template(&[ChatMessage::new("user", "What is the capital of France?")], true).unwrap();
    let ids = m.tokenizer.encode(&text, true).unwrap();
    let opts = GenerateOptions { max_new_tokens: 20, stop: vec![" of".into()], ..GenerateOptions::default() };
    let out = generate(&m.model, &m.tokenizer, &[ids], &opts).unwrap();
    assert_eq!(out[0].finish, FinishReason::Stop);
    assert_eq!(out[0].text, "The capital");
}

#[test]
fn an_adapter_on_the_quantised_weights_changes_the_logits_as_on_the_float_ones() {
    let short = [1u32, 4093, 198, 2683, 314, 260, 3575, 282, 4649, 47, 2, 198];
    // Twelve rows take the decoding kernels; 36 (more than 16) the prefill path.
    let long: Vec<u32> = short.iter().chain(&short[1..]).chain(&short[1..]).chain(&short[1..3]).copied().collect();
    adapter_effect_on_both_paths(&short, false);
    adapter_effect_on_both_paths(&long, true);
}

/// With `within_noise`, the two paths' adapter effects may differ by as much
/// as the quantised base differs from the float one (the longer prompt: a
/// smaller effect, more quantisation noise; an adapter missing from the
/// prefill path would differ by the whole effect, four times that).
fn adapter_effect_on_both_paths(ids: &[u32], within_noise: bool) {
    use tabletrace_model::{Lora, LoraConfig, Proj};
    let run = |quantized: bool, adapted: bool| {
        let mut model = Model::new(read_gguf(&smollm2(), quantized).unwrap(), &Device::Cpu).unwrap();
        if adapted {
            let cfg =
                LoraConfig { r: 4, alpha: 8.0, dropout: 0.0, target_modules: Proj::ALL.to_vec(), use_rslora: false };
            let lora = Lora::init(&model, &cfg, |layer, proj, side, rows, cols| {
                (0..rows * cols)
                    .map(|i| 0.08 * ((i + 5 * layer + 11 * proj as usize + side as usize) as f32 * 0.37).sin())
                    .collect()
            })
            .unwrap();
            model.merge_adapter(&lora).unwrap();
        }
        let t = ids.len();
        let x = Tensor::from_vec(ids.to_vec(), (1, t), &Device::Cpu).unwrap();
        let pos = Tensor::from_vec((0..t as u32).collect::<Vec<_>>(), (1, t), &Device::Cpu).unwrap();
        model.forward(&x, &pos, None, None, true).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()
    };
    let argmax = |v: &[f32]| v.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0;
    let (float, quant) = (run(false, true), run(true, true));
    let (float_base, quant_base) = (run(false, false), run(true, false));
    // The adapter's effect on the logits, on each path: the same up to the
    // quantised paths' own error (8-bit activations), a fraction of the effect
    // (root mean square over the vocabulary; one that missed a projection
    // would be off by that projection's share).
    let effect = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x - y).collect::<Vec<f32>>();
    let (on_float, on_quant) = (effect(&float, &float_base), effect(&quant, &quant_base));
    let rms = |v: &[f32]| (v.iter().map(|x| x * x).sum::<f32>() / v.len() as f32).sqrt();
    let size = rms(&on_float);
    let apart = rms(&effect(&on_float, &on_quant));
    let noise = rms(&effect(&float_base, &quant_base));
    eprintln!("effect {size}, apart {apart} (RMS); the base paths {noise} apart");
    assert!(size > 0.3, "the adapter moves the logits (by {size} RMS)");
    let bound = if within_noise { noise.max(0.15 * size) } else { 0.15 * size };
    assert!(apart < bound, "the adapter's effect differs by {apart} RMS (effect {size}, base paths {noise} apart)");
    assert_eq!(argmax(&float), argmax(&quant));
}
