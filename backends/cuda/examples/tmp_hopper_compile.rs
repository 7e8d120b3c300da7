use flashattn_cuda::{compile_many, variants_for_arch, KernelKind};
fn main() {
    let filter: Vec<String> = std::env::args().skip(1).collect();
    let out = std::path::PathBuf::from("/tmp/hopper-new-cubins");
    std::fs::create_dir_all(&out).unwrap();
    let vs: Vec<_> = variants_for_arch("sm_90a")
        .into_iter()
        .filter(|v| matches!(v.kind, KernelKind::Hopper | KernelKind::HopperFp8))
        .filter(|v| filter.is_empty() || filter.iter().any(|f| v.name().contains(f.as_str())))
        .collect();
    for (v, c) in vs.iter().zip(compile_many(&vs, "sm_90a", 2)) {
        match c {
            Ok(c) => {
                std::fs::write(out.join(format!("{}.cubin", v.name())), &c.cubin).unwrap();
                println!("{} ok {}", v.name(), c.log.trim());
            }
            Err(e) => println!("{} ERR {e}", v.name()),
        }
    }
}
