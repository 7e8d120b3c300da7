//! A real tensor larger than the adapter's own storage binding limit (q and out are bound in
//! token ranges): 132 MiB of q on lavapipe (128 MiB limit), few keys so it stays quick.

mod common;

use flashattn_core::testing::check_backend;
use flashattn_core::AttentionSpec;

#[test]
fn q_larger_than_the_binding_limit() {
    let Some(b) = common::backend() else { return };
    let limit = b.max_binding_bytes();
    if limit > 512 << 20 {
        eprintln!("SKIP: binding limit {limit} bytes; a larger-than-limit q would not fit the test's time");
        return;
    }
    let (heads, dim) = (16usize, 64usize);
    let row = (heads * dim * 4) as u64;
    let seqlen_q = (limit / row) as usize + 1000;
    // Few keys: the size is in q and out, the compute stays small.
    // Unmasked: every row sees every key, so every q/out chunk carries real values.
    let spec = AttentionSpec::new(1, heads, seqlen_q, 48, dim).return_lse(true);
    eprintln!(
        "{spec}: q = {} bytes, binding limit {limit}",
        spec.q_elems().unwrap() * 4
    );
    let r = check_backend(b, &spec, 5).unwrap_or_else(|e| panic!("{e}"));
    eprintln!("rel_l2 {:.2e}", r.rel_l2);
}
