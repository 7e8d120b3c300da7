//! Threads: the process-wide runtime and `flashattn::attention`, and every available backend,
//! called from 8 threads at once many times give bitwise identical results (and correct ones).
//! One test in this binary: it sets the environment before the global runtime exists.

use flashattn::testing::{backend_required, check_backend};
use flashattn::{random_inputs, AttentionSpec, Backend, ForwardInputs, Output, Runtime, Tensor};
use std::sync::{Arc, Barrier};

const THREADS: usize = 8;
const CALLS: usize = 4;

/// Runs `call` on 8 threads released together, `CALLS` times each; every result.
fn on_threads(call: impl Fn() -> Output + Send + Sync + 'static) -> Vec<Output> {
    let call = Arc::new(call);
    let barrier = Arc::new(Barrier::new(THREADS));
    let threads: Vec<_> = (0..THREADS)
        .map(|_| {
            let (call, barrier) = (call.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                (0..CALLS).map(|_| call()).collect::<Vec<_>>()
            })
        })
        .collect();
    threads
        .into_iter()
        .flat_map(|t| t.join().expect("a thread panicked"))
        .collect()
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.to_f32_vec().iter().map(|x| x.to_bits()).collect()
}

fn assert_identical(name: &str, results: &[Output]) {
    assert_eq!(results.len(), THREADS * CALLS);
    let first = &results[0];
    for (i, r) in results.iter().enumerate() {
        assert!(
            bits(&r.out) == bits(&first.out),
            "{name}: call {i} differs in out"
        );
        let lse_bits = |o: &Output| {
            o.lse
                .as_ref()
                .map(|l| l.iter().map(|x| x.to_bits()).collect::<Vec<_>>())
        };
        assert!(
            lse_bits(r) == lse_bits(first),
            "{name}: call {i} differs in lse"
        );
    }
}

#[test]
fn eight_threads_get_identical_results_from_the_global_runtime_and_every_backend() {
    let cache = tempfile::tempdir().unwrap();
    std::env::set_var("FLASHATTN_CACHE_DIR", cache.path());
    std::env::remove_var("FLASHATTN_BACKEND");

    // First use from 8 threads at once: one runtime.
    let barrier = Arc::new(Barrier::new(THREADS));
    let addresses: Vec<usize> = (0..THREADS)
        .map(|_| {
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                Runtime::global() as *const Runtime as usize
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|t| t.join().unwrap())
        .collect();
    assert!(addresses.iter().all(|&a| a == addresses[0]));

    let spec = AttentionSpec::new(2, 4, 70, 150, 64)
        .heads_kv(2)
        .causal(true)
        .return_lse(true);
    let (q, k, v) = random_inputs(&spec, 9);
    let inputs = Arc::new((spec.clone(), q, k, v));
    let shared = inputs.clone();
    let results = on_threads(move || {
        let (spec, q, k, v) = &*shared;
        flashattn::attention(spec, q.as_ref(), k.as_ref(), v.as_ref()).unwrap()
    });
    assert_identical("flashattn::attention", &results);

    let backends = Runtime::global().backends();
    for name in ["cpu", "wgpu"] {
        let Some(backend) = backends.iter().find(|b| b.name() == name).cloned() else {
            assert!(
                !backend_required(name),
                "{name} is required but unavailable"
            );
            eprintln!("SKIP {name}: unavailable here");
            continue;
        };
        check_backend(backend.as_ref(), &spec, 9).unwrap();
        let shared = inputs.clone();
        let results = on_threads(move || {
            let (spec, q, k, v) = &*shared;
            let b: &dyn Backend = backend.as_ref();
            b.forward(spec, ForwardInputs::of(q, k, v)).unwrap()
        });
        assert_identical(name, &results);
    }
}
