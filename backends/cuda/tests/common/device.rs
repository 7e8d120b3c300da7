//! Device memory the GPU tests allocate themselves, in device 0's primary context, for the
//! device-resident APIs (`forward_device`, `backward_device`); freed on drop.

use cudarc::driver::result as drv;
use cudarc::driver::sys;
use std::cell::RefCell;

pub struct DeviceMem {
    dev: sys::CUdevice,
    allocations: RefCell<Vec<u64>>,
}

impl DeviceMem {
    /// Makes device 0's primary context current (the backend must have opened device 0).
    pub fn new() -> DeviceMem {
        let dev = drv::device::get(0).unwrap();
        // SAFETY: device 0 exists; retaining the primary context is what the CUDA runtime
        // does too.
        let ctx = unsafe { drv::primary_ctx::retain(dev) }.unwrap();
        unsafe { drv::ctx::set_current(ctx) }.unwrap();
        DeviceMem {
            dev,
            allocations: RefCell::new(Vec::new()),
        }
    }

    /// A fresh allocation holding `bytes` (at least 16 bytes).
    pub fn upload(&self, bytes: &[u8]) -> u64 {
        // SAFETY: a fresh allocation of at least bytes.len() bytes, written from `bytes`.
        let p = unsafe { drv::malloc_sync(bytes.len().max(16)) }.unwrap();
        unsafe { drv::memcpy_htod_sync(p, bytes) }.unwrap();
        self.allocations.borrow_mut().push(p);
        p
    }

    /// `n` bytes from `p`, an allocation of `upload`.
    pub fn download(&self, p: u64, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        // SAFETY: the caller asks for at most the bytes it uploaded at `p`.
        unsafe { drv::memcpy_dtoh_sync(&mut v, p) }.unwrap();
        v
    }
}

impl Drop for DeviceMem {
    fn drop(&mut self) {
        for p in self.allocations.take() {
            // SAFETY: allocated by `upload`, freed once.
            let _ = unsafe { drv::free_sync(p) };
        }
        // SAFETY: retained in `new`.
        let _ = unsafe { drv::primary_ctx::release(self.dev) };
    }
}
