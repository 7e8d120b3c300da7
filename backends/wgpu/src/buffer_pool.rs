//! `BufferPool`: reuse of device buffers between calls (allocating on every forward costs more
//! than the kernel at small sizes).

use std::sync::Mutex;

/// Idle buffers kept at most (bytes); beyond that the largest idle ones are dropped.
const MAX_IDLE_BYTES: u64 = 1 << 30;

#[derive(Default)]
pub struct BufferPool {
    idle: Mutex<Vec<wgpu::Buffer>>,
}

/// Allocation size for a request of `size` bytes: a few size classes per power of two, so
/// that shapes close to each other share buffers.
fn size_class(size: u64) -> u64 {
    let size = size.max(16).next_multiple_of(16);
    if size <= 64 * 1024 {
        return size.next_multiple_of(256);
    }
    let step = size.next_power_of_two() / 8;
    size.next_multiple_of(step)
}

impl BufferPool {
    /// A buffer of at least `size` bytes with exactly `usage`.
    pub fn take(
        &self,
        device: &wgpu::Device,
        size: u64,
        usage: wgpu::BufferUsages,
    ) -> wgpu::Buffer {
        let want = size_class(size);
        if let Ok(mut idle) = self.idle.lock() {
            if let Some(pos) = idle
                .iter()
                .position(|b| b.usage() == usage && b.size() == want)
            {
                return idle.swap_remove(pos);
            }
        }
        device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("flashattn pooled"),
            size: want,
            usage,
            mapped_at_creation: false,
        })
    }

    /// Gives a buffer back for reuse (after the work using it has been submitted).
    pub fn give(&self, buffer: wgpu::Buffer) {
        if let Ok(mut idle) = self.idle.lock() {
            idle.push(buffer);
            let mut total: u64 = idle.iter().map(|b| b.size()).sum();
            while total > MAX_IDLE_BYTES {
                let Some((pos, _)) = idle.iter().enumerate().max_by_key(|(_, b)| b.size()) else {
                    break;
                };
                total -= idle.swap_remove(pos).size();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::size_class;

    #[test]
    fn size_classes_cover_the_request_with_bounded_waste() {
        for size in [
            1u64,
            4,
            255,
            256,
            257,
            65536,
            65537,
            1 << 20,
            (1 << 20) + 1,
            3 << 29,
        ] {
            let c = size_class(size);
            assert!(c >= size && c.is_multiple_of(16), "{size} -> {c}");
            assert!(c <= size + size / 4 + 256, "{size} -> {c}");
        }
    }
}
