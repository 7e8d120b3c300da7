// Checks what the flash kernel assumes of subgroups: invocations r * TPR + t of a 1-D
// workgroup are lanes of one subgroup, so subgroupShuffleXor(x, m) for m < TPR exchanges with
// local invocation index ^ m. Writes per invocation: bit m set when the xor-shuffle by m
// returned lid ^ m (m = 1, 2, 4, 8), and the subgroup size. The host prepends
// `enable subgroups;` where the WGSL compiler wants it (browsers).

@group(0) @binding(0) var<storage, read_write> result: array<u32>;

@compute @workgroup_size(128)
fn main(
    @builtin(local_invocation_index) lid: u32,
    @builtin(subgroup_size) sg_size: u32,
) {
    var ok = 0u;
    for (var m = 1u; m <= 8u; m = m << 1u) {
        if subgroupShuffleXor(lid, m) == (lid ^ m) {
            ok |= m;
        }
    }
    result[2u * lid] = ok;
    result[2u * lid + 1u] = sg_size;
}
