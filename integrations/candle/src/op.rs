//! The candle op: `CustomOp3` over (q, k, v) running flashattn's CPU backend, forward and
//! backward.

use crate::host::{fa_err, view, Elem, View};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor};
use flashattn_core::{
    AttentionSpec, Backend, BackwardInputs, DType as FaDType, ForwardInputs, InputStrides,
};
use flashattn_cpu::CpuBackend;
use std::sync::{Arc, Mutex, OnceLock};

/// One CPU backend (and thread pool) for the whole process.
fn cpu_backend() -> &'static CpuBackend {
    static CPU: OnceLock<CpuBackend> = OnceLock::new();
    CPU.get_or_init(CpuBackend::new)
}

/// Variable-length batch arguments, already on the host.
#[derive(Clone, Debug)]
pub(crate) struct VarlenArgs {
    pub cu_seqlens_q: Vec<i32>,
    pub cu_seqlens_k: Vec<i32>,
    pub max_seqlen_q: usize,
    pub max_seqlen_k: usize,
}

/// Everything but q, k and v, in candle-flash-attn's conventions.
#[derive(Clone, Debug)]
pub(crate) struct Params {
    pub softmax_scale: f32,
    /// `None`: unbounded. `(None, Some(0))` is the (bottom-right aligned) causal mask.
    pub window_size_left: Option<usize>,
    pub window_size_right: Option<usize>,
    /// 0 is off.
    pub softcap: f32,
    /// Slopes `[heads_q]` or `[batch, heads_q]` (the flag).
    pub alibi: Option<(Vec<f32>, bool)>,
    pub varlen: Option<VarlenArgs>,
}

/// The op candle records in its graph. The forward keeps its LSE for the backward (and for
/// `flash_attn_with_lse`); one op value per call, so the slot belongs to one forward.
pub(crate) struct FlashAttnOp {
    pub params: Params,
    pub lse: Arc<Mutex<Option<Vec<f32>>>>,
}

/// A candle window bound as flashattn's: `None` (or longer than any sequence) is -1.
fn window_bound(w: Option<usize>) -> i64 {
    w.and_then(|w| i64::try_from(w).ok()).unwrap_or(-1)
}

fn dims<const N: usize>(name: &str, d: &[usize], layout: &str) -> Result<[usize; N]> {
    <[usize; N]>::try_from(d).map_err(|_| {
        candle_core::Error::msg(format!(
            "flashattn: {name} has shape {d:?}; expected rank {N} {layout}"
        ))
    })
}

fn same(what: &str, a: usize, b: usize) -> Result<()> {
    if a != b {
        candle_core::bail!("flashattn: {what} differ: {a} vs {b}");
    }
    Ok(())
}

impl Params {
    /// The flashattn spec of these arguments for q, k, v of shapes `q`, `k`, `v`.
    pub fn spec(
        &self,
        dtype: FaDType,
        q: &[usize],
        k: &[usize],
        v: &[usize],
    ) -> Result<AttentionSpec> {
        let mut spec = match &self.varlen {
            None => {
                let l = "(batch, seqlen, heads, head_dim)";
                let [b, sq, hq, d] = dims("q", q, l)?;
                let [bk, sk, hk, dk] = dims("k", k, l)?;
                let [bv, sv, hv, dv] = dims("v", v, l)?;
                same("batch sizes of q and k", b, bk)?;
                same("batch sizes of q and v", b, bv)?;
                same("seqlens of k and v", sk, sv)?;
                same("heads of k and v", hk, hv)?;
                same("head_dim of q and k", d, dk)?;
                AttentionSpec::new(b, hq, sq, sk, d)
                    .heads_kv(hk)
                    .head_dim_v(dv)
            }
            Some(vl) => {
                let l = "(total_tokens, heads, head_dim)";
                let [tq, hq, d] = dims("q", q, l)?;
                let [tk, hk, dk] = dims("k", k, l)?;
                let [tv, hv, dv] = dims("v", v, l)?;
                same("total tokens of k and v", tk, tv)?;
                same("heads of k and v", hk, hv)?;
                same("head_dim of q and k", d, dk)?;
                AttentionSpec::new(1, hq, tq, tk, d)
                    .heads_kv(hk)
                    .head_dim_v(dv)
                    .varlen(vl.cu_seqlens_q.clone(), vl.cu_seqlens_k.clone())
            }
        };
        let (left, right) = (
            window_bound(self.window_size_left),
            window_bound(self.window_size_right),
        );
        // FlashAttention's own reading: right 0 with no left bound is the causal mask.
        spec = if left < 0 && right == 0 {
            spec.causal(true)
        } else {
            spec.window(left, right)
        };
        spec = spec
            .dtype(dtype)
            .scale(self.softmax_scale)
            .softcap(self.softcap)
            .return_lse(true);
        if let Some((slopes, per_batch)) = &self.alibi {
            spec = spec.alibi(slopes.clone(), *per_batch);
        }
        spec.validate().map_err(fa_err)?;
        if let Some(vl) = &self.varlen {
            let (lq, lk) = spec.max_lens();
            for (name, given, longest) in [
                ("max_seqlen_q", vl.max_seqlen_q, lq),
                ("max_seqlen_k", vl.max_seqlen_k, lk),
            ] {
                if given < longest {
                    candle_core::bail!(
                        "flashattn: {name} = {given} is shorter than the longest sequence ({longest})"
                    );
                }
            }
        }
        Ok(spec)
    }
}

/// Shape of the output: q's with head_dim_v last.
fn out_shape(q: &[usize], spec: &AttentionSpec) -> Shape {
    let mut s = q.to_vec();
    if let Some(last) = s.last_mut() {
        *last = spec.head_dim_v;
    }
    Shape::from(s)
}

impl FlashAttnOp {
    pub fn new(params: Params) -> Self {
        FlashAttnOp {
            params,
            lse: Arc::new(Mutex::new(None)),
        }
    }

    /// The forward on q, k, v given as (storage, layout) pairs.
    fn cpu_fwd_t<T: Elem>(
        &self,
        [(s1, l1), (s2, l2), (s3, l3)]: [(&CpuStorage, &Layout); 3],
    ) -> Result<(CpuStorage, Shape)> {
        let spec = self.params.spec(T::FA, l1.dims(), l2.dims(), l3.dims())?;
        // Strided views (transposed, narrowed) are read in place, not copied.
        let (q, k, v) = (view::<T>(s1, l1)?, view::<T>(s2, l2)?, view::<T>(s3, l3)?);
        let spec = spec.strides(InputStrides {
            q: q.strides,
            k: k.strides,
            v: v.strides,
            ..Default::default()
        });
        let [q, k, v] = [&q, &k, &v].map(|x| T::tensor_ref(&x.data));
        let out = cpu_backend()
            .forward(&spec, ForwardInputs { q, k, v })
            .map_err(fa_err)?;
        *self.lse_slot()? = out.lse;
        let values = T::from_fa(out.out)?;
        Ok((T::to_cpu_storage_owned(values), out_shape(l1.dims(), &spec)))
    }

    fn lse_slot(&self) -> Result<std::sync::MutexGuard<'_, Option<Vec<f32>>>> {
        self.lse
            .lock()
            .map_err(|_| candle_core::Error::msg("flashattn: the LSE slot's lock is poisoned"))
    }

    /// The backward on q, k, v, the forward's out and dout.
    fn bwd_t<T: Elem>(
        &self,
        [q, k, v, out, dout]: [&Tensor; 5],
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        if !q.device().is_cpu() {
            candle_core::bail!(
                "flashattn: the backward runs on candle's CPU device only; q is on {:?}",
                q.device()
            );
        }
        let spec = self.params.spec(T::FA, q.dims(), k.dims(), v.dims())?;
        let lse = self.lse_slot()?.clone().ok_or_else(|| {
            candle_core::Error::msg("flashattn: backward called before the forward kept its LSE")
        })?;
        let dout = dout.to_dtype(T::DTYPE)?;
        let tensors = [q, k, v, out, &dout];
        let guards = tensors.map(|t| t.storage_and_layout());
        let mut views: Vec<View<'_, T>> = Vec::with_capacity(5);
        for (storage, layout) in &guards {
            match &**storage {
                Storage::Cpu(s) => views.push(view::<T>(s, layout)?),
                _ => candle_core::bail!("flashattn: the backward's tensors must be on the CPU"),
            }
        }
        let [hq, hk, hv, ho, hdo] = <[View<'_, T>; 5]>::try_from(views)
            .map_err(|_| candle_core::Error::msg("flashattn: five views expected"))?;
        let spec = spec.strides(InputStrides {
            q: hq.strides,
            k: hk.strides,
            v: hv.strides,
            out: ho.strides,
            dout: hdo.strides,
        });
        let grads = cpu_backend()
            .backward(
                &spec,
                BackwardInputs {
                    q: T::tensor_ref(&hq.data),
                    k: T::tensor_ref(&hk.data),
                    v: T::tensor_ref(&hv.data),
                    out: T::tensor_ref(&ho.data),
                    lse: &lse,
                    dout: T::tensor_ref(&hdo.data),
                },
            )
            .map_err(fa_err)?;
        let dev = q.device();
        let dq = Tensor::from_vec(T::from_fa(grads.dq)?, q.shape(), dev)?;
        let dk = Tensor::from_vec(T::from_fa(grads.dk)?, k.shape(), dev)?;
        let dv = Tensor::from_vec(T::from_fa(grads.dv)?, v.shape(), dev)?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

/// A forward on one of candle's GPU devices: an error naming the device and the way out
/// (candle's default would only say there is no implementation).
macro_rules! unsupported_device {
    ($name:ident, $storage:ty, $msg:literal) => {
        fn $name(
            &self,
            _: &$storage,
            _: &Layout,
            _: &$storage,
            _: &Layout,
            _: &$storage,
            _: &Layout,
        ) -> Result<($storage, Shape)> {
            candle_core::bail!($msg)
        }
    };
}

impl CustomOp3 for FlashAttnOp {
    fn name(&self) -> &'static str {
        "flashattn"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (d1, d2, d3) = (s1.dtype(), s2.dtype(), s3.dtype());
        if d1 != d2 || d1 != d3 {
            candle_core::bail!("flashattn: q, k, v dtypes differ: {d1:?}, {d2:?}, {d3:?}");
        }
        let qkv = [(s1, l1), (s2, l2), (s3, l3)];
        match d1 {
            DType::F32 => self.cpu_fwd_t::<f32>(qkv),
            DType::F16 => self.cpu_fwd_t::<half::f16>(qkv),
            DType::BF16 => self.cpu_fwd_t::<half::bf16>(qkv),
            dt => candle_core::bail!("flashattn: q, k, v are {dt:?}; expected f32, f16 or bf16"),
        }
    }

    unsupported_device!(
        cuda_fwd,
        candle_core::CudaStorage,
        "flashattn: unsupported on candle's CUDA device yet (only its CPU device); \
         move q, k, v to Device::Cpu or use candle-flash-attn there"
    );

    unsupported_device!(
        metal_fwd,
        candle_core::MetalStorage,
        "flashattn: unsupported on candle's Metal device (only its CPU device)"
    );

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &Tensor,
        dout: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let tensors = [q, k, v, out, dout];
        match q.dtype() {
            DType::F32 => self.bwd_t::<f32>(tensors),
            DType::F16 => self.bwd_t::<half::f16>(tensors),
            DType::BF16 => self.bwd_t::<half::bf16>(tensors),
            dt => candle_core::bail!("flashattn: q, k, v are {dt:?}; expected f32, f16 or bf16"),
        }
    }
}
