//! Integration tests of the trainer on SmolLM2-135M (fetched by
//! scripts/fetch-models.sh): exactness against TRL, gradients, resume.

mod device;
mod dpo;
mod training;
mod trl;
mod util;
