//! The GPU: context, device memory, modules and launches, over cudarc's driver API.
//! Every public entry of the backend binds the context to the calling thread first.

use crate::compile::{compile_with, BACKEND};
use crate::loader::load_driver;
use crate::variants::{arch_for, Variant};
use cudarc::driver::{result as drv, sys, DriverError};
use flashattn_core::{Error, Result};
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

/// A driver error as our error, naming the call.
pub fn drv_err(what: &'static str) -> impl Fn(DriverError) -> Error {
    move |e: DriverError| {
        let name = e
            .error_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let text = e
            .error_string()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        Error::backend(BACKEND, format!("{what}: {name} ({text})"))
    }
}

/// What `probe` finds out about a device.
#[derive(Clone, Debug)]
pub struct DeviceInfo {
    pub name: String,
    pub compute_capability: (i32, i32),
    /// e.g. 13000 for CUDA 13.0.
    pub driver_version: i32,
    pub sm_count: usize,
    /// Largest dynamic shared memory one block may opt into, bytes.
    pub smem_optin: usize,
    pub total_mem: usize,
}

impl DeviceInfo {
    /// The NVRTC target: `sm_90a` on Hopper.
    pub fn arch(&self) -> String {
        arch_for(self.compute_capability.0, self.compute_capability.1)
    }

    /// "NVIDIA H100 80GB HBM3 (sm_90a, driver 13.0, 132 SMs)".
    pub fn describe(&self) -> String {
        format!(
            "{} ({}, driver {}.{}, {} SMs)",
            self.name,
            self.arch(),
            self.driver_version / 1000,
            (self.driver_version % 1000) / 10,
            self.sm_count
        )
    }
}

fn unavailable(reason: impl Into<String>) -> Error {
    Error::Unavailable {
        backend: BACKEND,
        reason: reason.into(),
    }
}

/// Loads the driver, initialises it and describes device `ordinal`; `Unavailable` says what is
/// missing, `InvalidArgument` names an ordinal past the devices the driver sees.
pub fn probe(ordinal: usize) -> Result<DeviceInfo> {
    load_driver().map_err(unavailable)?;
    drv::init().map_err(|e| unavailable(format!("cuInit failed: {}", drv_err("cuInit")(e))))?;
    let count = drv::device::get_count().map_err(drv_err("cuDeviceGetCount"))?;
    if count < 1 {
        return Err(unavailable("the NVIDIA driver sees no CUDA device"));
    }
    if ordinal >= count as usize {
        return Err(Error::argument(
            "CUDA device ordinal",
            ordinal,
            format!("the NVIDIA driver sees {count} device(s), numbered from 0"),
        ));
    }
    let dev = drv::device::get(ordinal as i32).map_err(drv_err("cuDeviceGet"))?;
    let attr = |a: sys::CUdevice_attribute| -> Result<i32> {
        // SAFETY: `dev` is a valid device handle.
        unsafe { drv::device::get_attribute(dev, a) }.map_err(drv_err("cuDeviceGetAttribute"))
    };
    use sys::CUdevice_attribute as A;
    let mut driver_version = 0;
    // SAFETY: out-parameter.
    unsafe { sys::cuDriverGetVersion(&mut driver_version) }
        .result()
        .map_err(drv_err("cuDriverGetVersion"))?;
    Ok(DeviceInfo {
        name: drv::device::get_name(dev).map_err(drv_err("cuDeviceGetName"))?,
        compute_capability: (
            attr(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?,
            attr(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?,
        ),
        driver_version,
        sm_count: attr(A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)? as usize,
        smem_optin: attr(A::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)? as usize,
        // SAFETY: `dev` is valid.
        total_mem: unsafe { drv::device::total_mem(dev) }.map_err(drv_err("cuDeviceTotalMem"))?,
    })
}

struct Module {
    module: sys::CUmodule,
    funcs: Vec<sys::CUfunction>,
}

/// One device's primary context (the one the CUDA runtime, PyTorch and candle use) and the
/// modules loaded into it.
pub struct Gpu {
    pub info: DeviceInfo,
    dev: sys::CUdevice,
    ctx: sys::CUcontext,
    modules: Mutex<HashMap<Variant, Module>>,
    /// Serialises work on the GPU: the backend is shared across threads.
    pub lock: Mutex<()>,
    /// The stream every launch goes on (null: the legacy default stream); see `set_stream`.
    stream: sys::CUstream,
    /// Whether launches wait for the legacy default stream (`order_after_default_stream`);
    /// cleared while a call that uploaded nothing launches (`unordered`).
    after_uploads: AtomicBool,
}

// SAFETY: CUDA contexts, modules and functions are usable from any thread once the context is
// made current there (`bind`); all mutation goes through the mutexes.
unsafe impl Send for Gpu {}
unsafe impl Sync for Gpu {}

impl Gpu {
    pub fn open(ordinal: usize) -> Result<Gpu> {
        let info = probe(ordinal)?;
        if info.compute_capability.0 < 7 {
            return Err(unavailable(format!(
                "{} has compute capability {}.{}; flashattn's CUDA kernels need 7.0 or newer",
                info.name, info.compute_capability.0, info.compute_capability.1
            )));
        }
        let dev = drv::device::get(ordinal as i32).map_err(drv_err("cuDeviceGet"))?;
        // SAFETY: valid device; released in Drop.
        let ctx = unsafe { drv::primary_ctx::retain(dev) }
            .map_err(drv_err("cuDevicePrimaryCtxRetain"))?;
        let gpu = Gpu {
            info,
            dev,
            ctx,
            modules: Mutex::new(HashMap::new()),
            lock: Mutex::new(()),
            stream: std::ptr::null_mut(),
            after_uploads: AtomicBool::new(true),
        };
        gpu.bind()?;
        Ok(gpu)
    }

    /// Makes the context current on this thread.
    pub fn bind(&self) -> Result<()> {
        // SAFETY: the context is retained for our lifetime.
        unsafe { drv::ctx::set_current(self.ctx) }.map_err(drv_err("cuCtxSetCurrent"))
    }

    /// Entry point `entry` (index into `variant.entry_points()`), compiling and loading the
    /// module on first use and raising its dynamic shared-memory limit to `smem`.
    pub fn function(
        &self,
        variant: &Variant,
        entry: usize,
        smem: usize,
    ) -> Result<sys::CUfunction> {
        let mut modules = self.modules.lock().unwrap_or_else(|e| e.into_inner());
        if !modules.contains_key(variant) {
            // A cached cubin the driver refuses is deleted and compiled again (cache.rs).
            let built = compile_with(variant, &self.info.arch(), |cubin| {
                // SAFETY: a cubin NVRTC produced for this device's arch (or a cached one, checked
                // against its hash); the driver copies it and validates the image.
                unsafe { drv::module::load_data(cubin.as_ptr().cast()) }
                    .map_err(drv_err("cuModuleLoadData"))
            })?;
            let module = built.value;
            let mut funcs = Vec::new();
            for name in variant.entry_points() {
                let cname = std::ffi::CString::new(*name)
                    .map_err(|_| Error::backend(BACKEND, format!("bad entry point {name}")))?;
                // SAFETY: `module` is loaded; the name exists in the source (unit-tested).
                let f = unsafe { drv::module::get_function(module, cname) }
                    .map_err(drv_err("cuModuleGetFunction"))?;
                funcs.push(f);
            }
            modules.insert(*variant, Module { module, funcs });
        }
        let f = modules
            .get(variant)
            .and_then(|m| m.funcs.get(entry).copied())
            .ok_or_else(|| {
                Error::backend(
                    BACKEND,
                    format!("{} has no entry point {entry}", variant.name()),
                )
            })?;
        if smem > 48 * 1024 {
            // SAFETY: valid function handle.
            unsafe {
                drv::function::set_function_attribute(
                    f,
                    sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    smem as i32,
                )
            }
            .map_err(drv_err("cuFuncSetAttribute"))?;
        }
        Ok(f)
    }

    /// Launches on `stream` from now on (null: the legacy default stream).
    ///
    /// # Safety
    /// `stream` must be a stream of this device's primary context and outlive every call made
    /// with it.
    pub unsafe fn set_stream(&mut self, stream: sys::CUstream) {
        self.stream = stream;
    }

    pub fn stream(&self) -> sys::CUstream {
        self.stream
    }

    /// Makes the caller's stream wait for what this call queued on the legacy default stream
    /// before: the synchronous uploads and memsets of inputs and side tables (cuMemcpyHtoD
    /// from pageable memory may return before its DMA lands; a non-blocking stream would not
    /// wait for it). Nothing to do on the default stream itself.
    fn order_after_default_stream(&self) -> Result<()> {
        if self.stream.is_null() || !self.after_uploads.load(Ordering::Relaxed) {
            return Ok(());
        }
        let flags = sys::CUevent_flags::CU_EVENT_DISABLE_TIMING;
        let event = drv::event::create(flags).map_err(drv_err("cuEventCreate"))?;
        // SAFETY: a live event; the stream is the caller's (set_stream's contract). The event
        // may be destroyed once waited on: the wait keeps what it needs.
        let r = unsafe {
            drv::event::record(event, std::ptr::null_mut())
                .map_err(drv_err("cuEventRecord"))
                .and_then(|()| {
                    drv::stream::wait_event(
                        self.stream,
                        event,
                        sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT,
                    )
                    .map_err(drv_err("cuStreamWaitEvent"))
                })
        };
        // SAFETY: created above, destroyed once.
        let _ = unsafe { drv::event::destroy(event) };
        r
    }

    /// Launches skip `order_after_default_stream` until the guard drops: for a call that
    /// queued nothing on the default stream. Take it under `lock` (calls are serialised).
    pub(crate) fn unordered(&self) -> impl Drop + '_ {
        struct Restore<'a>(&'a AtomicBool);
        impl Drop for Restore<'_> {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Relaxed);
            }
        }
        self.after_uploads.store(false, Ordering::Relaxed);
        Restore(&self.after_uploads)
    }

    /// Launches `f` on the backend's stream (after the uploads queued before it) and checks
    /// the launch.
    pub fn launch(
        &self,
        f: sys::CUfunction,
        grid: (u32, u32, u32),
        block: u32,
        smem: usize,
        args: &mut [*mut c_void],
    ) -> Result<()> {
        self.order_after_default_stream()?;
        // SAFETY: the caller passes pointers to live values whose types match the kernel's
        // parameters (KernelParams mirrors the CUDA struct; tensor maps are 128-byte blobs).
        unsafe { drv::launch_kernel(f, grid, (block, 1, 1), smem as u32, self.stream, args) }
            .map_err(drv_err("cuLaunchKernel"))
    }

    /// Waits for the backend's stream only (never the whole context: other streams of the
    /// caller keep running).
    pub fn synchronize(&self) -> Result<()> {
        // SAFETY: null or the caller's live stream (set_stream's contract).
        unsafe { drv::stream::synchronize(self.stream) }
            .map_err(drv_err("kernel execution (cuStreamSynchronize)"))
    }
}

impl Drop for Gpu {
    fn drop(&mut self) {
        let _ = self.bind();
        let modules = std::mem::take(self.modules.get_mut().unwrap_or_else(|e| e.into_inner()));
        for (_, m) in modules {
            // SAFETY: loaded by us, unloaded once.
            let _ = unsafe { drv::module::unload(m.module) };
        }
        // SAFETY: retained in `open`.
        let _ = unsafe { drv::primary_ctx::release(self.dev) };
    }
}

/// A device allocation, freed on drop (the context must be current, as it is inside our calls).
pub struct DevBuf {
    pub ptr: sys::CUdeviceptr,
    pub bytes: usize,
}

impl DevBuf {
    pub fn alloc(bytes: usize) -> Result<DevBuf> {
        // cuMemAlloc rejects 0 bytes; 16 keeps TMA's alignment rules trivially true.
        let n = bytes.max(16);
        // SAFETY: plain allocation.
        let ptr = unsafe { drv::malloc_sync(n) }.map_err(|e| {
            let mut err = drv_err("cuMemAlloc")(e);
            if let Error::Backend { message, .. } = &mut err {
                message.push_str(&format!(" while allocating {bytes} bytes"));
            }
            err
        })?;
        Ok(DevBuf { ptr, bytes })
    }

    pub fn from_bytes(data: &[u8]) -> Result<DevBuf> {
        let b = DevBuf::alloc(data.len())?;
        if !data.is_empty() {
            // SAFETY: `b` holds at least data.len() bytes.
            unsafe { drv::memcpy_htod_sync(b.ptr, data) }.map_err(drv_err("cuMemcpyHtoD"))?;
        }
        Ok(b)
    }

    pub fn zeroed(bytes: usize) -> Result<DevBuf> {
        let b = DevBuf::alloc(bytes)?;
        // SAFETY: in bounds.
        unsafe { drv::memset_d8_sync(b.ptr, 0, bytes.max(16)) }.map_err(drv_err("cuMemsetD8"))?;
        Ok(b)
    }

    pub fn to_vec(&self) -> Result<Vec<u8>> {
        let mut v = vec![0u8; self.bytes];
        if self.bytes > 0 {
            // SAFETY: in bounds.
            unsafe { drv::memcpy_dtoh_sync(&mut v, self.ptr) }.map_err(drv_err("cuMemcpyDtoH"))?;
        }
        Ok(v)
    }
}

impl Drop for DevBuf {
    fn drop(&mut self) {
        // SAFETY: allocated by us, freed once.
        let _ = unsafe { drv::free_sync(self.ptr) };
    }
}

/// A CUDA event pair timing work on one stream.
pub struct Timer {
    start: sys::CUevent,
    stop: sys::CUevent,
    stream: sys::CUstream,
}

impl Timer {
    /// Times work on `gpu`'s stream.
    pub fn new(gpu: &Gpu) -> Result<Timer> {
        let flags = sys::CUevent_flags::CU_EVENT_DEFAULT;
        let start = drv::event::create(flags).map_err(drv_err("cuEventCreate"))?;
        let stop = drv::event::create(flags).map_err(drv_err("cuEventCreate"))?;
        Ok(Timer {
            start,
            stop,
            stream: gpu.stream,
        })
    }
    pub fn start(&self) -> Result<()> {
        // SAFETY: live event; null or the caller's live stream.
        unsafe { drv::event::record(self.start, self.stream) }.map_err(drv_err("cuEventRecord"))
    }
    /// Stops and waits; milliseconds between start and stop.
    pub fn stop_ms(&self) -> Result<f64> {
        // SAFETY: live events.
        unsafe {
            drv::event::record(self.stop, self.stream).map_err(drv_err("cuEventRecord"))?;
            drv::event::synchronize(self.stop)
                .map_err(drv_err("kernel execution (cuEventSynchronize)"))?;
            drv::event::elapsed(self.start, self.stop)
                .map(|t| t as f64)
                .map_err(drv_err("cuEventElapsedTime"))
        }
    }
}

impl Drop for Timer {
    fn drop(&mut self) {
        // SAFETY: created by us.
        unsafe {
            let _ = drv::event::destroy(self.start);
            let _ = drv::event::destroy(self.stop);
        }
    }
}

/// Refuses a null or misaligned caller pointer, by name: TMA and cp.async read 16-byte aligned
/// global addresses; null is never valid.
pub(crate) fn check_device_pointers(
    named: impl IntoIterator<Item = (&'static str, sys::CUdeviceptr)>,
) -> Result<()> {
    for (name, ptr) in named {
        if ptr == 0 || ptr % 16 != 0 {
            return Err(Error::argument(
                name,
                format!("{ptr:#x}"),
                "device pointers must be non-null and 16-byte aligned",
            ));
        }
    }
    Ok(())
}
