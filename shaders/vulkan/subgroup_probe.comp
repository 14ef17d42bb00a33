#version 450
// Reports the device's subgroup size (the decode shader's lane groups must fit in one subgroup).
#extension GL_KHR_shader_subgroup_basic : enable
layout(local_size_x = 1) in;
layout(std430, binding = 0) writeonly buffer Out { uint outv[]; };
void main() { outv[0] = gl_SubgroupSize; }
