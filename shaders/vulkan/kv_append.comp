#version 450
// KV append (vLLM's reshape_and_cache): copies the new tokens' K and V rows [N, HKV, DP] into their
// slots (slot = block * block_size + offset) of the K and V pools [num_blocks, BS, HKV, DP].
// Pools are uint32 words: fp16 pools hold two halves per word (the host packs the new rows with
// the same little-endian layout as packHalf2x16), fp32 pools hold float bits. One invocation per
// word; slots outside the pool are skipped. Defines: ROWW (words per token = HKV * DP * elem / 4), WG.
layout(local_size_x = WG) in;

layout(std430, binding = 0) writeonly buffer KPool { uint kpool[]; };
layout(std430, binding = 1) writeonly buffer VPool { uint vpool[]; };
layout(std430, binding = 2) readonly buffer KNew { uint knew[]; };
layout(std430, binding = 3) readonly buffer VNew { uint vnew[]; };
layout(std430, binding = 4) readonly buffer Slots { int slots[]; };

layout(push_constant) uniform Params {
    uint n;          // tokens
    uint src_off;    // word offset of this layer's rows in knew/vnew
    uint slot_off;   // offset into slots
    uint num_slots;  // num_blocks * block_size
} pc;

void main() {
    const uint total = pc.n * ROWW;
    const uint stride = gl_NumWorkGroups.x * WG;
    for (uint i = gl_GlobalInvocationID.x; i < total; i += stride) {
        uint t = i / ROWW;
        uint w = i - t * ROWW;
        int s = slots[pc.slot_off + t];
        if (s < 0 || uint(s) >= pc.num_slots) continue;
        uint dst = uint(s) * ROWW + w;
        kpool[dst] = knew[pc.src_off + i];
        vpool[dst] = vnew[pc.src_off + i];
    }
}
