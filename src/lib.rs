pub use flashattn_core::*;
