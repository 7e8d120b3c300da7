//! The device-resident API on slices of shared buffers, as burn/cubecl hand out memory: the
//! inputs of a pass in one buffer and its outputs in another, through `wgpu::BufferBinding`s at
//! aligned offsets, give the host path's results and write nothing outside their slices; a
//! misaligned offset, a short slice and an output sharing a buffer with an input (which
//! WebGPU cannot bind in one dispatch) are errors naming them.

mod common;

use flashattn_core::testing::decode::{self, DecodeData};
use flashattn_core::testing::{backward_tolerance, BackwardCase};
use flashattn_core::{
    lse_max_error, random_inputs, reference_attention, reference_backward, rel_l2_error,
    AttentionSpec, Backend, DType, ForwardInputs, Tensor,
};
use flashattn_wgpu::{
    wgpu, BufferSlice, DeviceBackwardInputs, DeviceDecodeInputs, DeviceGrads, DeviceInputs,
    DeviceOutputs, WgpuBackend,
};
use std::num::NonZeroU64;

/// Every part of one pass in one buffer, each at a multiple of the adapter's storage offset
/// alignment, with all-ones bytes (NaN in f32, bf16 and f16) in the gaps and past the end:
/// a kernel that read outside its slice would turn its results NaN, one that wrote outside it
/// would change the gaps.
struct Arena {
    buffer: wgpu::Buffer,
    parts: Vec<(u64, u64)>,
    initial: Vec<u8>,
}

impl Arena {
    fn new(b: &WgpuBackend, parts: &[&[u8]]) -> Arena {
        let align = u64::from(
            b.device_handle()
                .limits()
                .min_storage_buffer_offset_alignment,
        );
        let mut initial = Vec::new();
        let mut at = Vec::new();
        for p in parts {
            // A gap of at least one alignment unit before every part.
            let offset = (initial.len() as u64 + align).next_multiple_of(align);
            initial.resize(offset as usize, 0xff);
            initial.extend_from_slice(p);
            at.push((offset, p.len() as u64));
        }
        initial.resize(initial.len().next_multiple_of(4) + align as usize, 0xff);
        let buffer = b.device_handle().create_buffer(&wgpu::BufferDescriptor {
            label: Some("arena"),
            size: initial.len() as u64,
            usage: wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_DST
                | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        });
        b.queue().write_buffer(&buffer, 0, &initial);
        Arena {
            buffer,
            parts: at,
            initial,
        }
    }

    /// Part `i` as a caller hands it over: a `wgpu::BufferBinding` of its exact size (rounded
    /// up to whole words, as storage bindings are).
    fn slice(&self, i: usize) -> BufferSlice<'_> {
        let (offset, size) = self.parts[i];
        wgpu::BufferBinding {
            buffer: &self.buffer,
            offset,
            size: NonZeroU64::new(size.max(4).next_multiple_of(4)),
        }
        .into()
    }

    fn read(&self, b: &WgpuBackend) -> Vec<u8> {
        common::read_back(b.device_handle(), b.queue(), &self.buffer)
    }

    /// The bytes of the parts `written` after the pass; panics if any other byte changed.
    fn written(&self, b: &WgpuBackend, written: &[usize]) -> Vec<Vec<u8>> {
        let now = self.read(b);
        let mut expect = self.initial.clone();
        for &i in written {
            let (o, n) = self.parts[i];
            let range = o as usize..(o + n) as usize;
            expect[range.clone()].copy_from_slice(&now[range]);
        }
        let changed = now.iter().zip(&expect).position(|(a, e)| a != e);
        assert_eq!(changed, None, "a byte outside the written slices changed");
        written
            .iter()
            .map(|&i| {
                let (o, n) = self.parts[i];
                now[o as usize..(o + n) as usize].to_vec()
            })
            .collect()
    }
}

fn zeros(n: usize) -> Vec<u8> {
    vec![0u8; n]
}

/// The shared backend and one whose bindings hold at most 64 KiB, so that chunks sit at
/// offsets inside each slice.
fn backends() -> Vec<WgpuBackend> {
    let Some(shared) = common::backend() else {
        return Vec::new();
    };
    let (device, queue) = (shared.device_handle().clone(), shared.queue().clone());
    vec![
        WgpuBackend::from_device(device.clone(), queue.clone()),
        WgpuBackend::from_device(device, queue).with_max_binding_bytes(64 << 10),
    ]
}

#[test]
fn forward_on_slices_of_shared_buffers() {
    for b in backends() {
        for (dtype, spec) in [
            (
                DType::F32,
                AttentionSpec::new(2, 4, 129, 257, 72).heads_kv(2),
            ),
            (
                DType::Bf16,
                AttentionSpec::new(1, 3, 17, 600, 40).causal(true),
            ),
        ] {
            let spec = spec.dtype(dtype).return_lse(true);
            let (q, k, v) = random_inputs(&spec, 11);
            let out_bytes = spec.out_elems().unwrap() * dtype.size_bytes();
            let lse_bytes = spec.lse_elems().unwrap() * 4;
            let inputs = Arena::new(
                &b,
                &[
                    q.as_ref().as_bytes(),
                    k.as_ref().as_bytes(),
                    v.as_ref().as_bytes(),
                ],
            );
            let outputs = Arena::new(&b, &[&zeros(out_bytes), &zeros(lse_bytes)]);
            pollster::block_on(b.forward_buffers(
                &spec,
                DeviceInputs {
                    q: inputs.slice(0),
                    k: inputs.slice(1),
                    v: inputs.slice(2),
                },
                DeviceOutputs {
                    out: outputs.slice(0),
                    lse: Some(outputs.slice(1)),
                },
            ))
            .expect("forward_buffers on slices");
            inputs.written(&b, &[]);
            let got = outputs.written(&b, &[0, 1]);
            let out = Tensor::from_bytes(dtype, &got[0]).unwrap();
            let lse: Vec<f32> = bytemuck::pod_collect_to_vec(&got[1]);
            let want = reference_attention(&spec, q.as_ref(), k.as_ref(), v.as_ref()).unwrap();
            let err = rel_l2_error(&out.to_f32_vec(), &want.out);
            assert!(err < dtype.tolerance(), "{spec}: rel L2 {err:.3e}");
            let lse_err = lse_max_error(&lse, &want.lse);
            assert!(lse_err < 1e-3, "{spec}: LSE error {lse_err:.3e}");
            // The same kernels as the host path, so the same bits.
            let host = b.forward(&spec, ForwardInputs::of(&q, &k, &v)).unwrap();
            assert_eq!(host.out.as_ref().as_bytes(), out.as_ref().as_bytes());
        }
    }
}

#[test]
fn backward_on_slices_of_shared_buffers() {
    for b in backends() {
        for (dtype, spec) in [
            (
                DType::F32,
                AttentionSpec::new(1, 4, 33, 129, 40).heads_kv(2),
            ),
            (
                DType::Bf16,
                AttentionSpec::new(2, 2, 17, 70, 72).causal(true),
            ),
        ] {
            let spec = spec.dtype(dtype).return_lse(true);
            let case = BackwardCase::new(&b, &spec, 5).unwrap();
            let grad_bytes = |t: &Tensor| zeros(t.as_ref().as_bytes().len());
            let inputs = Arena::new(
                &b,
                &[
                    case.q.as_ref().as_bytes(),
                    case.k.as_ref().as_bytes(),
                    case.v.as_ref().as_bytes(),
                    case.out.as_ref().as_bytes(),
                    bytemuck::cast_slice(&case.lse),
                    case.dout.as_ref().as_bytes(),
                ],
            );
            let grads = Arena::new(
                &b,
                &[
                    &grad_bytes(&case.q),
                    &grad_bytes(&case.k),
                    &grad_bytes(&case.v),
                ],
            );
            pollster::block_on(b.backward_buffers(
                &spec,
                DeviceBackwardInputs {
                    q: inputs.slice(0),
                    k: inputs.slice(1),
                    v: inputs.slice(2),
                    out: inputs.slice(3),
                    lse: inputs.slice(4),
                    dout: inputs.slice(5),
                },
                DeviceGrads {
                    dq: grads.slice(0),
                    dk: grads.slice(1),
                    dv: grads.slice(2),
                },
            ))
            .expect("backward_buffers on slices");
            inputs.written(&b, &[]);
            let got = grads.written(&b, &[0, 1, 2]);
            let want = reference_backward(
                &spec,
                case.q.as_ref(),
                case.k.as_ref(),
                case.v.as_ref(),
                case.dout.as_ref(),
            )
            .unwrap();
            let host = b.backward(&spec, case.inputs()).unwrap();
            let host = [&host.dq, &host.dk, &host.dv];
            let want = [&want.dq, &want.dk, &want.dv];
            for (i, name) in ["dq", "dk", "dv"].iter().enumerate() {
                let g = Tensor::from_bytes(dtype, &got[i]).unwrap();
                let err = rel_l2_error(&g.to_f32_vec(), want[i]);
                let tol = backward_tolerance(dtype);
                assert!(err < tol, "{spec}: {name} rel L2 {err:.3e}");
                assert_eq!(host[i].as_ref().as_bytes(), g.as_ref().as_bytes(), "{name}");
            }
        }
    }
}

#[test]
fn a_misaligned_slice_is_an_error_naming_its_offset() {
    let Some(b) = common::backend() else { return };
    let spec = AttentionSpec::new(1, 1, 8, 8, 16);
    let bytes = vec![0u8; 8 * 16 * 4];
    let arena = Arena::new(b, &[&bytes, &bytes, &bytes]);
    let out = Arena::new(b, &[&bytes]);
    // The error of a forward on q, k (v is arena part 2) into `o`.
    let fails = |q, k, o| {
        let (inputs, outputs) = (
            DeviceInputs {
                q,
                k,
                v: arena.slice(2),
            },
            DeviceOutputs { out: o, lse: None },
        );
        pollster::block_on(b.forward_buffers(&spec, inputs, outputs))
            .unwrap_err()
            .to_string()
    };
    let mut q = arena.slice(0);
    q.offset += 4;
    let err = fails(q, arena.slice(1), out.slice(0));
    assert!(err.contains(&format!("offset {}", q.offset)), "{err}");
    assert!(err.contains(": q: "), "{err}");
    // A slice shorter than the spec needs names its size.
    let mut short = arena.slice(1);
    short.size -= 4;
    let err = fails(arena.slice(0), short, out.slice(0));
    assert!(err.contains(&format!("{} bytes", short.size)), "{err}");
    // An output in the inputs' buffer.
    let err = fails(arena.slice(0), arena.slice(1), arena.slice(0));
    assert!(err.contains("out and q are slices of one buffer"), "{err}");
    // Nothing was written.
    arena.written(b, &[]);
    out.written(b, &[]);
}

/// One decode step (append two rows to a paged cache, attend): both caches slices of one
/// buffer (a KV pool), q and the new rows of another, out and LSE of a third. (Small enough
/// for the 64 KiB-binding backend: decode binds each cache whole.)
#[test]
fn decode_on_slices_of_shared_buffers() {
    for b in backends() {
        for dtype in [DType::F32, DType::Bf16] {
            let cache = decode::paged(&[5, 20], 2, 16, 3);
            let spec = decode::spec(8, 2, 2, 64, cache).dtype(dtype);
            let data = DecodeData::random(&spec, 21);
            let DecodeData {
                q,
                k_cache,
                v_cache,
                k_new,
                v_new,
            } = &data;
            let out_bytes = spec.out_elems().unwrap() * dtype.size_bytes();
            let lse_bytes = spec.lse_elems().unwrap() * 4;
            let inputs = Arena::new(
                &b,
                &[
                    q.as_ref().as_bytes(),
                    k_new.as_ref().as_bytes(),
                    v_new.as_ref().as_bytes(),
                ],
            );
            let caches = Arena::new(
                &b,
                &[k_cache.as_ref().as_bytes(), v_cache.as_ref().as_bytes()],
            );
            let outputs = Arena::new(&b, &[&zeros(out_bytes), &zeros(lse_bytes)]);
            pollster::block_on(b.decode_buffers(
                &spec,
                DeviceDecodeInputs {
                    q: inputs.slice(0),
                    k_cache: caches.slice(0),
                    v_cache: caches.slice(1),
                    k_new: Some(inputs.slice(1)),
                    v_new: Some(inputs.slice(2)),
                },
                DeviceOutputs {
                    out: outputs.slice(0),
                    lse: Some(outputs.slice(1)),
                },
            ))
            .expect("decode_buffers on slices");
            inputs.written(&b, &[]);
            let cache_after = caches.written(&b, &[0, 1]);
            let got = outputs.written(&b, &[0, 1]);
            let want = data.reference(&spec).unwrap();
            let out = Tensor::from_bytes(dtype, &got[0]).unwrap();
            let err = rel_l2_error(&out.to_f32_vec(), &want.out);
            assert!(err < dtype.tolerance(), "{spec}: rel L2 {err:.3e}");
            let lse: Vec<f32> = bytemuck::pod_collect_to_vec(&got[1]);
            let lse_err = lse_max_error(&lse, &want.lse);
            assert!(lse_err < 1e-3, "{spec}: LSE error {lse_err:.3e}");
            // The host path on copies of the same caches: the same bits everywhere.
            let (mut kc, mut vc) = (k_cache.clone(), v_cache.clone());
            let host = b.decode(&spec, data.inputs((&mut kc, &mut vc))).unwrap();
            assert_eq!(host.out.as_ref().as_bytes(), &got[0][..]);
            assert_eq!(kc.as_ref().as_bytes(), &cache_after[0][..]);
            assert_eq!(vc.as_ref().as_bytes(), &cache_after[1][..]);
        }
    }
}
