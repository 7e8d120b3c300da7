// Element access for f16 tensors (needs SHADER_F16). Prepended to the kernels by the host.
enable f16;

@group(0) @binding(1) var<storage, read> q: array<f16>;
@group(0) @binding(2) var<storage, read> k: array<f16>;
@group(0) @binding(3) var<storage, read> v: array<f16>;
@group(0) @binding(4) var<storage, read_write> out: array<f16>;

fn ld_q(i: u32) -> f32 { return f32(q[i]); }
fn ld_k(i: u32) -> f32 { return f32(k[i]); }
fn ld_v(i: u32) -> f32 { return f32(v[i]); }

// Stores elements i and i + 1 (i even); the second only when `both`.
fn st_out_pair(i: u32, a: f32, b: f32, both: bool) {
    out[i] = f16(a);
    if both { out[i + 1u] = f16(b); }
}
