//! Recording work: a pass's dispatches into one compute pass (timed with timestamp queries
//! where asked), the grid of element-wise kernels, and the scratch buffers a pass used.

use crate::bindings::BufferSlice;
use crate::device::{scoped, unsupported};
use crate::WgpuBackend;
use flashattn_core::Result;

/// One kernel launch: its pipeline, bindings and grid.
pub(crate) struct Dispatch {
    pub pipeline: wgpu::ComputePipeline,
    pub group: wgpu::BindGroup,
    pub grid: [u32; 3],
}

/// Device buffers a recorded pass uses beyond its inputs and outputs; they go back to the
/// buffer pool once the work is submitted.
#[derive(Default)]
pub(crate) struct Scratch {
    pub buffers: Vec<wgpu::Buffer>,
}

impl Scratch {
    /// Bytes of device memory the scratch buffers hold (measured allocation sizes).
    pub fn bytes(&self) -> u64 {
        self.buffers.iter().map(|b| b.size()).sum()
    }

    pub fn keep(&mut self, buffer: &wgpu::Buffer) {
        self.buffers.push(buffer.clone());
    }
}

impl WgpuBackend {
    /// Returns a pass's scratch buffers to the pool.
    pub(crate) fn release(&self, scratch: Scratch) {
        for b in scratch.buffers {
            self.buffers.give(b);
        }
    }

    /// Records work with `record` into one command encoder and submits it inside error scopes
    /// (a wgpu error becomes `Error::Backend`). The scratch buffers go back to the pool once
    /// submitted (later work that takes them is queued after this). Returns their bytes.
    pub(crate) async fn submit(
        &self,
        record: impl FnOnce(&mut wgpu::CommandEncoder) -> Result<Scratch>,
    ) -> Result<u64> {
        let scratch = scoped(&self.device, || {
            let mut enc = self.device.create_command_encoder(&Default::default());
            let scratch = record(&mut enc)?;
            self.queue.submit([enc.finish()]);
            Ok(scratch)
        })
        .await?;
        let bytes = scratch.bytes();
        self.release(scratch);
        Ok(bytes)
    }
}

/// Records `dispatches` in order into one compute pass. `timer` gets timestamps 0 and 1 at
/// its start and end. wgpu orders the dispatches of a pass that share writable buffers.
pub(crate) fn record_pass(
    enc: &mut wgpu::CommandEncoder,
    label: &str,
    timer: Option<&wgpu::QuerySet>,
    dispatches: &[Dispatch],
) {
    let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
        label: Some(label),
        timestamp_writes: timer.map(|qs| wgpu::ComputePassTimestampWrites {
            query_set: qs,
            beginning_of_pass_write_index: Some(0),
            end_of_pass_write_index: Some(1),
        }),
    });
    for d in dispatches {
        pass.set_pipeline(&d.pipeline);
        pass.set_bind_group(0, &d.group, &[]);
        let [x, y, z] = d.grid;
        pass.dispatch_workgroups(x, y, z);
    }
}

/// Splits `n` workgroups over x and y within the per-dimension limit.
pub(crate) fn grid_2d(n: u64, dims: u64) -> Result<[u32; 3]> {
    let n = n.max(1);
    let x = n.min(dims);
    let y = n.div_ceil(x);
    if y > dims {
        return Err(unsupported(format!(
            "{n} workgroups exceed the adapter's {dims} x {dims} grid"
        )));
    }
    Ok([x as u32, y as u32, 1])
}

/// Checks that a caller's buffer can be bound as storage and holds `bytes` (rounded up to
/// whole words).
pub(crate) fn check_buffer(name: &str, slice: BufferSlice<'_>, bytes: u64) -> Result<()> {
    if !slice.buffer.usage().contains(wgpu::BufferUsages::STORAGE) {
        return Err(crate::device::backend_err(format!(
            "{name} buffer lacks BufferUsages::STORAGE"
        )));
    }
    let words = bytes.next_multiple_of(4);
    let end = slice.offset.checked_add(words);
    if slice.size < bytes || end.is_none_or(|end| end > slice.buffer.size()) {
        return Err(crate::device::backend_err(format!(
            "{name}: a slice of {} bytes at offset {} of a {}-byte buffer, but the spec needs {bytes} bytes (and the buffer whole words past them: {words})",
            slice.size,
            slice.offset,
            slice.buffer.size(),
        )));
    }
    if !slice.offset.is_multiple_of(4) {
        return Err(crate::device::backend_err(format!(
            "{name}: offset {} is not a multiple of 4 bytes (storage bindings need the adapter's min_storage_buffer_offset_alignment)",
            slice.offset
        )));
    }
    Ok(())
}

/// WebGPU binds a buffer either read-only or writable within one dispatch (its usage scope is
/// the whole buffer, not the bound range), so a tensor a kernel writes must not share a buffer
/// with one it reads in the same dispatch. Tensors on the same side may share one.
pub(crate) fn check_apart(
    read: &[(&str, BufferSlice<'_>)],
    written: &[(&str, BufferSlice<'_>)],
) -> Result<()> {
    for (w, ws) in written {
        if let Some((r, _)) = read.iter().find(|(_, rs)| rs.buffer == ws.buffer) {
            return Err(crate::device::backend_err(format!(
                "{w} and {r} are slices of one buffer, but a dispatch writes {w} while it reads {r} and WebGPU binds a buffer either read-only or writable per dispatch: give {w} its own buffer"
            )));
        }
    }
    Ok(())
}
