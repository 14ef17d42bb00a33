#version 450
// Word-level pool maintenance, grid-stride over uint32 words. Defines: WG and one of
//   OP_FILL   dst[i] = 0 for i < n                                  (zero a new pool)
//   OP_COPY   dst[i] = src[src_off + i] for i < n                   (pool -> host-visible tensor)
//   OP_BLOCKS dst[dst_blk * BW + w] = src[src_blk * BW + w]          (copy-on-write block copy; src and
//             dst are the same pool bound twice; pairs[2p] = src block, pairs[2p+1] = dst block)
layout(local_size_x = WG) in;

layout(std430, binding = 0) buffer Dst { uint dst[]; };
layout(std430, binding = 1) readonly buffer Src { uint src[]; };
layout(std430, binding = 2) readonly buffer Pairs { int pairs[]; };

layout(push_constant) uniform Params {
    uint n;        // words (FILL/COPY) or pairs (BLOCKS)
    uint src_off;  // COPY: word offset into src
    uint bw;       // BLOCKS: words per block
    uint num_blocks;
} pc;

void main() {
    const uint stride = gl_NumWorkGroups.x * WG;
#if OP_FILL
    for (uint i = gl_GlobalInvocationID.x; i < pc.n; i += stride) dst[i] = 0u;
#elif OP_COPY
    for (uint i = gl_GlobalInvocationID.x; i < pc.n; i += stride) dst[i] = src[pc.src_off + i];
#elif OP_BLOCKS
    const uint total = pc.n * pc.bw;
    for (uint i = gl_GlobalInvocationID.x; i < total; i += stride) {
        uint p = i / pc.bw;
        uint w = i - p * pc.bw;
        uint sb = min(uint(pairs[2u * p]), pc.num_blocks - 1u);
        uint db = uint(pairs[2u * p + 1u]);
        if (db < pc.num_blocks) dst[db * pc.bw + w] = src[sb * pc.bw + w];
    }
#endif
}
