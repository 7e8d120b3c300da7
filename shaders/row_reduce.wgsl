// Sums the partial dot products of the TPR invocations that share one row (each owns a slice
// of the head dimension). The kernel defines RED_ROWS (rows of its workgroup) and RED_N
// (values per row and step). With subgroups, the lanes of a row exchange by xor-shuffles (the
// lane layout subgroup_probe.wgsl verifies); with workgroup memory, every invocation of the
// workgroup must call row_sum_all together (it has barriers). Both give every invocation of a
// row the bitwise same sums (a + b in one lane is b + a in its partner).

//#if REDUCE_WORKGROUP
var<workgroup> red: array<f32, RED_ROWS * RED_N * TPR>;
//#endif

fn row_sum_all(x: ptr<private, array<f32, RED_N>>, r: u32, t: u32) {
//#if REDUCE_SUBGROUP
    for (var j = 0u; j < RED_N; j++) {
        var s = (*x)[j];
        for (var m = 1u; m < TPR; m = m << 1u) {
            s += subgroupShuffleXor(s, m);
        }
        (*x)[j] = s;
    }
//#endif
//#if REDUCE_WORKGROUP
    workgroupBarrier(); // earlier readers of `red` are done
    for (var j = 0u; j < RED_N; j++) {
        red[(r * RED_N + j) * TPR + t] = (*x)[j];
    }
    workgroupBarrier();
    for (var j = 0u; j < RED_N; j++) {
        var acc = 0.0;
        for (var u = 0u; u < TPR; u++) {
            acc += red[(r * RED_N + j) * TPR + u];
        }
        (*x)[j] = acc;
    }
//#endif
}
