//! Integration tests of the trace factory on the bundled sample and, when
//! present, the full MMQA data.

mod fuzz;
mod http;
mod llm;
mod program;
mod prompts;
