//! Batched generation: left padding with per-row positions and masks, a
//! key/value cache, greedy or nucleus sampling, stop on EOS or stop strings.

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::decoder::{padded_causal_mask, Model};
use crate::error::{Error, Result};
use crate::tokenizer::Tokenizer;

/// How the next token is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Sampling {
    /// The most likely token.
    Greedy,
    /// Nucleus sampling.
    Sample {
        /// Softmax temperature (> 0).
        temperature: f64,
        /// Smallest set of tokens whose probability reaches `top_p` (0 < p <= 1).
        top_p: f64,
        /// Seed; row `i` of a batch uses `seed + i`, so results do not depend
        /// on batch composition.
        seed: u64,
    },
}

/// Options of one generation call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerateOptions {
    /// New tokens per row at most. Default 256.
    pub max_new_tokens: usize,
    /// Greedy (default) or sampling.
    pub sampling: Sampling,
    /// Generation of a row stops when its text contains one of these; the
    /// text is cut before it.
    pub stop: Vec<String>,
    /// Keep going past end-of-sequence tokens (fixed-length runs for
    /// benchmarks and reference comparisons). Default false.
    pub ignore_eos: bool,
    /// Sampling seed of each row, overriding `seed + row` (so that a row's
    /// output does not depend on the batch it runs in). Default empty.
    pub row_seeds: Vec<u64>,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            max_new_tokens: 256,
            sampling: Sampling::Greedy,
            stop: Vec::new(),
            ignore_eos: false,
            row_seeds: Vec::new(),
        }
    }
}

/// Why a row stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// An end-of-sequence token.
    Eos,
    /// A stop string.
    Stop,
    /// `max_new_tokens` reached.
    Length,
}

/// One row's output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Generation {
    /// New tokens (EOS excluded).
    pub tokens: Vec<u32>,
    /// Their text, special tokens dropped, cut before a stop string.
    pub text: String,
    /// Why generation stopped.
    pub finish: FinishReason,
}

/// SplitMix64's increment between states.
pub(crate) const SPLITMIX_GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// SplitMix64's output function: the random word of state `z`.
pub(crate) fn splitmix_mix(z: u64) -> u64 {
    let z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    let z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A small, fast, seedable generator (SplitMix64).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    /// The next 64 random bits (SplitMix64).
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(SPLITMIX_GAMMA);
        splitmix_mix(self.0)
    }

    /// The next value in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Chooses a token from one row of logits.
pub fn sample(logits: &[f32], sampling: &Sampling, rng: &mut Rng) -> u32 {
    match sampling {
        Sampling::Greedy => argmax(logits),
        Sampling::Sample { temperature, top_p, .. } => {
            if *temperature <= 0.0 {
                return argmax(logits);
            }
            let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let mut probs: Vec<(u32, f64)> =
                logits.iter().enumerate().map(|(i, &l)| (i as u32, (((l - max) as f64) / temperature).exp())).collect();
            let total: f64 = probs.iter().map(|p| p.1).sum();
            probs.iter_mut().for_each(|p| p.1 /= total);
            let keep = nucleus(&mut probs, *top_p);
            let kept = &probs[..keep];
            let mass: f64 = kept.iter().map(|p| p.1).sum();
            let mut r = rng.next_f64() * mass;
            for p in kept {
                r -= p.1;
                if r <= 0.0 {
                    return p.0;
                }
            }
            kept[kept.len() - 1].0
        }
    }
}

/// Orders the most probable tokens first (ties by id) until their mass
/// reaches `top_p`, and returns how many that takes: the prefix a full sort
/// would give. Only a selection of the first `k` is sorted, `k` growing
/// fourfold until it holds the mass — a full sort of a 49,152-token
/// vocabulary took ~4 ms per row and token, several times a batch-8
/// decoding step.
fn nucleus(probs: &mut [(u32, f64)], top_p: f64) -> usize {
    let order = |a: &(u32, f64), b: &(u32, f64)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    let n = probs.len();
    let mut k = n.min(64);
    loop {
        if k < n {
            probs.select_nth_unstable_by(k - 1, order);
        }
        probs[..k].sort_by(order);
        let mut cum = 0.0;
        for (i, p) in probs[..k].iter().enumerate() {
            cum += p.1;
            if cum >= top_p {
                return i + 1;
            }
        }
        if k == n {
            return n;
        }
        k = (4 * k).min(n);
    }
}

/// The first index of the largest logit (NaNs never win).
fn argmax(logits: &[f32]) -> u32 {
    // The maximum lane by lane (vectorises), then its first position.
    let mut lanes = [f32::NEG_INFINITY; 16];
    let chunks = logits.chunks_exact(16);
    let rest = chunks.remainder();
    for c in chunks {
        for (m, &l) in lanes.iter_mut().zip(c) {
            *m = if l > *m { l } else { *m };
        }
    }
    let max = lanes.iter().chain(rest).fold(f32::NEG_INFINITY, |m, &l| if l > m { l } else { m });
    logits.iter().position(|&l| l == max).unwrap_or(0) as u32
}

/// Generates a continuation for each prompt (token ids, chat template and
/// BOS already applied), all in one batch.
pub fn generate(
    model: &Model,
    tok: &Tokenizer,
    prompts: &[Vec<u32>],
    opts: &GenerateOptions,
) -> Result<Vec<Generation>> {
    let decode = |ids: &[u32]| tok.decode(ids, true);
    let rows = generate_tokens(model, prompts, opts, tok.eos_ids(), tok.pad_id(), Some(&decode))?;
    rows.into_iter()
        .map(|(tokens, finish)| {
            let mut text = tok.decode(&tokens, true)?;
            if finish == FinishReason::Stop {
                if let Some(cut) = opts.stop.iter().filter_map(|s| text.find(s.as_str())).min() {
                    text.truncate(cut);
                }
            }
            Ok(Generation { tokens, text, finish })
        })
        .collect()
}

/// Turns generated ids into text (to watch for stop strings).
pub type Decode<'a> = dyn Fn(&[u32]) -> Result<String> + Sync + 'a;

/// The token loop behind [`generate`], for callers without a tokenizer:
/// `eos` ends a row (unless `opts.ignore_eos`), `pad` fills left padding,
/// and `decode`, when given, is used to watch for `opts.stop` strings.
pub fn generate_tokens(
    model: &Model,
    prompts: &[Vec<u32>],
    opts: &GenerateOptions,
    eos: &[u32],
    pad: u32,
    decode: Option<&Decode<'_>>,
) -> Result<Vec<(Vec<u32>, FinishReason)>> {
    // The token loop runs on a worker of the rayon pool that the CPU kernels
    // split their work over: each of the hundreds of parallel products per
    // token is then started from inside the pool instead of being sent to it
    // from outside and waited for (a wake-up and a sleep per product).
    rayon::scope(|_| {
        let _awake = KeepAwake::start();
        token_loop(model, prompts, opts, eos, pad, decode)
    })
}

/// Keeps the pool's other workers looking for work while tokens are
/// generated, instead of going to sleep in each serial stretch of a token
/// (norms, rotations, sampling) and being woken, late, by the next parallel
/// product: a rayon worker sleeps after ~30 idle rounds, and in a VM the
/// wake-up (futex, IPI, scheduler) took longer than many of the products it
/// was woken for, so batch-8 decoding at 2 threads ran only 1.1× faster than
/// at 1. The workers spin (with `pause`) until the guard is dropped. One
/// generation at a time keeps the pool awake; a worker waiting inside a
/// concurrent generation may serve the polling one until it ends.
struct KeepAwake {
    done: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

/// `pause` instructions between two looks for work by an idle worker.
const POLL_PAUSES: usize = 64;

/// Whether some generation keeps the pool awake.
static AWAKE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

impl KeepAwake {
    /// Starts the other workers' polling from a worker of the pool.
    fn start() -> Option<KeepAwake> {
        use std::sync::atomic::Ordering;
        let me = rayon::current_thread_index()?;
        if rayon::current_num_threads() < 2 || AWAKE.swap(true, Ordering::AcqRel) {
            return None;
        }
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = done.clone();
        rayon::spawn_broadcast(move |ctx| {
            if ctx.index() == me {
                return;
            }
            while !flag.load(std::sync::atomic::Ordering::Acquire) {
                if rayon::yield_now() != Some(rayon::Yield::Executed) {
                    // About a microsecond between looks, so that polling does not
                    // keep the queues' cache lines away from the thread filling them.
                    for _ in 0..POLL_PAUSES {
                        std::hint::spin_loop();
                    }
                }
            }
        });
        Some(KeepAwake { done })
    }
}

impl Drop for KeepAwake {
    fn drop(&mut self) {
        self.done.store(true, std::sync::atomic::Ordering::Release);
        AWAKE.store(false, std::sync::atomic::Ordering::Release);
    }
}

fn token_loop(
    model: &Model,
    prompts: &[Vec<u32>],
    opts: &GenerateOptions,
    eos: &[u32],
    pad: u32,
    decode: Option<&Decode<'_>>,
) -> Result<Vec<(Vec<u32>, FinishReason)>> {
    let b = prompts.len();
    if b == 0 {
        return Ok(Vec::new());
    }
    if let Some(i) = prompts.iter().position(Vec::is_empty) {
        return Err(Error::Request(format!("prompt {i} is empty")));
    }
    let device: &Device = model.device();
    let lens: Vec<usize> = prompts.iter().map(Vec::len).collect();
    let l = *lens.iter().max().expect("at least one prompt");
    let context = model.config().max_position_embeddings;
    if l + opts.max_new_tokens > context {
        return Err(Error::Request(format!(
            "a prompt of {l} tokens plus {} new tokens exceeds the model's context of {context} tokens",
            opts.max_new_tokens
        )));
    }
    // Rows with the same prompt share one prefill (several samples of one
    // prompt, as vLLM's `n`): the distinct prompts run once, and each row
    // continues from a copy of its prompt's cache rows and last logits.
    let (distinct, row_of) = distinct_prompts(prompts);
    let mut ids = Vec::with_capacity(distinct.len() * l);
    let mut positions = Vec::with_capacity(distinct.len() * l);
    let mut valid: Vec<Vec<bool>> = Vec::with_capacity(distinct.len());
    for p in distinct.iter().map(|&i| &prompts[i]) {
        let padding = l - p.len();
        ids.extend(std::iter::repeat_n(pad, padding).chain(p.iter().copied()));
        positions.extend((0..l).map(|j| j.saturating_sub(padding) as u32));
        valid.push((0..l).map(|j| j >= padding).collect());
    }
    let padded = lens.iter().any(|&n| n != l);
    let mut cache = model.new_cache(l + opts.max_new_tokens);
    let ids_t = Tensor::from_vec(ids, (distinct.len(), l), device)?;
    let pos_t = Tensor::from_vec(positions, (distinct.len(), l), device)?;
    let mask = if padded { Some(padded_causal_mask(&valid, l, 0, device)?) } else { None };
    let mut logits = model.forward(&ids_t, &pos_t, mask.as_ref(), Some(&mut cache), true)?;
    if distinct.len() < b {
        cache = cache.expanded(&row_of)?;
        let idx = Tensor::from_vec(row_of.iter().map(|&r| r as u32).collect::<Vec<_>>(), b, device)?;
        logits = logits.contiguous()?.index_select(&idx, 0)?;
        valid = row_of.iter().map(|&r| valid[r].clone()).collect();
    }

    let mut rngs: Vec<Rng> = (0..b)
        .map(|i| match opts.sampling {
            Sampling::Sample { seed, .. } => {
                Rng::new(opts.row_seeds.get(i).copied().unwrap_or(seed.wrapping_add(i as u64)))
            }
            Sampling::Greedy => Rng::new(0),
        })
        .collect();
    let mut out: Vec<Vec<u32>> = vec![Vec::new(); b];
    let mut finish: Vec<Option<FinishReason>> = vec![None; b];
    for step in 0..opts.max_new_tokens {
        let sampled = sample_rows(&logits, &opts.sampling, &mut rngs, &finish, pad)?;
        let mut next = Vec::with_capacity(b);
        for (i, &t) in sampled.iter().enumerate() {
            if finish[i].is_some() {
                next.push(pad);
                continue;
            }
            if !opts.ignore_eos && eos.contains(&t) {
                finish[i] = Some(FinishReason::Eos);
            } else {
                out[i].push(t);
                if let (false, Some(decode)) = (opts.stop.is_empty(), decode) {
                    let text = decode(&out[i])?;
                    if opts.stop.iter().any(|s| text.contains(s.as_str())) {
                        finish[i] = Some(FinishReason::Stop);
                    }
                }
            }
            next.push(t);
        }
        if finish.iter().all(Option::is_some) || step + 1 == opts.max_new_tokens {
            break;
        }
        let offset = cache.len();
        for v in &mut valid {
            v.push(true);
        }
        let ids_t = Tensor::from_vec(next, (b, 1), device)?;
        let pos: Vec<u32> = lens.iter().map(|&n| (n + step) as u32).collect();
        let pos_t = Tensor::from_vec(pos, (b, 1), device)?;
        let mask = if padded { Some(padded_causal_mask(&valid, 1, offset, device)?) } else { None };
        logits = model.forward(&ids_t, &pos_t, mask.as_ref(), Some(&mut cache), true)?;
    }
    Ok(out.into_iter().zip(finish).map(|(tokens, f)| (tokens, f.unwrap_or(FinishReason::Length))).collect())
}

/// The first row of each distinct prompt, and for each row the index of
/// its prompt among those.
fn distinct_prompts(prompts: &[Vec<u32>]) -> (Vec<usize>, Vec<usize>) {
    let mut first: std::collections::HashMap<&[u32], usize> = std::collections::HashMap::new();
    let mut distinct = Vec::new();
    let row_of = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            *first.entry(p.as_slice()).or_insert_with(|| {
                distinct.push(i);
                distinct.len() - 1
            })
        })
        .collect();
    (distinct, row_of)
}

/// The next token of each row of `logits` `(B, V)`: read in place where
/// they are a CPU f32 tensor (no copy of the batch's logits), rows in
/// parallel; finished rows get `pad`.
fn sample_rows(
    logits: &Tensor,
    sampling: &Sampling,
    rngs: &mut [Rng],
    finish: &[Option<FinishReason>],
    pad: u32,
) -> Result<Vec<u32>> {
    use rayon::prelude::*;
    let vocab = logits.dim(1)?;
    let pick = |all: &[f32], rngs: &mut [Rng]| -> Vec<u32> {
        all.par_chunks_exact(vocab)
            .zip(rngs.par_iter_mut())
            .zip(finish.par_iter())
            .map(|((row, rng), done)| if done.is_some() { pad } else { sample(row, sampling, rng) })
            .collect()
    };
    let logits = logits.to_dtype(candle_core::DType::F32)?;
    match crate::kernels::with_cpu_f32(&logits, |all| pick(all, &mut *rngs)) {
        Some(tokens) => Ok(tokens),
        None => Ok(pick(&logits.flatten_all()?.to_vec1::<f32>()?, rngs)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_argmax_and_sampling_is_seeded() {
        let logits = [0.1f32, 2.0, -1.0, 1.9];
        assert_eq!(sample(&logits, &Sampling::Greedy, &mut Rng::new(0)), 1);
        let s = Sampling::Sample { temperature: 1.0, top_p: 1.0, seed: 7 };
        let draw = |seed| {
            let mut r = Rng::new(seed);
            (0..50).map(|_| sample(&logits, &s, &mut r)).collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
        // top_p small enough keeps only the best token.
        let narrow = Sampling::Sample { temperature: 1.0, top_p: 0.1, seed: 1 };
        let mut r = Rng::new(3);
        assert!((0..100).all(|_| sample(&logits, &narrow, &mut r) == 1));
        // Sampling follows the distribution: token 1 and 3 dominate.
        let mut r = Rng::new(11);
        let mut counts = [0usize; 4];
        for _ in 0..4000 {
            counts[sample(&logits, &s, &mut r) as usize] += 1;
        }
        let p1 = counts[1] as f64 / 4000.0;
        let expected = 2.0f64.exp() / [0.1f64, 2.0, -1.0, 1.9].iter().map(|x| x.exp()).sum::<f64>();
        assert!((p1 - expected).abs() < 0.03, "{p1} vs {expected}");
    }

    /// Nucleus sampling by a full sort of the vocabulary: what [`sample`] must draw.
    fn sample_by_full_sort(logits: &[f32], temperature: f64, top_p: f64, rng: &mut Rng) -> u32 {
        let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let mut probs: Vec<(u32, f64)> =
            logits.iter().enumerate().map(|(i, &l)| (i as u32, (((l - max) as f64) / temperature).exp())).collect();
        let total: f64 = probs.iter().map(|p| p.1).sum();
        probs.iter_mut().for_each(|p| p.1 /= total);
        probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let mut cum = 0.0;
        let mut keep = probs.len();
        for (i, p) in probs.iter().enumerate() {
            cum += p.1;
            if cum >= top_p {
                keep = i + 1;
                break;
            }
        }
        let kept = &probs[..keep];
        let mut r = rng.next_f64() * kept.iter().map(|p| p.1).sum::<f64>();
        for p in kept {
            r -= p.1;
            if r <= 0.0 {
                return p.0;
            }
        }
        kept[kept.len() - 1].0
    }

    #[test]
    fn sampling_draws_what_a_full_sort_draws() {
        // A vocabulary with ties, a flat stretch (top-p reached only past several
        // selection rounds) and a peaked one.
        let mut r = Rng::new(5);
        let mut logits: Vec<f32> = (0..5000).map(|_| (r.next_f64() * 8.0 - 4.0) as f32).collect();
        logits[100..140].iter_mut().for_each(|l| *l = 3.5);
        for (temperature, top_p) in [(0.7, 0.9), (1.0, 0.95), (1.5, 1.0), (0.3, 0.5), (2.0, 0.999)] {
            let s = Sampling::Sample { temperature, top_p, seed: 0 };
            let (mut a, mut b) = (Rng::new(9), Rng::new(9));
            for _ in 0..200 {
                assert_eq!(sample(&logits, &s, &mut a), sample_by_full_sort(&logits, temperature, top_p, &mut b));
            }
        }
    }

    #[test]
    fn argmax_takes_the_first_largest_and_skips_nans() {
        let mut logits = vec![0f32; 100];
        logits[37] = 5.0;
        logits[90] = 5.0;
        logits[50] = f32::NAN;
        assert_eq!(argmax(&logits), 37);
        assert_eq!(argmax(&[f32::NAN, 1.0, 2.0]), 2);
        assert_eq!(argmax(&[-1.0, -3.0]), 0);
    }
}
