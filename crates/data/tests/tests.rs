//! Integration tests of the data layer: one binary, one module per concern.

mod bad_input;
mod prompts;
mod sample;
mod shared_data;
mod util;
