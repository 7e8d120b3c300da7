//! The kernels' bind group layouts (each within WebGPU's default of 8 storage buffers per
//! stage) and the byte ranges of buffers bound to them.

use crate::device::backend_err;
use crate::WgpuBackend;
use flashattn_core::Result;

/// How a binding is used. Binding 0 is always the uniform `Params`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Access {
    Uniform,
    Read,
    ReadWrite,
}

use Access::{Read as R, ReadWrite as W, Uniform as U};

/// One bind group layout per kernel family; the WGSL declarations use the same numbers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LayoutKind {
    /// flash, combine, naive forward: q, k, v, out, tables, lse, partials / scores.
    Forward,
    /// bwd_prep.wgsl: out, dout, lse, stats.
    BwdPrep,
    /// bwd_dq.wgsl: q, k, v, dout, tables, stats, dq (f32).
    BwdDq,
    /// bwd_dkdv.wgsl: q, k, v, dout, tables, stats, dk (f32), dv (f32).
    BwdDkdv,
    /// bwd_cast.wgsl: f32 source, destination in the dtype.
    BwdCast,
    /// naive_bwd.wgsl: q, k, v, dout, tables, stats, scores, one gradient in the dtype.
    NaiveBwd,
    /// decode_append.wgsl: k_new, v_new, k cache, v cache, tables.
    Append,
}

impl LayoutKind {
    pub const ALL: [LayoutKind; 7] = [
        LayoutKind::Forward,
        LayoutKind::BwdPrep,
        LayoutKind::BwdDq,
        LayoutKind::BwdDkdv,
        LayoutKind::BwdCast,
        LayoutKind::NaiveBwd,
        LayoutKind::Append,
    ];

    fn entries(self) -> &'static [Access] {
        match self {
            LayoutKind::Forward => &[U, R, R, R, W, R, W, W],
            LayoutKind::BwdPrep => &[U, R, R, R, W],
            LayoutKind::BwdDq => &[U, R, R, R, R, R, R, W],
            LayoutKind::BwdDkdv => &[U, R, R, R, R, R, R, W, W],
            LayoutKind::BwdCast => &[U, R, W],
            LayoutKind::NaiveBwd => &[U, R, R, R, R, R, R, W, W],
            LayoutKind::Append => &[U, R, R, W, W, R],
        }
    }

    /// The tensor each binding holds, in order, for errors that name it.
    fn names(self) -> &'static str {
        match self {
            LayoutKind::Forward => "params q k v out tables lse partials",
            LayoutKind::BwdPrep => "params out dout lse stats",
            LayoutKind::BwdDq => "params q k v dout tables stats dq",
            LayoutKind::BwdDkdv => "params q k v dout tables stats dk dv",
            LayoutKind::BwdCast => "params acc gradient",
            LayoutKind::NaiveBwd => "params q k v dout tables stats scores gradient",
            LayoutKind::Append => "params k_new v_new k_cache v_cache tables",
        }
    }

    /// Number of bindings.
    pub fn binding_count(self) -> usize {
        self.entries().len()
    }
}

/// The bind group and pipeline layouts of every kernel family.
pub struct Layouts {
    layouts: Vec<(LayoutKind, wgpu::BindGroupLayout, wgpu::PipelineLayout)>,
}

impl Layouts {
    pub fn new(device: &wgpu::Device) -> Layouts {
        let layouts = LayoutKind::ALL
            .iter()
            .map(|&kind| {
                let entries: Vec<wgpu::BindGroupLayoutEntry> = kind
                    .entries()
                    .iter()
                    .enumerate()
                    .map(|(i, &access)| wgpu::BindGroupLayoutEntry {
                        binding: i as u32,
                        visibility: wgpu::ShaderStages::COMPUTE,
                        ty: wgpu::BindingType::Buffer {
                            ty: match access {
                                U => wgpu::BufferBindingType::Uniform,
                                R => wgpu::BufferBindingType::Storage { read_only: true },
                                W => wgpu::BufferBindingType::Storage { read_only: false },
                            },
                            has_dynamic_offset: false,
                            min_binding_size: None,
                        },
                        count: None,
                    })
                    .collect();
                let group = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
                    label: Some("flashattn"),
                    entries: &entries,
                });
                let pipeline = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
                    label: Some("flashattn"),
                    bind_group_layouts: &[Some(&group)],
                    immediate_size: 0,
                });
                (kind, group, pipeline)
            })
            .collect();
        Layouts { layouts }
    }

    fn get(&self, kind: LayoutKind) -> &(LayoutKind, wgpu::BindGroupLayout, wgpu::PipelineLayout) {
        // `new` builds every kind, in the order of `ALL`, which is the declaration order.
        &self.layouts[kind as usize]
    }

    pub fn pipeline_layout(&self, kind: LayoutKind) -> &wgpu::PipelineLayout {
        &self.get(kind).2
    }
}

/// A byte range of a buffer: how callers hand tensors to the device-resident API (from a whole
/// `&wgpu::Buffer` or a `wgpu::BufferBinding`, e.g. a sub-allocation of burn/cubecl's pool), and
/// what the backend binds. `offset` must be a multiple of the adapter's
/// `min_storage_buffer_offset_alignment` (256 on most GPUs), as for any storage binding.
#[derive(Clone, Copy, Debug)]
pub struct BufferSlice<'a> {
    pub buffer: &'a wgpu::Buffer,
    pub offset: u64,
    pub size: u64,
}

impl<'a> From<&'a wgpu::Buffer> for BufferSlice<'a> {
    fn from(buffer: &'a wgpu::Buffer) -> Self {
        BufferSlice::whole(buffer)
    }
}

impl<'a> From<wgpu::BufferBinding<'a>> for BufferSlice<'a> {
    /// `size: None` means the rest of the buffer, as in WebGPU.
    fn from(b: wgpu::BufferBinding<'a>) -> Self {
        let rest = b.buffer.size().saturating_sub(b.offset);
        BufferSlice {
            buffer: b.buffer,
            offset: b.offset,
            size: b.size.map_or(rest, |s| s.get()),
        }
    }
}

/// A [`BufferSlice`] holding its buffer (a handle clone): for slices chosen inside a pass,
/// either a pooled buffer or a caller's slice.
#[derive(Clone, Debug)]
pub(crate) struct HeldSlice {
    pub buffer: wgpu::Buffer,
    pub offset: u64,
    pub size: u64,
}

impl From<wgpu::Buffer> for HeldSlice {
    fn from(buffer: wgpu::Buffer) -> Self {
        let size = buffer.size();
        HeldSlice {
            buffer,
            offset: 0,
            size,
        }
    }
}

impl From<BufferSlice<'_>> for HeldSlice {
    fn from(s: BufferSlice<'_>) -> Self {
        HeldSlice {
            buffer: s.buffer.clone(),
            offset: s.offset,
            size: s.size,
        }
    }
}

impl<'a> From<&'a HeldSlice> for BufferSlice<'a> {
    fn from(s: &'a HeldSlice) -> Self {
        BufferSlice {
            buffer: &s.buffer,
            offset: s.offset,
            size: s.size,
        }
    }
}

impl<'a> BufferSlice<'a> {
    pub fn whole(buffer: &'a wgpu::Buffer) -> Self {
        BufferSlice {
            buffer,
            offset: 0,
            size: buffer.size(),
        }
    }

    /// `[offset, offset + bytes)` of `base` widened to whole words (storage bindings are
    /// word-sized; the widening may reach past `base` but never past its buffer).
    pub fn words(base: impl Into<BufferSlice<'a>>, offset: u64, bytes: u64) -> Result<Self> {
        let base = base.into();
        let size = bytes.max(4).next_multiple_of(4);
        let start = base.offset.checked_add(offset);
        let fits = offset
            .checked_add(bytes)
            .is_some_and(|end| end <= base.size)
            && start
                .and_then(|s| s.checked_add(size))
                .is_some_and(|end| end <= base.buffer.size());
        match start {
            Some(offset) if fits => Ok(BufferSlice {
                buffer: base.buffer,
                offset,
                size,
            }),
            _ => Err(backend_err(format!(
                "a slice of {} bytes at offset {} of a {}-byte buffer is too small to bind {size} bytes at offset {offset} of it (pad device buffers to a multiple of 4 bytes)",
                base.size,
                base.offset,
                base.buffer.size()
            ))),
        }
    }

    /// The token range `[t0, t1)` of `base` with `row` bytes per token.
    pub fn tokens(
        base: impl Into<BufferSlice<'a>>,
        (t0, t1): (u64, u64),
        row: u64,
    ) -> Result<Self> {
        BufferSlice::words(base, t0 * row, (t1 - t0) * row)
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

impl WgpuBackend {
    /// A bind group of `kind` with `ranges` in binding order.
    pub(crate) fn bind_group(
        &self,
        kind: LayoutKind,
        ranges: &[BufferSlice<'_>],
    ) -> Result<wgpu::BindGroup> {
        if ranges.len() != kind.binding_count() {
            return Err(backend_err(format!(
                "{kind:?} takes {} bindings, {} given",
                kind.binding_count(),
                ranges.len()
            )));
        }
        // Binding 0 is the uniform (its offsets follow the uniform alignment). The plans keep
        // every chunk at an aligned distance from its slice's start, so only a caller's slice
        // that starts off the alignment lands here.
        let align = u64::from(self.limits.min_storage_buffer_offset_alignment);
        let mut named = kind.names().split(' ').zip(ranges).skip(1);
        if let Some((name, r)) = named.find(|(_, r)| !r.offset.is_multiple_of(align)) {
            return Err(backend_err(format!(
                "{name}: a device buffer slice starts at byte offset {}, not a multiple of the adapter's min_storage_buffer_offset_alignment ({align})",
                r.offset
            )));
        }
        let entries: Vec<wgpu::BindGroupEntry<'_>> = ranges
            .iter()
            .enumerate()
            .map(|(i, r)| r.entry(i as u32))
            .collect();
        Ok(self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some("flashattn"),
            layout: &self.layouts.get(kind).1,
            entries: &entries,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::LayoutKind;

    #[test]
    fn every_binding_has_a_name() {
        for kind in LayoutKind::ALL {
            assert_eq!(
                kind.names().split(' ').count(),
                kind.binding_count(),
                "{kind:?}"
            );
        }
    }
}
