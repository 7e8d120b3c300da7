//! Transposed `(b, h, s, d)` views reach flashattn as strides over candle's storage: the
//! call allocates its output (and small scratch), not copies of q, k and v. Measured with the
//! metered allocator; one test in this binary, so no other test's allocations count.

mod common;

use candle_core::{DType, Result, Tensor};
use common::{attention, rand, rel_err, tolerance, Opts};
use flashattn_candle as fa;
use flashattn_core::alloc_meter::{self, MeteredAlloc};

#[global_allocator]
static ALLOC: MeteredAlloc = MeteredAlloc;

#[test]
fn transposed_views_are_read_in_place() -> Result<()> {
    let (b, h, s, d) = (1, 8, 1024, 72);
    let bytes = (b * h * s * d * 4) as u64;
    let t = |x: Tensor| x.transpose(1, 2);
    let (q, k, v) = (
        t(rand(&[b, h, s, d], DType::F32)?)?,
        t(rand(&[b, h, s, d], DType::F32)?)?,
        t(rand(&[b, h, s, d], DType::F32)?)?,
    );
    assert!(!q.is_contiguous());
    // Warm up: the thread pool and its scratch exist before the measurement.
    fa::flash_attn(&q, &k, &v, 0.1, true)?;
    let base = alloc_meter::start();
    let out = fa::flash_attn(&q, &k, &v, 0.1, true)?;
    let extra = alloc_meter::peak_above(base).expect("the meter is installed");
    // The output is `bytes` (plus tile scratch of fixed size); copies of q, k and v would
    // add 3 x `bytes`.
    assert!(
        extra < 2 * bytes,
        "the call allocated {extra} bytes for a {bytes}-byte output"
    );
    let o = Opts {
        window: (None, Some(0)),
        ..Opts::default()
    };
    let (expected, _) = attention(&q, &k, &v, 0.1, &o)?;
    let err = rel_err(&out, &expected)?;
    assert!(err < tolerance(DType::F32), "{err}");
    Ok(())
}
