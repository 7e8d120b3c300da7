//! The forward pass: the device buffers of one call (select.rs picks the kernel), the
//! launches, and the host and device-resident entry points.

use crate::compile::BACKEND;
use crate::device::{check_device_pointers, DevBuf, Gpu};
use crate::fp8::Fp8Buffers;
use crate::params::KernelParams;
use crate::tables::{DeviceTable, DeviceTables};
use crate::tensor_map::TensorMapParams;
use crate::tiles::{head_major_order, Launch};
use crate::variants::{Tiles, Variant};
use crate::CudaBackend;
use cudarc::driver::sys;
use flashattn_core::{
    validate_inputs, AttentionSpec, CheckedSpec, DType, Error, Output, Result, Tensor, TensorRef,
};
use std::ffi::c_void;

fn unsupported(reason: impl Into<String>) -> Error {
    Error::unsupported(BACKEND, reason)
}

/// A tensor on the device: allocated by us (freed on drop) or owned by the caller.
pub(crate) enum DevTensor {
    Ours(DevBuf),
    Callers(sys::CUdeviceptr),
}

impl DevTensor {
    pub(crate) fn ptr(&self) -> sys::CUdeviceptr {
        match self {
            DevTensor::Ours(b) => b.ptr,
            DevTensor::Callers(p) => *p,
        }
    }

    /// Copies our allocation back to the host (the caller's tensors are never read back).
    pub(crate) fn to_vec(&self) -> Result<Vec<u8>> {
        match self {
            DevTensor::Ours(b) => b.to_vec(),
            DevTensor::Callers(_) => Err(Error::backend(BACKEND, "caller-owned tensor read back")),
        }
    }
}

/// Device pointers (`CUdeviceptr`) of tensors the caller owns, in the spec's layouts: q, k, v in
/// the spec's dtype (through `spec.strides` when given: then each must address its view's
/// `Strides::extent` elements), out in `spec.dtype.output()`, lse f32 (present iff
/// `spec.return_lse`).
/// They must live in the primary context of the backend's device (0, or the ordinal given to
/// `CudaBackend::for_device`), the one the CUDA runtime (and so PyTorch) and cudarc use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceTensors {
    pub q: u64,
    pub k: u64,
    pub v: u64,
    pub out: u64,
    pub lse: Option<u64>,
}

/// Device buffers of one problem.
pub(crate) struct Buffers {
    q: DevTensor,
    k: DevTensor,
    v: DevTensor,
    out: DevTensor,
    lse: Option<DevTensor>,
    /// cu_seqlens and ALiBi slopes: uploaded from the spec, or the caller's (`DeviceTables`).
    cu_q: Option<DevTensor>,
    cu_k: Option<DevTensor>,
    alibi: Option<DevTensor>,
    /// FP8: descales and the transposed V (fp8.rs).
    fp8: Option<Fp8Buffers>,
}

impl Buffers {
    /// Random inputs of `seed` (`random_inputs`), uploaded as by [`Buffers::new`]; benchmarks.
    pub(crate) fn random(spec: &CheckedSpec<'_>, seed: u64) -> Result<Buffers> {
        let (q, k, v) = flashattn_core::random_inputs(spec, seed);
        let (q, k, v) = (q.as_ref(), k.as_ref(), v.as_ref());
        Buffers::new(spec, q.as_bytes(), k.as_bytes(), v.as_bytes())
    }

    /// Uploads host inputs into fresh allocations, with a zeroed output and an LSE preset to
    /// -inf (rows of no sequence keep those values).
    pub(crate) fn new(spec: &CheckedSpec<'_>, q: &[u8], k: &[u8], v: &[u8]) -> Result<Buffers> {
        let out_bytes = spec.sizes.out * spec.dtype.output().size_bytes();
        let lse = if spec.return_lse {
            let init = vec![f32::NEG_INFINITY; spec.sizes.lse];
            Some(DevTensor::Ours(DevBuf::from_bytes(bytemuck::cast_slice(
                &init,
            ))?))
        } else {
            None
        };
        let ours = DevTensor::Ours;
        Buffers::with_tensors(
            spec,
            ours(DevBuf::from_bytes(q)?),
            ours(DevBuf::from_bytes(k)?),
            ours(DevBuf::from_bytes(v)?),
            ours(DevBuf::zeroed(out_bytes)?),
            lse,
            &DeviceTables::default(),
        )
    }

    /// Wraps the caller's tensors and tables; only the side tables not in `tables` (and FP8's
    /// descales and transposed V) are allocated.
    fn callers(
        spec: &CheckedSpec<'_>,
        t: &DeviceTensors,
        tables: &DeviceTables,
    ) -> Result<Buffers> {
        Buffers::with_tensors(
            spec,
            DevTensor::Callers(t.q),
            DevTensor::Callers(t.k),
            DevTensor::Callers(t.v),
            DevTensor::Callers(t.out),
            t.lse.map(DevTensor::Callers),
            tables,
        )
    }

    pub(crate) fn with_tensors(
        spec: &CheckedSpec<'_>,
        q: DevTensor,
        k: DevTensor,
        v: DevTensor,
        out: DevTensor,
        lse: Option<DevTensor>,
        tables: &DeviceTables,
    ) -> Result<Buffers> {
        // The caller's table, else an upload of the host copy.
        let table = |given: Option<DeviceTable>, host: &[u8]| match given {
            Some(t) => Ok(DevTensor::Callers(t.ptr)),
            None => DevBuf::from_bytes(host).map(DevTensor::Ours),
        };
        let (cu_q, cu_k) = match &spec.varlen {
            Some(vl) => (
                Some(table(
                    tables.cu_seqlens_q,
                    bytemuck::cast_slice(&vl.cu_seqlens_q),
                )?),
                Some(table(
                    tables.cu_seqlens_k,
                    bytemuck::cast_slice(&vl.cu_seqlens_k),
                )?),
            ),
            None => (None, None),
        };
        let alibi = match &spec.alibi {
            Some(a) => Some(table(tables.alibi_slopes, bytemuck::cast_slice(&a.slopes))?),
            None => None,
        };
        let fp8 = match spec.dtype {
            DType::Fp8E4m3 => Some(Fp8Buffers::new(spec)?),
            _ => None,
        };
        Ok(Buffers {
            q,
            k,
            v,
            out,
            lse,
            cu_q,
            cu_k,
            alibi,
            fp8,
        })
    }

    /// Our side tables (uploads of the spec's host copies).
    fn side_tables(&self) -> impl Iterator<Item = &DevBuf> {
        [&self.cu_q, &self.cu_k, &self.alibi]
            .into_iter()
            .filter_map(|b| match b {
                Some(DevTensor::Ours(b)) => Some(b),
                _ => None,
            })
    }

    pub(crate) fn extra_bytes(&self) -> u64 {
        self.side_tables().map(|b| b.bytes as u64).sum::<u64>()
            + self.fp8.as_ref().map_or(0, |f| f.bytes() as u64)
    }

    /// Whether the call allocated anything of its own (that must outlive its kernels).
    pub(crate) fn allocates(&self) -> bool {
        let ours = |t: &DevTensor| matches!(t, DevTensor::Ours(_));
        let tensors = [&self.q, &self.k, &self.v, &self.out];
        tensors.into_iter().chain(&self.lse).any(ours)
            || self.side_tables().next().is_some()
            || self.fp8.is_some()
    }

    /// The kernels' parameters for `spec` with query blocks of `block_m`, and our pointers.
    pub(crate) fn params(&self, spec: &CheckedSpec<'_>, block_m: usize) -> Result<KernelParams> {
        let mut p = KernelParams::new(spec, block_m)?;
        self.set_pointers(&mut p);
        Ok(p)
    }

    pub(crate) fn set_pointers(&self, p: &mut KernelParams) {
        p.q = self.q.ptr();
        p.k = self.k.ptr();
        p.v = self.v.ptr();
        p.out = self.out.ptr();
        p.lse = self.lse.as_ref().map_or(0, |b| b.ptr());
        p.cu_seqlens_q = self.cu_q.as_ref().map_or(0, DevTensor::ptr);
        p.cu_seqlens_k = self.cu_k.as_ref().map_or(0, DevTensor::ptr);
        p.alibi = self.alibi.as_ref().map_or(0, DevTensor::ptr);
    }
}

pub(crate) fn arg<T>(x: &mut T) -> *mut c_void {
    (x as *mut T).cast()
}

/// Launches `variant`'s entry point with `l` (from [`flash_launch`]).
pub(crate) fn launch(
    gpu: &Gpu,
    variant: &Variant,
    l: Launch,
    args: &mut [*mut c_void],
) -> Result<()> {
    if l.smem > gpu.info.smem_optin {
        return Err(unsupported(format!(
            "kernel {} needs {} bytes of shared memory, this GPU allows {}",
            variant.name(),
            l.smem,
            gpu.info.smem_optin
        )));
    }
    let f = gpu.function(variant, 0, l.smem)?;
    gpu.launch(f, l.grid, l.block, l.smem, args)
}

/// The parameters (pointers left 0) and the launch of the flash kernel `variant` for `spec`
/// on a GPU with `sm_count` SMs.
pub fn flash_launch(
    spec: &CheckedSpec<'_>,
    variant: &Variant,
    sm_count: usize,
) -> Result<(KernelParams, Launch)> {
    let (p, launch) = match variant.tiles {
        Tiles::Hopper(t) => {
            let mut p = KernelParams::new(spec, t.block_m)?;
            p.head_major_tiles = head_major_order(spec.causal, spec.head_dim) as i32;
            let elem = spec.dtype.size_bytes();
            let l = t.launch(spec.head_dim, elem, p.total_tiles as usize, sm_count);
            (p, l)
        }
        Tiles::Mma(t) => {
            let mut p = KernelParams::new(spec, t.block_m)?;
            p.head_major_tiles = 1;
            let l = t.launch(variant.head_dim, p.total_tiles as usize);
            (p, l)
        }
        Tiles::Generic(t) => {
            let p = KernelParams::new(spec, t.block_m())?;
            let l = t.launch(
                p.num_m_blocks as usize,
                spec.heads_q,
                spec.batch,
                spec.head_dim,
                spec.head_dim_v,
            );
            (p, l)
        }
        Tiles::Decode(_) | Tiles::MmaBwd(_) | Tiles::GenericBwd(_) | Tiles::None => {
            return Err(unsupported(format!(
                "{} is not a forward flash kernel",
                variant.name()
            )))
        }
    };
    Ok((p, launch.map_err(unsupported)?))
}

impl CudaBackend {
    /// Queues the flash kernel for `spec` on the backend's stream (no synchronisation).
    pub(crate) fn launch_flash(
        &self,
        spec: &CheckedSpec<'_>,
        variant: &Variant,
        bufs: &Buffers,
    ) -> Result<()> {
        if spec.sizes.max_q_len == 0 {
            return Ok(());
        }
        let (mut p, l) = flash_launch(spec, variant, self.gpu.info.sm_count)?;
        bufs.set_pointers(&mut p);
        match variant.tiles {
            Tiles::Hopper(tiles) => {
                let dt = spec.dtype;
                let (qt, kt) = (spec.sizes.q_tokens, spec.sizes.k_tokens);
                let map = |tokens, heads, dim, rows| {
                    TensorMapParams::of_dtype(dt, tokens, heads, dim, rows)
                };
                let mut tq = map(qt, spec.heads_q, spec.head_dim, tiles.block_m)?
                    .encode(bufs.q.ptr(), dt)?;
                let mut tk = map(kt, spec.heads_kv, spec.head_dim, tiles.block_n)?
                    .encode(bufs.k.ptr(), dt)?;
                let Some(fp8) = &bufs.fp8 else {
                    let mut tv = map(kt, spec.heads_kv, spec.head_dim_v, tiles.block_n)?
                        .encode(bufs.v.ptr(), dt)?;
                    let args = &mut [arg(&mut tq), arg(&mut tk), arg(&mut tv), arg(&mut p)];
                    return launch(&self.gpu, variant, l, args);
                };
                // FP8: V transposed first (same stream), then the attention kernel reads Vt.
                let mut f = fp8.args();
                let transpose = fp8.tables.transpose_launch(spec.heads_kv, spec.head_dim_v);
                if let Some(t) = transpose.map_err(unsupported)? {
                    let func = self.gpu.function(variant, 1, t.smem)?;
                    let args = &mut [arg(&mut p), arg(&mut f)];
                    self.gpu.launch(func, t.grid, t.block, t.smem, args)?;
                }
                let vt_map =
                    TensorMapParams::fp8_vt(fp8.tables.vt_keys(), spec.heads_kv, spec.head_dim_v)?;
                let mut tv = vt_map.encode(fp8.vt.ptr, dt)?;
                let args = &mut [
                    arg(&mut tq),
                    arg(&mut tk),
                    arg(&mut tv),
                    arg(&mut p),
                    arg(&mut f),
                ];
                launch(&self.gpu, variant, l, args)
            }
            _ => launch(&self.gpu, variant, l, &mut [arg(&mut p)]),
        }
    }

    /// The forward pass on host data (`Backend::forward`).
    pub(crate) fn forward_host(
        &self,
        spec: &AttentionSpec,
        q: TensorRef<'_>,
        k: TensorRef<'_>,
        v: TensorRef<'_>,
    ) -> Result<Output> {
        let checked = validate_inputs(spec, &q, &k, &v)?;
        let variant = self.choose(&checked)?;
        let _guard = self.gpu.lock.lock().unwrap_or_else(|e| e.into_inner());
        self.gpu.bind()?;
        let bufs = Buffers::new(&checked, q.as_bytes(), k.as_bytes(), v.as_bytes())?;
        self.launch_flash(&checked, &variant, &bufs)?;
        self.gpu.synchronize()?;
        let out = Tensor::from_bytes(spec.dtype.output(), &bufs.out.to_vec()?)?;
        let lse = match &bufs.lse {
            Some(b) => Some(bytemuck::pod_collect_to_vec(&b.to_vec()?)),
            None => None,
        };
        Ok(Output { out, lse })
    }

    /// The forward pass on tensors already on the GPU (no host round trip); returns when the
    /// kernel has finished. Tokens of no varlen sequence are left as the caller had them.
    ///
    /// # Safety
    /// Each pointer must address at least its tensor's bytes for `spec` (see [`DeviceTensors`])
    /// in the backend's device's primary context and stay valid for the call; `out` and `lse` must not
    /// overlap the inputs or each other.
    pub unsafe fn forward_device(
        &self,
        spec: &AttentionSpec,
        tensors: &DeviceTensors,
    ) -> Result<()> {
        self.forward_on_device(spec, tensors, &DeviceTables::default(), true)
    }

    /// [`forward_device`](Self::forward_device) reading the side tables in `tables` where the
    /// caller holds them (the others are uploaded from the spec). When the call allocates
    /// nothing (every table the spec needs is in `tables`, see [`DeviceTables::complete`], and
    /// the dtype is not FP8, whose descales and transposed V are per-call allocations) it only
    /// queues the kernel on the backend's stream (`set_stream`) and returns, like any CUDA op:
    /// no host copy, no wait. Otherwise it waits for the kernel before freeing its uploads.
    ///
    /// # Safety
    /// As for `forward_device`, and: each table must hold `len` elements of its type (the
    /// offsets within the spec's bounds: `varlen_bounds`), and every pointer, tensors and
    /// tables, must stay valid and unchanged until the stream has passed this call (an event
    /// recorded after it, or a synchronisation); out and lse are written until then.
    pub unsafe fn forward_device_with_tables(
        &self,
        spec: &AttentionSpec,
        tensors: &DeviceTensors,
        tables: &DeviceTables,
    ) -> Result<()> {
        self.forward_on_device(spec, tensors, tables, false)
    }

    /// Both device forwards; `wait`: always wait for the kernel (else only when we allocated).
    unsafe fn forward_on_device(
        &self,
        spec: &AttentionSpec,
        tensors: &DeviceTensors,
        tables: &DeviceTables,
        wait: bool,
    ) -> Result<()> {
        let checked = spec.validate()?;
        tables.check(spec)?;
        let variant = self.choose(&checked)?;
        if spec.return_lse != tensors.lse.is_some() {
            return Err(Error::argument(
                "lse",
                if tensors.lse.is_some() {
                    "given"
                } else {
                    "missing"
                },
                format!(
                    "an lse pointer is needed exactly when return_lse is set ({})",
                    spec.return_lse
                ),
            ));
        }
        let named = [
            ("q", tensors.q),
            ("k", tensors.k),
            ("v", tensors.v),
            ("out", tensors.out),
        ];
        check_device_pointers(named.into_iter().chain(tensors.lse.map(|p| ("lse", p))))?;
        let _guard = self.gpu.lock.lock().unwrap_or_else(|e| e.into_inner());
        self.gpu.bind()?;
        let bufs = Buffers::callers(&checked, tensors, tables)?;
        if wait || bufs.allocates() {
            self.launch_flash(&checked, &variant, &bufs)?;
            return self.gpu.synchronize();
        }
        // Nothing uploaded: the launch need not wait for the legacy default stream either.
        let _unordered = self.gpu.unordered();
        self.launch_flash(&checked, &variant, &bufs)
    }
}
