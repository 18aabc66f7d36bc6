//! The loop on real weights: a small run lowers the loss, resume continues
//! exactly, adapters round-trip in PEFT format, bad input is reported.
