//! The kernels' uniform `Params` (mirrored by `struct Params` in shaders/params.wgsl; a test
//! reflects the WGSL with naga and compares names, types, offsets and size), the per-problem
//! tables (cu_seqlens, ALiBi slopes), and the uniform buffer of one recorded pass.

use crate::bindings::BufferSlice;
use crate::strided::{views, Input, View};
use crate::WgpuBackend;
use flashattn_core::CheckedSpec;

/// Declares `Params` and `Params::FIELDS` (name, type, byte offset) from one field list.
macro_rules! params_struct {
    ($(#[$meta:meta])* pub struct $name:ident { $($(#[$fmeta:meta])* pub $field:ident: $ty:ident,)* }) => {
        $(#[$meta])*
        #[repr(C)]
        #[derive(Clone, Copy, Debug, Default, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
        pub struct $name { $($(#[$fmeta])* pub $field: $ty,)* }

        impl $name {
            /// Every field's name, type and byte offset, in declaration order.
            #[cfg_attr(not(test), allow(dead_code))]
            pub const FIELDS: &'static [(&'static str, &'static str, usize)] =
                &[$((stringify!($field), stringify!($ty), std::mem::offset_of!($name, $field)),)*];
        }
    };
}

params_struct! {
    /// The problem and one dispatch's part of it; field meanings are in shaders/params.wgsl.
    pub struct Params {
        pub batch: u32,
        pub heads_q: u32,
        pub heads_kv: u32,
        pub group: u32,
        pub seqlen_q: u32,
        pub seqlen_k: u32,
        pub d: u32,
        pub dv: u32,
        pub scale: f32,
        pub scale_log2: f32,
        pub scale_over_cap: f32,
        pub softcap_log2: f32,
        pub win_left: i32,
        pub win_right: i32,
        pub flags: u32,
        pub num_splits: u32,
        pub slice_len: u32,
        pub slice0: u32,
        pub q_tok0: u32,
        pub q_tok1: u32,
        pub k_tok0: u32,
        pub k_tok1: u32,
        pub tab_cu_k: u32,
        pub tab_alibi: u32,
        pub part_lse: u32,
        pub seqlen_new: u32,
        pub page_size: u32,
        pub max_blocks: u32,
        pub tab_pages: u32,
        pub tab_seqlens: u32,
        pub tab_cos: u32,
        pub rotary_dim: u32,
        pub rotary_span: u32,
        pub append_b0: u32,
        pub append_b1: u32,
        pub q_sb: u32,
        pub q_ss: u32,
        pub q_sh: u32,
        pub q_at: u32,
        pub k_sb: u32,
        pub k_ss: u32,
        pub k_sh: u32,
        pub k_at: u32,
        pub v_sb: u32,
        pub v_ss: u32,
        pub v_sh: u32,
        pub v_at: u32,
        pub out_sb: u32,
        pub out_ss: u32,
        pub out_sh: u32,
        pub out_at: u32,
        pub dout_sb: u32,
        pub dout_ss: u32,
        pub dout_sh: u32,
        pub dout_at: u32,
    }
}

pub const FLAG_VARLEN: u32 = 1;
pub const FLAG_ALIBI: u32 = 2;
pub const FLAG_ALIBI_PER_BATCH: u32 = 4;
pub const FLAG_LSE: u32 = 8;
pub const FLAG_PARTIAL: u32 = 16;
/// The first dispatch on an accumulator writes it instead of adding to it.
pub const FLAG_FIRST: u32 = 32;
/// Decode against a KV cache (see `decode.rs`).
pub const FLAG_CACHE: u32 = 64;
pub const FLAG_ROTARY_INTERLEAVED: u32 = 128;
pub const FLAG_ROTARY_Q_POSITIONAL: u32 = 256;
/// A strided input, bound whole: its `*_at` stays 0 whatever tokens a dispatch binds.
pub const FLAG_WHOLE_Q: u32 = 512;
pub const FLAG_WHOLE_K: u32 = 1024;
pub const FLAG_WHOLE_V: u32 = 2048;
pub const FLAG_WHOLE_OUT: u32 = 4096;
pub const FLAG_WHOLE_DOUT: u32 = 8192;

impl Params {
    /// The fields every dispatch of `c` shares. Sizes fit in u32 and positions in i32: the
    /// backend refuses larger problems (`WgpuBackend::supports_checked`).
    pub fn base(c: &CheckedSpec<'_>) -> Params {
        let log2e = std::f32::consts::LOG2_E;
        let mut flags = 0;
        if c.is_varlen() {
            flags |= FLAG_VARLEN;
        }
        if let Some(a) = &c.alibi {
            flags |= FLAG_ALIBI;
            if a.per_batch {
                flags |= FLAG_ALIBI_PER_BATCH;
            }
        }
        if c.return_lse {
            flags |= FLAG_LSE;
        }
        let views = views(c);
        for (input, view) in Input::ALL.iter().zip(&views) {
            if view.is_strided() {
                flags |= input.whole_flag();
            }
        }
        // Windows longer than the sequences are already dropped (unbounded) by `Mask`.
        let window = |w: Option<u64>| w.map_or(-1, |w| i32::try_from(w).unwrap_or(i32::MAX));
        Params {
            batch: c.batch as u32,
            heads_q: c.heads_q as u32,
            heads_kv: c.heads_kv as u32,
            group: c.group_size() as u32,
            seqlen_q: c.seqlen_q as u32,
            seqlen_k: c.seqlen_k as u32,
            d: c.head_dim as u32,
            dv: c.head_dim_v as u32,
            scale: c.scale,
            scale_log2: c.scale * log2e,
            scale_over_cap: if c.softcap > 0.0 {
                c.scale / c.softcap
            } else {
                0.0
            },
            softcap_log2: c.softcap * log2e,
            win_left: window(c.mask.left),
            win_right: window(c.mask.right),
            flags,
            num_splits: 1,
            slice_len: u32::MAX,
            slice0: 0,
            q_tok0: 0,
            q_tok1: c.sizes.q_tokens as u32,
            k_tok0: 0,
            k_tok1: c.sizes.k_tokens as u32,
            tab_cu_k: c.batch as u32 + 1,
            tab_alibi: 2 * (c.batch as u32 + 1),
            part_lse: 0,
            // Decode fields: set by `decode::CacheArgs::apply`.
            page_size: 1,
            max_blocks: 1,
            ..Params::default()
        }
        .with_views(&views)
    }

    /// The input strides of `views` (in `Input::ALL` order), their `*_at` for token 0.
    fn with_views(mut self, views: &[View; 5]) -> Params {
        let [q, k, v, o, g] = views;
        (self.q_sb, self.q_ss, self.q_sh) = (q.sb, q.ss, q.sh);
        (self.k_sb, self.k_ss, self.k_sh) = (k.sb, k.ss, k.sh);
        (self.v_sb, self.v_ss, self.v_sh) = (v.sb, v.ss, v.sh);
        (self.out_sb, self.out_ss, self.out_sh) = (o.sb, o.ss, o.sh);
        (self.dout_sb, self.dout_ss, self.dout_sh) = (g.sb, g.ss, g.sh);
        self
    }

    /// These params with the query tokens `q` and key tokens `k` bound.
    pub fn bound(mut self, q: (u64, u64), k: (u64, u64)) -> Params {
        (self.q_tok0, self.q_tok1) = (q.0 as u32, q.1 as u32);
        (self.k_tok0, self.k_tok1) = (k.0 as u32, k.1 as u32);
        // A contiguous input is bound from the dispatch's first token (`View::at`); the
        // contiguous token stride is its row, so `at` is that many elements in.
        let flags = self.flags;
        let at = |whole: u32, tok0: u64, ss: u32| {
            if flags & whole != 0 {
                0
            } else {
                tok0.wrapping_mul(u64::from(ss)) as u32
            }
        };
        self.q_at = at(FLAG_WHOLE_Q, q.0, self.q_ss);
        self.k_at = at(FLAG_WHOLE_K, k.0, self.k_ss);
        self.v_at = at(FLAG_WHOLE_V, k.0, self.v_ss);
        self.out_at = at(FLAG_WHOLE_OUT, q.0, self.out_ss);
        self.dout_at = at(FLAG_WHOLE_DOUT, q.0, self.dout_ss);
        self
    }
}

/// The words of the `tables` binding: cu_seqlens_q, cu_seqlens_k (zeros when dense), the
/// ALiBi slopes (f32 bits), and one spare word so that it is never empty.
pub fn table_words(c: &CheckedSpec<'_>) -> Vec<u32> {
    let mut words: Vec<u32> = Vec::new();
    match &c.varlen {
        Some(v) => {
            words.extend(v.cu_seqlens_q.iter().map(|&x| x as u32));
            words.extend(v.cu_seqlens_k.iter().map(|&x| x as u32));
        }
        None => words.extend(std::iter::repeat_n(0, 2 * (c.batch + 1))),
    }
    if let Some(a) = &c.alibi {
        words.extend(a.slopes.iter().map(|s| s.to_bits()));
    }
    words.push(0);
    words
}

/// One `Params` per dispatch in one uniform buffer, at the device's offset alignment.
pub struct Uniforms {
    pub buffer: wgpu::Buffer,
    stride: u64,
}

impl Uniforms {
    /// The binding of dispatch `i`'s params.
    pub fn range(&self, i: usize) -> BufferSlice<'_> {
        BufferSlice {
            buffer: &self.buffer,
            offset: i as u64 * self.stride,
            size: std::mem::size_of::<Params>() as u64,
        }
    }
}

impl WgpuBackend {
    /// Uploads `params` (one per dispatch) into a pooled uniform buffer.
    pub(crate) fn uniforms(&self, params: &[Params]) -> Uniforms {
        let stride = (std::mem::size_of::<Params>() as u64)
            .next_multiple_of(u64::from(self.limits.min_uniform_buffer_offset_alignment));
        let size = stride * params.len().max(1) as u64;
        let buffer = self.buffers.take(
            &self.device,
            size,
            wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
        );
        let mut bytes = vec![0u8; size as usize];
        for (i, p) in params.iter().enumerate() {
            let at = i * stride as usize;
            bytes[at..at + std::mem::size_of::<Params>()].copy_from_slice(bytemuck::bytes_of(p));
        }
        self.queue.write_buffer(&buffer, 0, &bytes);
        Uniforms { buffer, stride }
    }

    /// The `tables` of `c`, then `extra` words (a decode's cache tables, at offset
    /// `table_words(c).len()`), in a pooled storage buffer.
    pub(crate) fn tables(&self, c: &CheckedSpec<'_>, extra: &[u32]) -> wgpu::Buffer {
        let mut words = table_words(c);
        words.extend_from_slice(extra);
        let buf = self.buffers.take(
            &self.device,
            words.len() as u64 * 4,
            wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST,
        );
        self.queue
            .write_buffer(&buf, 0, bytemuck::cast_slice(&words));
        buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The WGSL struct, reflected by naga, has the Rust struct's fields, types, offsets and size.
    #[test]
    fn wgsl_params_layout_matches_the_rust_struct() {
        let src = include_str!("../../../shaders/params.wgsl");
        let module = naga::front::wgsl::parse_str(src).expect("params.wgsl parses");
        let mut layouter = naga::proc::Layouter::default();
        layouter
            .update(module.to_ctx())
            .expect("params.wgsl lays out");
        let (handle, ty) = module
            .types
            .iter()
            .find(|(_, t)| t.name.as_deref() == Some("Params"))
            .expect("struct Params in params.wgsl");
        let naga::TypeInner::Struct { members, span } = &ty.inner else {
            panic!("Params is not a struct");
        };
        assert_eq!(*span as usize, std::mem::size_of::<Params>(), "size");
        assert_eq!(
            layouter[handle].size as usize,
            std::mem::size_of::<Params>()
        );
        let wgsl: Vec<(String, String, usize)> = members
            .iter()
            .map(|m| {
                let ty = match module.types[m.ty].inner {
                    naga::TypeInner::Scalar(s) => match s.kind {
                        naga::ScalarKind::Uint => "u32",
                        naga::ScalarKind::Sint => "i32",
                        naga::ScalarKind::Float => "f32",
                        other => panic!("unexpected scalar kind {other:?}"),
                    },
                    ref other => panic!("non-scalar member {:?}: {other:?}", m.name),
                };
                (
                    m.name.clone().unwrap_or_default(),
                    ty.to_string(),
                    m.offset as usize,
                )
            })
            .collect();
        let rust: Vec<(String, String, usize)> = Params::FIELDS
            .iter()
            .map(|&(n, t, o)| (n.to_string(), t.to_string(), o))
            .collect();
        assert_eq!(wgsl, rust);
    }

    /// The WGSL flag constants have the Rust values.
    #[test]
    fn wgsl_flags_match() {
        let src = include_str!("../../../shaders/params.wgsl");
        for (name, value) in [
            ("FLAG_VARLEN", FLAG_VARLEN),
            ("FLAG_ALIBI", FLAG_ALIBI),
            ("FLAG_ALIBI_PER_BATCH", FLAG_ALIBI_PER_BATCH),
            ("FLAG_LSE", FLAG_LSE),
            ("FLAG_PARTIAL", FLAG_PARTIAL),
            ("FLAG_FIRST", FLAG_FIRST),
            ("FLAG_CACHE", FLAG_CACHE),
            ("FLAG_ROTARY_INTERLEAVED", FLAG_ROTARY_INTERLEAVED),
            ("FLAG_ROTARY_Q_POSITIONAL", FLAG_ROTARY_Q_POSITIONAL),
            ("FLAG_WHOLE_Q", FLAG_WHOLE_Q),
            ("FLAG_WHOLE_K", FLAG_WHOLE_K),
            ("FLAG_WHOLE_V", FLAG_WHOLE_V),
            ("FLAG_WHOLE_OUT", FLAG_WHOLE_OUT),
            ("FLAG_WHOLE_DOUT", FLAG_WHOLE_DOUT),
        ] {
            let decl = format!("const {name}: u32 = {value}u;");
            assert!(src.contains(&decl), "params.wgsl lacks `{decl}`");
        }
    }
}
