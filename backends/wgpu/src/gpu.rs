//! Small device helpers: the shared bind group layout, the kernels' uniform, reading buffers
//! back, device timers and the subgroup probe.

use crate::context::{backend_err, scoped};
use crate::WgpuBackend;
use flashattn_core::Result;

/// Mirrors `Params` in shaders/common.wgsl (24 scalars).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub struct Params {
    pub batch: u32,
    pub heads_q: u32,
    pub heads_kv: u32,
    pub group: u32,
    pub seqlen_q: u32,
    pub seqlen_k: u32,
    pub d: u32,
    pub dv: u32,
    pub scale_log2: f32,
    pub scale_over_cap: f32,
    pub softcap_log2: f32,
    pub win_left: i32,
    pub win_right: i32,
    pub flags: u32,
    pub num_splits: u32,
    pub split_base: u32,
    pub total_splits: u32,
    pub q_tok0: u32,
    pub q_tok1: u32,
    pub k_tok0: u32,
    pub k_tok1: u32,
    pub tab_cu_k: u32,
    pub tab_alibi: u32,
    pub part_lse: u32,
}

pub const FLAG_VARLEN: u32 = 1;
pub const FLAG_ALIBI: u32 = 2;
pub const FLAG_ALIBI_PER_BATCH: u32 = 4;
pub const FLAG_LSE: u32 = 8;
pub const FLAG_PARTIAL: u32 = 16;

/// Stride of the per-dispatch `Params` in the uniform buffer.
pub fn params_stride(limits: &wgpu::Limits) -> u64 {
    (std::mem::size_of::<Params>() as u64)
        .next_multiple_of(u64::from(limits.min_uniform_buffer_offset_alignment))
}

/// Binding 0: uniform; 1-3: q, k, v; 4: out; 5: tables; 6: lse; 7: partials / scores.
pub fn bind_group_layout(device: &wgpu::Device) -> wgpu::BindGroupLayout {
    let storage = |binding, read_only| wgpu::BindGroupLayoutEntry {
        binding,
        visibility: wgpu::ShaderStages::COMPUTE,
        ty: wgpu::BindingType::Buffer {
            ty: wgpu::BufferBindingType::Storage { read_only },
            has_dynamic_offset: false,
            min_binding_size: None,
        },
        count: None,
    };
    device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
        label: Some("flashattn"),
        entries: &[
            wgpu::BindGroupLayoutEntry {
                binding: 0,
                visibility: wgpu::ShaderStages::COMPUTE,
                ty: wgpu::BindingType::Buffer {
                    ty: wgpu::BufferBindingType::Uniform,
                    has_dynamic_offset: false,
                    min_binding_size: None,
                },
                count: None,
            },
            storage(1, true),
            storage(2, true),
            storage(3, true),
            storage(4, false),
            storage(5, true),
            storage(6, false),
            storage(7, false),
        ],
    })
}

/// A byte range of a buffer to bind.
#[derive(Clone, Copy)]
pub struct Range<'a> {
    pub buffer: &'a wgpu::Buffer,
    pub offset: u64,
    pub size: u64,
}

impl<'a> Range<'a> {
    pub fn whole(buffer: &'a wgpu::Buffer) -> Self {
        Range {
            buffer,
            offset: 0,
            size: buffer.size(),
        }
    }

    /// `[offset, offset + bytes)` widened to whole words (storage bindings are word-sized).
    pub fn words(buffer: &'a wgpu::Buffer, offset: u64, bytes: u64) -> Result<Self> {
        let size = bytes.max(4).next_multiple_of(4);
        if offset + size > buffer.size() {
            return Err(backend_err(format!(
                "buffer of {} bytes is too small to bind {size} bytes at offset {offset} (pad device buffers to a multiple of 4 bytes)",
                buffer.size()
            )));
        }
        Ok(Range {
            buffer,
            offset,
            size,
        })
    }

    fn entry(&self, binding: u32) -> wgpu::BindGroupEntry<'a> {
        wgpu::BindGroupEntry {
            binding,
            resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                buffer: self.buffer,
                offset: self.offset,
                size: wgpu::BufferSize::new(self.size),
            }),
        }
    }
}

/// The eight bindings of one dispatch, in layout order.
pub fn bind_group(backend: &WgpuBackend, ranges: [Range<'_>; 8]) -> wgpu::BindGroup {
    let entries: Vec<wgpu::BindGroupEntry<'_>> = ranges
        .iter()
        .enumerate()
        .map(|(i, r)| r.entry(i as u32))
        .collect();
    backend
        .device
        .create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some("flashattn"),
            layout: &backend.layout,
            entries: &entries,
        })
}

/// Waits for submitted work on native (on the web the browser drives completion).
pub fn wait(device: &wgpu::Device) -> Result<()> {
    #[cfg(not(target_arch = "wasm32"))]
    device
        .poll(wgpu::PollType::wait_indefinitely())
        .map_err(|e| backend_err(format!("device poll failed: {e}")))?;
    #[cfg(target_arch = "wasm32")]
    let _ = device;
    Ok(())
}

/// Maps a MAP_READ buffer (after its copy was submitted) and returns its first `len` bytes.
pub async fn read_mapped(
    device: &wgpu::Device,
    buffer: &wgpu::Buffer,
    len: u64,
) -> Result<Vec<u8>> {
    let (tx, rx) = futures_channel::oneshot::channel();
    buffer.map_async(wgpu::MapMode::Read, .., move |r| {
        let _ = tx.send(r);
    });
    wait(device)?;
    rx.await
        .map_err(|_| backend_err("buffer mapping was cancelled"))?
        .map_err(|e| backend_err(format!("buffer mapping failed: {e}")))?;
    let bytes = {
        let view = buffer
            .get_mapped_range(..)
            .map_err(|e| backend_err(format!("mapped range: {e}")))?;
        view[..len as usize].to_vec()
    };
    buffer.unmap();
    Ok(bytes)
}

/// Resolves once all submitted work is done (on native and on the web).
pub async fn sync(device: &wgpu::Device, queue: &wgpu::Queue) -> Result<()> {
    let (tx, rx) = futures_channel::oneshot::channel();
    queue.on_submitted_work_done(move || {
        let _ = tx.send(());
    });
    wait(device)?;
    rx.await
        .map_err(|_| backend_err("device lost while waiting for work"))
}

/// Milliseconds on a host clock (fallback timing where the adapter has no timestamp queries).
pub fn now_ms() -> f64 {
    #[cfg(not(target_arch = "wasm32"))]
    {
        use std::sync::OnceLock;
        static START: OnceLock<std::time::Instant> = OnceLock::new();
        START
            .get_or_init(std::time::Instant::now)
            .elapsed()
            .as_secs_f64()
            * 1e3
    }
    #[cfg(target_arch = "wasm32")]
    {
        js_sys::Date::now()
    }
}

/// Runs shaders/subgroup_probe.wgsl and returns the subgroup width the flash kernel may rely
/// on (0 if the xor-shuffle does not address `local_invocation_index ^ m`).
pub async fn probe_subgroups(backend: &WgpuBackend) -> Result<u32> {
    let device = &backend.device;
    const N: u64 = 128;
    let out = device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("flashattn subgroup probe"),
        size: N * 8,
        usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
        mapped_at_creation: false,
    });
    let read = device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("flashattn subgroup probe read"),
        size: N * 8,
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    scoped(device, || {
        let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some("flashattn subgroup probe"),
            source: wgpu::ShaderSource::Wgsl(crate::shaders::subgroup_probe_source().into()),
        });
        let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some("flashattn subgroup probe"),
            layout: None,
            module: &module,
            entry_point: Some("main"),
            compilation_options: Default::default(),
            cache: None,
        });
        let bg = device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: None,
            layout: &pipeline.get_bind_group_layout(0),
            entries: &[wgpu::BindGroupEntry {
                binding: 0,
                resource: out.as_entire_binding(),
            }],
        });
        let mut enc = device.create_command_encoder(&Default::default());
        {
            let mut pass = enc.begin_compute_pass(&Default::default());
            pass.set_pipeline(&pipeline);
            pass.set_bind_group(0, &bg, &[]);
            pass.dispatch_workgroups(1, 1, 1);
        }
        enc.copy_buffer_to_buffer(&out, 0, &read, 0, N * 8);
        backend.queue.submit([enc.finish()]);
        Ok(())
    })
    .await?;
    let bytes = read_mapped(device, &read, N * 8).await?;
    let words: Vec<u32> = bytemuck::pod_collect_to_vec(&bytes);
    let size = words.chunks(2).map(|w| w[1]).min().unwrap_or(0);
    if size < 2 || !size.is_power_of_two() {
        return Ok(0);
    }
    // Every xor distance below the subgroup width (up to 8) must address lid ^ m.
    let needed: u32 = (0..4)
        .map(|b| 1u32 << b)
        .filter(|&m| m < size)
        .fold(0, |a, m| a | m);
    let ok = words.chunks(2).all(|w| w[0] & needed == needed);
    Ok(if ok { size.min(16) } else { 0 })
}
