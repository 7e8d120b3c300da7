//! flashattn-wgpu backend (in progress).
