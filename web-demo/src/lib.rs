//! flashattn in the browser: the page's form becomes an `AttentionSpec`, the wgpu backend runs
//! it on WebGPU (forward and backward), and the results are checked against the f64 reference
//! and drawn as a heatmap.
//!
//! The logic (`config`, `gradients`, `heatmap`, `report`) is plain Rust, tested natively with
//! `cargo test`; the wasm-bindgen glue in `web` exists only on wasm32.

pub mod config;
pub mod gradients;
pub mod heatmap;
pub mod report;

#[cfg(target_arch = "wasm32")]
mod web;
