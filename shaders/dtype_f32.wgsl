// Element access for f32 tensors. Prepended to the kernels by the host (see README.md).
@group(0) @binding(1) var<storage, read> q: array<f32>;
@group(0) @binding(2) var<storage, read> k: array<f32>;
@group(0) @binding(3) var<storage, read> v: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;

fn ld_q(i: u32) -> f32 { return q[i]; }
fn ld_k(i: u32) -> f32 { return k[i]; }
fn ld_v(i: u32) -> f32 { return v[i]; }

// Stores elements i and i + 1 (i even); the second only when `both`.
fn st_out_pair(i: u32, a: f32, b: f32, both: bool) {
    out[i] = a;
    if both { out[i + 1u] = b; }
}
