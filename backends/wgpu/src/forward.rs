//! The forward pass: the host API, the device-resident API, and recording the flash (and
//! combine) dispatches of a plan.

use crate::bindings::{BufferSlice, LayoutKind};
use crate::decode::CacheArgs;
use crate::device::{backend_err, unsupported};
use crate::dispatch::{check_apart, check_buffer, grid_2d, record_pass, Dispatch, Scratch};
use crate::params::{Params, FLAG_FIRST, FLAG_PARTIAL};
use crate::plan::{plan, slicing, Geometry, Plan, Slicing, MAX_KEYS_PER_WORKGROUP};
use crate::shaders::{Kernel, Variant};
use crate::strided::{views, View};
use crate::tiles::{TileLimits, Tiles};
use crate::WgpuBackend;
use flashattn_core::{
    validate_inputs, Algorithm, AttentionSpec, CheckedSpec, DType, ForwardInputs, Output, Result,
    Tensor, TensorRef,
};

/// Device-resident inputs in the spec's layout and dtype (bf16 as raw 16-bit words, f16 as
/// IEEE half), created with `BufferUsages::STORAGE` on this backend's device.
#[derive(Clone, Copy)]
pub struct DeviceInputs<'a> {
    pub q: BufferSlice<'a>,
    pub k: BufferSlice<'a>,
    pub v: BufferSlice<'a>,
}

/// Device-resident outputs: `out` in the spec's output dtype, `lse` (f32) when the spec asks
/// for it. Sizes are rounded up to a multiple of 4 bytes.
#[derive(Clone, Copy)]
pub struct DeviceOutputs<'a> {
    pub out: BufferSlice<'a>,
    pub lse: Option<BufferSlice<'a>>,
}

/// Target number of workgroups in flight: below it, split-KV spreads the keys.
const TARGET_WORKGROUPS: u64 = 256;
const MAX_SPLITS: u64 = 32;

/// One recorded forward (or decode) pass: its plan, tiles, grid, tables, and the cache
/// arguments of a decode.
pub(crate) struct Pass<'a> {
    pub plan: &'a Plan,
    pub tiles: Tiles,
    pub grid: [u32; 3],
    pub tables: &'a wgpu::Buffer,
    pub cache: Option<&'a CacheArgs>,
}

/// What one flash or combine dispatch binds.
struct Work {
    params: Params,
    q: (u64, u64),
    /// Key tokens bound; `None` for the combine kernel.
    k: Option<(u64, u64)>,
}

impl WgpuBackend {
    /// Host API: uploads q, k, v, runs the forward pass and reads out (and LSE) back.
    pub async fn forward_async(
        &self,
        spec: &AttentionSpec,
        inputs: ForwardInputs<'_>,
    ) -> Result<Output> {
        self.run_host(spec, Algorithm::Flash, inputs).await
    }

    /// Host API for naive attention (materialised scores): the benchmark's peer, exposed so
    /// that its results can be checked too.
    pub async fn naive_forward_async(
        &self,
        spec: &AttentionSpec,
        inputs: ForwardInputs<'_>,
    ) -> Result<Output> {
        self.run_host(spec, Algorithm::Naive, inputs).await
    }

    async fn run_host(
        &self,
        spec: &AttentionSpec,
        algo: Algorithm,
        ForwardInputs { q, k, v }: ForwardInputs<'_>,
    ) -> Result<Output> {
        let c = validate_inputs(spec, &q, &k, &v)?;
        self.supports_checked(&c)?;
        self.ready().await?;
        let out_bytes = c.sizes.out as u64 * c.dtype.output().size_bytes() as u64;
        let lse_bytes = if c.return_lse {
            c.sizes.lse as u64 * 4
        } else {
            0
        };
        let [qv, kv, vv, ..] = views(&c);
        let (qb, kb, vb) = (
            self.upload_view(q, &qv),
            self.upload_view(k, &kv),
            self.upload_view(v, &vv),
        );
        // COPY_DST: cleared / filled when varlen leaves tokens uncovered.
        let io = wgpu::BufferUsages::STORAGE
            | wgpu::BufferUsages::COPY_SRC
            | wgpu::BufferUsages::COPY_DST;
        let out = self.buffers.take(&self.device, out_bytes, io);
        let lse = c
            .return_lse
            .then(|| self.buffers.take(&self.device, lse_bytes, io));
        let lse_at = out_bytes.next_multiple_of(4);
        let read = self.read_buffer(lse_at + lse_bytes);
        // Varlen tokens past cu_seqlens_q[batch] belong to no sequence: out 0, LSE -inf (the
        // kernels never visit them, and pooled buffers hold old data).
        let uncovered = uncovered_q_tokens(&c);
        if let (true, Some(lse)) = (uncovered, &lse) {
            let ninf = vec![f32::NEG_INFINITY; c.sizes.lse];
            self.queue.write_buffer(lse, 0, bytemuck::cast_slice(&ninf));
        }
        let submitted = self
            .submit(|enc| {
                if uncovered {
                    enc.clear_buffer(&out, 0, None);
                }
                let inputs = DeviceInputs {
                    q: (&qb).into(),
                    k: (&kb).into(),
                    v: (&vb).into(),
                };
                let outputs = DeviceOutputs {
                    out: (&out).into(),
                    lse: lse.as_ref().map(BufferSlice::from),
                };
                let scratch = match algo {
                    Algorithm::Flash => self.encode_forward(&c, inputs, outputs, enc, None)?,
                    Algorithm::Naive => self.encode_naive(&c, inputs, outputs, enc, None)?,
                    Algorithm::Copy => {
                        return Err(unsupported("the copy peer is a benchmark only"))
                    }
                };
                enc.copy_buffer_to_buffer(&out, 0, &read, 0, lse_at);
                if let Some(lse) = &lse {
                    enc.copy_buffer_to_buffer(lse, 0, &read, lse_at, lse_bytes);
                }
                Ok(scratch)
            })
            .await;
        let bytes = match submitted {
            Ok(_) => crate::device::read_mapped(&self.device, &read, lse_at + lse_bytes).await,
            Err(e) => Err(e),
        };
        for b in [qb, kb, vb, out, read].into_iter().chain(lse) {
            self.buffers.give(b);
        }
        let bytes = bytes?;
        self.errors.check()?;
        let out_t = Tensor::from_bytes(c.dtype.output(), &bytes[..out_bytes as usize])?;
        let lse = c.return_lse.then(|| {
            let at = lse_at as usize;
            bytemuck::pod_collect_to_vec::<u8, f32>(&bytes[at..at + lse_bytes as usize])
        });
        Ok(Output { out: out_t, lse })
    }

    /// Device-resident API: records and submits the forward pass on buffers that already live
    /// on this backend's device (see [`WgpuBackend::from_device`]). Nothing is read back;
    /// the caller's later submissions on the same queue see the results. Varlen tokens past
    /// `cu_seqlens_q[batch]` belong to no sequence: their out is not guaranteed to be written
    /// (nor their LSE).
    pub async fn forward_buffers(
        &self,
        spec: &AttentionSpec,
        inputs: DeviceInputs<'_>,
        outputs: DeviceOutputs<'_>,
    ) -> Result<()> {
        let c = spec.validate()?;
        self.supports_checked(&c)?;
        self.ready().await?;
        self.submit(|enc| self.encode_forward(&c, inputs, outputs, enc, None))
            .await?;
        self.errors.check()
    }

    /// A pooled storage buffer holding `t` (padded to whole words).
    pub(crate) fn upload(&self, t: TensorRef<'_>) -> wgpu::Buffer {
        self.upload_as(
            t,
            wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST,
        )
    }

    /// A pooled storage buffer holding input `t` as `view` reads it: a strided one as it
    /// lies, up to the last element the view reaches (the kernels read through the strides).
    pub(crate) fn upload_view(&self, t: TensorRef<'_>, view: &View) -> wgpu::Buffer {
        let bytes = t.as_bytes();
        let reach = view.bytes(bytes.len() as u64).min(bytes.len() as u64) as usize;
        let usage = wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST;
        self.upload_bytes(&bytes[..reach], usage)
    }

    /// [`upload`](Self::upload) into a buffer of `usage` (which has COPY_DST).
    pub(crate) fn upload_as(&self, t: TensorRef<'_>, usage: wgpu::BufferUsages) -> wgpu::Buffer {
        self.upload_bytes(t.as_bytes(), usage)
    }

    fn upload_bytes(&self, bytes: &[u8], usage: wgpu::BufferUsages) -> wgpu::Buffer {
        let buf = self.buffers.take(&self.device, bytes.len() as u64, usage);
        let whole = bytes.len() / 4 * 4;
        if whole > 0 {
            self.queue.write_buffer(&buf, 0, &bytes[..whole]);
        }
        if whole < bytes.len() {
            // Writes are whole words: pad the tail.
            let mut tail = [0u8; 4];
            tail[..bytes.len() - whole].copy_from_slice(&bytes[whole..]);
            self.queue.write_buffer(&buf, whole as u64, &tail);
        }
        buf
    }

    /// A pooled buffer to copy `bytes` of results into and map.
    pub(crate) fn read_buffer(&self, bytes: u64) -> wgpu::Buffer {
        self.buffers.take(
            &self.device,
            bytes,
            wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        )
    }

    pub(crate) fn tile_limits(&self) -> TileLimits {
        TileLimits {
            max_invocations: self
                .limits
                .max_compute_invocations_per_workgroup
                .min(self.limits.max_compute_workgroup_size_x),
            workgroup_storage: self.limits.max_compute_workgroup_storage_size,
            subgroup_size: self.subgroup_size(),
        }
    }

    /// The forward tiles for `c` on this adapter.
    pub(crate) fn forward_tiles(&self, c: &CheckedSpec<'_>) -> Tiles {
        let lim = self.tile_limits();
        let max_q = c.sizes.max_q_len.min(u32::MAX as usize) as u32;
        let tiles = Tiles::forward(c.head_dim as u32, c.head_dim_v as u32, max_q, &lim);
        self.tile_override.map_or(tiles, |o| o.apply(tiles, &lim))
    }

    /// How the keys are sliced: split-KV spreads them over more workgroups when
    /// (batch x heads x query blocks) alone is too few (a CPU adapter such as lavapipe has few
    /// cores to fill, so it gets a smaller target), and no workgroup walks more than
    /// `MAX_KEYS_PER_WORKGROUP` keys per dispatch. `q_blocks` and `heads` are the grid's x and y.
    pub(crate) fn key_slicing(
        &self,
        c: &CheckedSpec<'_>,
        tiles: &Tiles,
        q_blocks: u64,
        heads: u64,
    ) -> Slicing {
        let max_k = c.sizes.max_k_len as u64;
        let wgs = q_blocks * heads * c.batch as u64;
        let k_tiles = max_k.div_ceil(u64::from(tiles.block_n));
        let target = if self.info.device_type == wgpu::DeviceType::Cpu {
            TARGET_WORKGROUPS / 8
        } else {
            TARGET_WORKGROUPS
        };
        let max_z = u64::from(self.limits.max_compute_workgroups_per_dimension) / c.batch as u64;
        // Only for short queries (decode): one query block, so the partials stay small.
        let splits = if q_blocks > 1 || wgs >= target || k_tiles < 8 {
            1
        } else {
            target
                .div_ceil(wgs)
                .min(k_tiles / 4)
                .min(MAX_SPLITS)
                .min(max_z)
                .max(1)
        };
        slicing(max_k, tiles.block_n, splits as u32, MAX_KEYS_PER_WORKGROUP)
    }

    /// Records the forward pass into `enc`. `timer` writes timestamps 0 and 1 at the start and
    /// end of the (single) compute pass.
    pub(crate) fn encode_forward(
        &self,
        c: &CheckedSpec<'_>,
        inputs: DeviceInputs<'_>,
        outputs: DeviceOutputs<'_>,
        enc: &mut wgpu::CommandEncoder,
        timer: Option<&wgpu::QuerySet>,
    ) -> Result<Scratch> {
        check_forward_buffers(c, inputs, outputs)?;
        let tiles = self.forward_tiles(c);
        let geom = forward_geometry(c);
        // Packed rows of odd length share words between rows: write through the combine
        // kernel, which owns whole words.
        let odd_bf16 = c.dtype == DType::Bf16 && c.head_dim_v % 2 == 1;
        let q_blocks = (c.sizes.max_q_len as u64).div_ceil(u64::from(tiles.block_m));
        let plan = plan(
            &geom,
            self.binding_limit,
            u64::from(self.limits.min_storage_buffer_offset_alignment),
            self.key_slicing(c, &tiles, q_blocks, c.heads_q as u64),
            odd_bf16,
        )?;
        let dims = u64::from(self.limits.max_compute_workgroups_per_dimension);
        if q_blocks > dims {
            return Err(unsupported(format!(
                "{} query rows need {q_blocks} workgroups in x, more than the adapter's {dims}",
                c.sizes.max_q_len
            )));
        }
        let grid = [
            q_blocks as u32,
            c.heads_q as u32,
            c.batch as u32 * plan.keys.splits,
        ];
        let mut scratch = Scratch::default();
        let tables = self.tables(c, &[]);
        scratch.keep(&tables);
        let pass = Pass {
            plan: &plan,
            tiles,
            grid,
            tables: &tables,
            cache: None,
        };
        let dispatches = self.forward_dispatches(c, &pass, inputs, outputs, &mut scratch)?;
        record_pass(enc, "flashattn forward", timer, &dispatches);
        Ok(scratch)
    }

    /// The flash and combine dispatches of `pass`, with their uniforms and partials (kept in
    /// `scratch`). With a cache, k and v are the cache buffers, bound whole.
    pub(crate) fn forward_dispatches(
        &self,
        c: &CheckedSpec<'_>,
        pass: &Pass<'_>,
        inputs: DeviceInputs<'_>,
        outputs: DeviceOutputs<'_>,
        scratch: &mut Scratch,
    ) -> Result<Vec<Dispatch>> {
        let (plan, tables, grid) = (pass.plan, pass.tables, pass.grid);
        let geom = forward_geometry(c);
        let mut work = forward_work(c, plan);
        if let Some(cache) = pass.cache {
            work.iter_mut().for_each(|w| cache.apply(&mut w.params));
        }
        let uniforms = self.uniforms(&work.iter().map(|w| w.params).collect::<Vec<_>>());
        scratch.keep(&uniforms.buffer);
        let part = plan.partial.then(|| {
            let usage = wgpu::BufferUsages::STORAGE;
            self.buffers
                .take(&self.device, plan.partial_bytes(&geom), usage)
        });
        if let Some(p) = &part {
            scratch.keep(p);
        }
        let pipe = |kernel| {
            self.pipeline(Variant {
                kernel,
                dtype: c.dtype,
            })
        };
        let flash = match pass.cache {
            Some(_) => pipe(Kernel::Decode(pass.tiles))?,
            None => pipe(Kernel::Flash(pass.tiles))?,
        };
        let combine = pipe(Kernel::Combine)?;
        let es = c.dtype.size_bytes() as u64;
        // One combine invocation per output pair of the largest chunk's rows.
        let pairs = (plan.max_rows * c.heads_q as u64 * c.head_dim_v as u64).div_ceil(2);
        let dims = u64::from(self.limits.max_compute_workgroups_per_dimension);
        let combine_grid = grid_2d(pairs.div_ceil(64), dims)?;
        let lse = match outputs.lse {
            Some(l) if c.return_lse => BufferSlice::words(l, 0, c.sizes.lse as u64 * 4)?,
            _ => BufferSlice::whole(&self.dummy),
        };
        let part = BufferSlice::whole(part.as_ref().unwrap_or(&self.dummy));
        let [qv, kv, vv, ..] = views(c);
        let mut dispatches = Vec::with_capacity(work.len());
        for (i, w) in work.iter().enumerate() {
            let (q, k, v, pipeline, grid) = match w.k {
                Some(_) if pass.cache.is_some() => (
                    qv.bind(inputs.q, w.q)?,
                    BufferSlice::words(inputs.k, 0, c.sizes.k as u64 * es)?,
                    BufferSlice::words(inputs.v, 0, c.sizes.v as u64 * es)?,
                    &flash,
                    grid,
                ),
                Some(k) => (
                    qv.bind(inputs.q, w.q)?,
                    kv.bind(inputs.k, k)?,
                    vv.bind(inputs.v, k)?,
                    &flash,
                    grid,
                ),
                // The combine kernel reads no q/k/v; their first words satisfy the layout.
                None => (
                    BufferSlice::words(inputs.q, 0, 4)?,
                    BufferSlice::words(inputs.k, 0, 4)?,
                    BufferSlice::words(inputs.v, 0, 4)?,
                    &combine,
                    combine_grid,
                ),
            };
            let out = BufferSlice::tokens(outputs.out, w.q, geom.o_row)?;
            let bindings = [
                uniforms.range(i),
                q,
                k,
                v,
                out,
                BufferSlice::whole(tables),
                lse,
                part,
            ];
            dispatches.push(Dispatch {
                pipeline: pipeline.clone(),
                group: self.bind_group(LayoutKind::Forward, &bindings)?,
                grid,
            });
        }
        Ok(dispatches)
    }
}

/// Whether varlen leaves query tokens past `cu_seqlens_q[batch]` outside every sequence.
pub(crate) fn uncovered_q_tokens(c: &CheckedSpec<'_>) -> bool {
    c.varlen
        .as_ref()
        .is_some_and(|v| v.cu_seqlens_q.last().map_or(0, |&x| x as usize) < c.seqlen_q)
}

pub(crate) fn forward_geometry(c: &CheckedSpec<'_>) -> Geometry {
    let es = c.dtype.size_bytes() as u64;
    let (hq, hkv) = (c.heads_q as u64, c.heads_kv as u64);
    let (d, dv) = (c.head_dim as u64, c.head_dim_v as u64);
    Geometry {
        q_row: hq * d * es,
        o_row: hq * dv * es,
        k_row: hkv * d * es,
        v_row: hkv * dv * es,
        q_tokens: c.sizes.q_tokens as u64,
        k_tokens: c.sizes.k_tokens as u64,
        part_row: hq * (dv + 1) * 4,
    }
}

pub(crate) fn check_forward_buffers(
    c: &CheckedSpec<'_>,
    inputs: DeviceInputs<'_>,
    outputs: DeviceOutputs<'_>,
) -> Result<()> {
    let es = c.dtype.size_bytes() as u64;
    let s = &c.sizes;
    let [qv, kv, vv, ..] = views(c);
    check_buffer("q", inputs.q, qv.bytes(s.q as u64 * es))?;
    check_buffer("k", inputs.k, kv.bytes(s.k as u64 * es))?;
    check_buffer("v", inputs.v, vv.bytes(s.v as u64 * es))?;
    check_buffer("out", outputs.out, s.out as u64 * es)?;
    let read = [("q", inputs.q), ("k", inputs.k), ("v", inputs.v)];
    let mut written = vec![("out", outputs.out)];
    written.extend(outputs.lse.map(|l| ("lse", l)));
    check_apart(&read, &written)?;
    match (c.return_lse, outputs.lse) {
        (true, Some(l)) => check_buffer("lse", l, s.lse as u64 * 4),
        (true, None) => Err(backend_err(
            "the spec asks for LSE but no lse buffer was given",
        )),
        _ => Ok(()),
    }
}

/// The dispatches of `plan` in order: per query chunk, the flash dispatches of every key chunk
/// and pass (the first on a slot writes it, later ones merge), then the combine.
fn forward_work(c: &CheckedSpec<'_>, plan: &Plan) -> Vec<Work> {
    let base = Params::base(c);
    let slots = plan.keys.splits;
    let mut work = Vec::new();
    for &q in &plan.q_chunks {
        let mut chunk = base;
        chunk.num_splits = slots;
        chunk.slice_len = plan.keys.slice_len;
        chunk.part_lse =
            (u64::from(slots) * (q.1 - q.0) * c.heads_q as u64 * c.head_dim_v as u64) as u32;
        if plan.partial {
            chunk.flags |= FLAG_PARTIAL;
        }
        for (ki, &k) in plan.k_chunks.iter().enumerate() {
            for pass in 0..plan.keys.passes {
                let mut p = chunk.bound(q, k);
                p.slice0 = pass * slots;
                if ki == 0 && pass == 0 {
                    p.flags |= FLAG_FIRST;
                }
                work.push(Work {
                    params: p,
                    q,
                    k: Some(k),
                });
            }
        }
        if plan.partial {
            work.push(Work {
                params: chunk.bound(q, (0, 0)),
                q,
                k: None,
            });
        }
    }
    work
}
