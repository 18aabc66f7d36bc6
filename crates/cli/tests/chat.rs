//! `tabletrace chat`, the model runtime's smoke test.

use crate::{stderr, stdout, tabletrace};

#[test]
fn greedy_chat_prints_only_the_reply() {
    for quantized in [false, true] {
        let mut args = vec![
            "chat",
            "--model",
            "smollm2-135m",
            "--prompt",
            "What is the capital of France?",
            "--greedy",
            "--max-tokens",
            "20",
        ];
        if quantized {
            args.push("--quantized");
        }
        let o = tabletrace(&args);
        assert!(o.status.success(), "{}", stderr(&o));
        if !quantized {
            assert_eq!(stdout(&o), "The capital of France is Paris.\n");
        } else {
            // On the Q4_1 weights with 8-bit activations (as ggml computes), this
            // small model answers differently; llama.cpp (llama-cpp-python 0.3,
            // greedy, same file) replies "L'Étoile, la Marseillaise, la femme, la
            // femme au". The token after "la femme" is a near-tie that the
            // summation order of the matmul kernel (AVX2 or AVX-512) decides, so
            // the reply is checked up to there.
            assert!(stdout(&o).starts_with("L'Étoile, la Marseillaise, la femme"), "{}", stdout(&o));
        }
    }
}

#[test]
fn unknown_model_is_a_clear_error() {
    let o = tabletrace(&["chat", "--model", "no-such-model", "--prompt", "hi"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("not a known model name (smollm2-135m, qwen2.5-coder-0.5b)"), "{}", stderr(&o));
}
