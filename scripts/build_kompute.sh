#!/usr/bin/env bash
# Build and install Kompute's Python module `kp` (the Vulkan backend's runtime) into a venv.
#
#   scripts/build_kompute.sh PYTHON
#   KP_SDIST=path/kp-0.9.0.tar.gz KP_TARGET=/tmp/site scripts/build_kompute.sh python3
#
# Kompute is patched (ADR 0008, `kp.pa_patch_level`): host-visible buffers prefer HOST_CACHED,
# non-DEVICE_LOCAL memory (stock 0.9 picks resizable-BAR memory the host reads at ~45 MB/s), and
# `kp.OpGlobalBarrier` / `kp.OpAlgoDispatchBare` let a sequence replace the per-tensor barriers of
# every dispatch with one global barrier, and `Sequence.pa_eval_poll` waits for a submission by
# polling its fence instead of sleeping in vkWaitForFences, and a device created with
# VK_NV_cooperative_matrix gets the features its kernel needs (level 5). The wheel's version is
# KP_VERSION+pa<level>.
#
# KP_TARGET mode (offline device machines without pip build tools): configures the patched source
# with CMake and writes the `kp` extension straight into KP_TARGET (put it first on PYTHONPATH);
# KP_CMAKE_ARGS passes header/library locations (-DVulkan_INCLUDE_DIR=..., -Dfmt_DIR=...).
#
# PYTHON is the venv's interpreter. Builds a real wheel from the kp sdist against the system
# Vulkan headers (libvulkan-dev), system fmt (libfmt-dev) and pip's pybind11, caches it in
# ${XDG_CACHE_HOME:-$HOME/.cache}/paged-attention/wheels/ and installs it with --no-deps (numpy is
# never touched, so numpy 2 stays). Idempotent: does nothing when `kp` already imports at the
# right version, and installs the cached wheel without rebuilding when one exists.
#
# Environment: KP_VERSION (default 0.9.0); KP_SDIST (path to a kp-*.tar.gz to use instead of
# `pip download`, for offline machines); JOBS (parallel compile jobs, default nproc);
# KP_CMAKE_ARGS (extra CMake arguments, e.g. -DVulkan_INCLUDE_DIR=... for headers outside /usr).
# Needs: cmake, a C++ compiler, libvulkan-dev, libfmt-dev (and glslc to run the shaders).
set -euo pipefail

PY=${1:?usage: scripts/build_kompute.sh PYTHON}
# Absolute, because the build runs in another directory (the venv's symlink itself is kept).
case "$PY" in */*) ;; *) PY=$(command -v "$PY") || { echo "error: $1 not found" >&2; exit 1; } ;; esac
PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")"
KP_VERSION=${KP_VERSION:-0.9.0}
CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/paged-attention/wheels
JOBS=${JOBS:-$(nproc 2>/dev/null || echo 2)}

PA_PATCH_LEVEL=5
KP_BUILD_VERSION="$KP_VERSION+pa$PA_PATCH_LEVEL"

log() { echo "[build_kompute] $*"; }

# apply_patches SRC: the paged-attention patches to an unpacked sdist (fails loudly if the source
# does not match what they expect).
apply_patches() {
  "$PY" - "$1" <<'PATCH_EOF'
# paged-attention patches to Kompute 0.9.0 (ADR 0008). Applied to an unpacked sdist: python3 kp_patch.py SRC
import sys
src = sys.argv[1]


def edit(rel, old, new, count=1):
    path = f"{src}/{rel}"
    s = open(path).read()
    if s.count(old) != count:
        sys.exit(f"kp patch: {rel}: expected {count} match(es) of {old[:60]!r}, found {s.count(old)}")
    open(path, "w").write(s.replace(old, new))


# 1. Memory type choice. Stock Kompute takes the first type with the required flags; on GPUs with a
#    resizable BAR that is DEVICE_LOCAL|HOST_VISIBLE memory for host-visible buffers, which the host
#    reads at tens of MB/s. Host-visible buffers now prefer HOST_CACHED and avoid DEVICE_LOCAL;
#    device-local buffers avoid HOST_VISIBLE (BAR space is scarce). The chosen flags are recorded.
edit("src/Tensor.cpp", """    uint32_t memoryTypeIndex = -1;
    bool memoryTypeIndexFound = false;
    for (uint32_t i = 0; i < memoryProperties.memoryTypeCount; i++) {
        if (memoryRequirements.memoryTypeBits & (1 << i)) {
            if (((memoryProperties.memoryTypes[i]).propertyFlags &
                 memoryPropertyFlags) == memoryPropertyFlags) {
                memoryTypeIndex = i;
                memoryTypeIndexFound = true;
                break;
            }
        }
    }""", """    uint32_t memoryTypeIndex = -1;
    bool memoryTypeIndexFound = false;
    int bestScore = -1;
    const bool wantHost = bool(memoryPropertyFlags & vk::MemoryPropertyFlagBits::eHostVisible);
    for (uint32_t i = 0; i < memoryProperties.memoryTypeCount; i++) {
        if (memoryRequirements.memoryTypeBits & (1 << i)) {
            const vk::MemoryPropertyFlags f = memoryProperties.memoryTypes[i].propertyFlags;
            if ((f & memoryPropertyFlags) == memoryPropertyFlags) {
                int score = 0;
                if (wantHost) {
                    score += (f & vk::MemoryPropertyFlagBits::eHostCached) ? 2 : 0;
                    score += (f & vk::MemoryPropertyFlagBits::eDeviceLocal) ? 0 : 1;
                } else {
                    score += (f & vk::MemoryPropertyFlagBits::eHostVisible) ? 0 : 1;
                }
                if (score > bestScore) {
                    bestScore = score;
                    memoryTypeIndex = i;
                    memoryTypeIndexFound = true;
                }
            }
        }
    }
    if (memoryTypeIndexFound) {
        this->mPaMemoryFlags[memory.get() == this->mPrimaryMemory.get() ? 0 : 1] =
          uint32_t(memoryProperties.memoryTypes[memoryTypeIndex].propertyFlags);
    }""")
edit("src/include/kompute/Tensor.hpp", """  protected:
    // -------------- ALWAYS OWNED RESOURCES""", """    // paged-attention patch: property flags of the memory types chosen for the primary and
    // staging buffers (0: none), and every memory type of the device.
    uint32_t mPaMemoryFlags[2] = { 0, 0 };
    std::vector<uint32_t> paMemoryTypes()
    {
        vk::PhysicalDeviceMemoryProperties p = this->mPhysicalDevice->getMemoryProperties();
        std::vector<uint32_t> out;
        for (uint32_t i = 0; i < p.memoryTypeCount; i++)
            out.push_back(uint32_t(p.memoryTypes[i].propertyFlags));
        return out;
    }

  protected:
    // -------------- ALWAYS OWNED RESOURCES""")

# 2. Ops the Python API lacks: a global memory barrier, and a dispatch that records no per-tensor
#    barriers (stock OpAlgoDispatch records a transfer->compute buffer barrier for every bound
#    tensor before every dispatch).
edit("python/src/main.cpp", """PYBIND11_MODULE(kp, m)
{
""", """class PaOpGlobalBarrier : public kp::OpBase
{
  public:
    PaOpGlobalBarrier(uint32_t srcStage, uint32_t dstStage, uint32_t srcAccess, uint32_t dstAccess)
      : mSrcStage(srcStage), mDstStage(dstStage), mSrcAccess(srcAccess), mDstAccess(dstAccess) {}
    void record(const vk::CommandBuffer& cb) override
    {
        vk::MemoryBarrier mb{ vk::AccessFlags(mSrcAccess), vk::AccessFlags(mDstAccess) };
        cb.pipelineBarrier(vk::PipelineStageFlags(mSrcStage), vk::PipelineStageFlags(mDstStage),
                           vk::DependencyFlags(), 1, &mb, 0, nullptr, 0, nullptr);
    }
    void preEval(const vk::CommandBuffer&) override {}
    void postEval(const vk::CommandBuffer&) override {}

  private:
    uint32_t mSrcStage, mDstStage, mSrcAccess, mDstAccess;
};

class PaOpDispatchBare : public kp::OpBase
{
  public:
    PaOpDispatchBare(std::shared_ptr<kp::Algorithm> algo, std::vector<uint32_t> push)
      : mAlgo(algo), mPush(push) {}
    void record(const vk::CommandBuffer& cb) override
    {
        if (!mPush.empty())
            mAlgo->setPushConstants(mPush.data(), uint32_t(mPush.size()), sizeof(uint32_t));
        mAlgo->recordBindCore(cb);
        mAlgo->recordBindPush(cb);
        mAlgo->recordDispatch(cb);
    }
    void preEval(const vk::CommandBuffer&) override {}
    void postEval(const vk::CommandBuffer&) override {}

  private:
    std::shared_ptr<kp::Algorithm> mAlgo;
    std::vector<uint32_t> mPush;
};

PYBIND11_MODULE(kp, m)
{
""")
# Registered after OpBase (pybind11 needs the base type first).
edit("python/src/main.cpp", """    py::class_<kp::OpMult, kp::OpBase, std::shared_ptr<kp::OpMult>>(""",
     """    m.attr("pa_patch_level") = 5;
    py::class_<PaOpGlobalBarrier, kp::OpBase, std::shared_ptr<PaOpGlobalBarrier>>(m, "OpGlobalBarrier")
      .def(py::init<uint32_t, uint32_t, uint32_t, uint32_t>(), py::arg("src_stage"),
           py::arg("dst_stage"), py::arg("src_access"), py::arg("dst_access"));
    py::class_<PaOpDispatchBare, kp::OpBase, std::shared_ptr<PaOpDispatchBare>>(m, "OpAlgoDispatchBare")
      .def(py::init([](std::shared_ptr<kp::Algorithm> a, const py::array_t<uint32_t>& push) {
          const py::buffer_info info = push.request();
          std::vector<uint32_t> v((uint32_t*)info.ptr, ((uint32_t*)info.ptr) + info.size);
          return std::make_shared<PaOpDispatchBare>(a, v);
      }));
    py::class_<kp::OpMult, kp::OpBase, std::shared_ptr<kp::OpMult>>(""")
edit("python/src/main.cpp", """      .def("is_init", &kp::Tensor::isInit, DOC(kp, Tensor, isInit))
      .def("destroy", &kp::Tensor::destroy, DOC(kp, Tensor, destroy));""",
     """      .def("is_init", &kp::Tensor::isInit, DOC(kp, Tensor, isInit))
      .def("pa_memory_flags", [](kp::Tensor& self) {
          return std::vector<uint32_t>{ self.mPaMemoryFlags[0], self.mPaMemoryFlags[1] };
      })
      .def("pa_memory_types", &kp::Tensor::paMemoryTypes)
      .def("destroy", &kp::Tensor::destroy, DOC(kp, Tensor, destroy));""")
# 3. Unchecked allocation results. Kompute calls the pointer forms of createBuffer/allocateMemory,
#    which return a vk::Result it ignores: out of device memory left a null buffer/memory that
#    was then bound and mapped (a segfault, e.g. with MLX's CUDA allocator holding the rest of the
#    GPU). Both now raise (RuntimeError in Python) naming the size and the VkResult.
edit("src/Tensor.cpp", """    this->mDevice->createBuffer(&bufferInfo, nullptr, buffer.get());""",
     """    vk::Result paResult = this->mDevice->createBuffer(&bufferInfo, nullptr, buffer.get());
    if (paResult != vk::Result::eSuccess) {
        throw std::runtime_error("Kompute Tensor: vkCreateBuffer of " + std::to_string(bufferSize) +
                                 " bytes failed: " + vk::to_string(paResult));
    }""")
edit("src/Tensor.cpp", """    this->mDevice->allocateMemory(&memoryAllocateInfo, nullptr, memory.get());""",
     """    vk::Result paResult =
      this->mDevice->allocateMemory(&memoryAllocateInfo, nullptr, memory.get());
    if (paResult != vk::Result::eSuccess) {
        throw std::runtime_error("Kompute Tensor: vkAllocateMemory of " +
                                 std::to_string(memoryRequirements.size) + " bytes (memory type " +
                                 std::to_string(memoryTypeIndex) + ") failed: " + vk::to_string(paResult));
    }""")
# 4. A submission's wait that polls the fence (vkGetFenceStatus) for up to spin_ns before the
#    blocking vkWaitForFences, on a fence kept by the sequence (reset, not created and destroyed
#    per submission as evalAsync/evalAwait do). A per-layer loop submits, waits and reads back
#    once per layer, so whatever a submission's round trip costs is paid per layer (ADR 0008
#    measures it). Returns the host nanoseconds spent submitting and waiting; the GIL is released.
edit("src/include/kompute/Sequence.hpp", """    std::shared_ptr<Sequence> evalAwait(uint64_t waitFor = UINT64_MAX);""",
     """    std::shared_ptr<Sequence> evalAwait(uint64_t waitFor = UINT64_MAX);

    // paged-attention patch: submit on the sequence's own fence, then poll it for up to spinNs
    // nanoseconds before a blocking wait. Returns {submit ns, wait ns}.
    std::vector<uint64_t> paEvalPoll(uint64_t spinNs);""")
edit("src/include/kompute/Sequence.hpp", """    vk::Fence mFence;
""", """    vk::Fence mFence;
    vk::Fence mPaFence;  // paged-attention patch: paEvalPoll's reusable fence
""")
edit("src/Sequence.cpp", """#include "kompute/Sequence.hpp"
""", """#include "kompute/Sequence.hpp"

#include <chrono>
""")
edit("src/Sequence.cpp", """bool
Sequence::isRunning() const""", """std::vector<uint64_t>
Sequence::paEvalPoll(uint64_t spinNs)
{
    using clock = std::chrono::steady_clock;
    if (this->isRecording()) {
        this->end();
    }
    if (this->mIsRunning) {
        throw std::runtime_error("Kompute Sequence paEvalPoll called while an eval is running");
    }
    for (size_t i = 0; i < this->mOperations.size(); i++) {
        this->mOperations[i]->preEval(*this->mCommandBuffer);
    }
    const auto t0 = clock::now();
    if (!this->mPaFence) {
        this->mPaFence = this->mDevice->createFence(vk::FenceCreateInfo());
    } else {
        (void)this->mDevice->resetFences(1, &this->mPaFence);
    }
    vk::SubmitInfo submitInfo(0, nullptr, nullptr, 1, this->mCommandBuffer.get());
    this->mComputeQueue->submit(1, &submitInfo, this->mPaFence);
    const auto t1 = clock::now();
    while (this->mDevice->getFenceStatus(this->mPaFence) == vk::Result::eNotReady &&
           clock::now() - t1 < std::chrono::nanoseconds(spinNs)) {
    }
    vk::Result result = this->mDevice->waitForFences(1, &this->mPaFence, VK_TRUE, UINT64_MAX);
    if (result != vk::Result::eSuccess) {
        throw std::runtime_error("Kompute Sequence paEvalPoll: vkWaitForFences failed: " +
                                 vk::to_string(result));
    }
    const auto t2 = clock::now();
    for (size_t i = 0; i < this->mOperations.size(); i++) {
        this->mOperations[i]->postEval(*this->mCommandBuffer);
    }
    return { uint64_t(std::chrono::nanoseconds(t1 - t0).count()),
             uint64_t(std::chrono::nanoseconds(t2 - t1).count()) };
}

bool
Sequence::isRunning() const""")
edit("src/Sequence.cpp", """    if (this->mFreeCommandBuffer) {
        KP_LOG_INFO("Freeing CommandBuffer");""", """    if (this->mPaFence) {
        this->mDevice->destroy(this->mPaFence, (vk::Optional<const vk::AllocationCallbacks>)nullptr);
        this->mPaFence = nullptr;
    }

    if (this->mFreeCommandBuffer) {
        KP_LOG_INFO("Freeing CommandBuffer");""")
edit("python/src/main.cpp", """      .def(
        "eval_await",
        [](kp::Sequence& self) { return self.evalAwait(); },
        DOC(kp, Sequence, evalAwait))""", """      .def(
        "eval_await",
        [](kp::Sequence& self) { return self.evalAwait(); },
        DOC(kp, Sequence, evalAwait))
      .def(
        "pa_eval_poll",
        [](kp::Sequence& self, uint64_t spinNs) {
            py::gil_scoped_release release;
            return self.paEvalPoll(spinNs);
        },
        py::arg("spin_ns"))""")
# 5. Cooperative matrices (prefill_coop.comp, ADR 0008). A device created with the extensions
#    VK_NV_cooperative_matrix, VK_KHR_shader_float16_int8 and VK_KHR_vulkan_memory_model (the
#    backend asks for them in desired_extensions; Kompute drops the ones the device lacks) gets the
#    features the kernel's SPIR-V declares (CooperativeMatrixNV, Float16, VulkanMemoryModel:
#    glslang emits the Vulkan memory model for cooperative matrices) chained into its create info,
#    when the device reports all three. Stock Kompute enables no feature at all. The Manager then
#    tells Python whether they are on, the device's extensions, and its cooperative-matrix shapes.
edit("src/include/kompute/Manager.hpp", """    std::shared_ptr<vk::Instance> getVkInstance() const;

  private:""", """    std::shared_ptr<vk::Instance> getVkInstance() const;

    // paged-attention patch: true when the device was created with cooperative matrices, fp16
    // arithmetic and the Vulkan memory model enabled; the device's extension names; its
    // VkCooperativeMatrixPropertiesNV as {M, N, K, A, B, C, D type, scope} (empty without it).
    bool mPaCooperativeMatrix = false;
    std::vector<std::string> paDeviceExtensions() const
    {
        std::vector<std::string> out;
        for (const vk::ExtensionProperties& e :
             this->mPhysicalDevice->enumerateDeviceExtensionProperties())
            out.push_back(std::string(e.extensionName.data()));
        return out;
    }
    std::vector<std::vector<uint32_t>> paCooperativeMatrixProperties() const
    {
        std::vector<std::vector<uint32_t>> out;
        auto fn = reinterpret_cast<PFN_vkGetPhysicalDeviceCooperativeMatrixPropertiesNV>(
          vkGetInstanceProcAddr(static_cast<VkInstance>(*this->mInstance),
                                "vkGetPhysicalDeviceCooperativeMatrixPropertiesNV"));
        if (!fn || !this->mPaCooperativeMatrix)
            return out;
        VkPhysicalDevice pd = static_cast<VkPhysicalDevice>(*this->mPhysicalDevice);
        uint32_t n = 0;
        if (fn(pd, &n, nullptr) != VK_SUCCESS)
            return out;
        VkCooperativeMatrixPropertiesNV proto{};
        proto.sType = VK_STRUCTURE_TYPE_COOPERATIVE_MATRIX_PROPERTIES_NV;
        std::vector<VkCooperativeMatrixPropertiesNV> props(n, proto);
        if (fn(pd, &n, props.data()) != VK_SUCCESS)
            return out;
        for (const VkCooperativeMatrixPropertiesNV& p : props)
            out.push_back({ p.MSize, p.NSize, p.KSize, uint32_t(p.AType), uint32_t(p.BType),
                            uint32_t(p.CType), uint32_t(p.DType), uint32_t(p.scope) });
        return out;
    }

  private:""")
edit("src/Manager.cpp", """                                          validExtensions.size(),
                                          validExtensions.data());
""", """                                          validExtensions.size(),
                                          validExtensions.data());

    // paged-attention patch: cooperative-matrix features (see kp_patch item 5).
    auto paEnabled = [&validExtensions](const char* name) {
        for (const char* e : validExtensions)
            if (std::string(e) == name)
                return true;
        return false;
    };
    VkPhysicalDeviceCooperativeMatrixFeaturesNV paCoop{};
    paCoop.sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_COOPERATIVE_MATRIX_FEATURES_NV;
    VkPhysicalDeviceShaderFloat16Int8FeaturesKHR paF16{};
    paF16.sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_SHADER_FLOAT16_INT8_FEATURES_KHR;
    VkPhysicalDeviceVulkanMemoryModelFeaturesKHR paVmm{};
    paVmm.sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_VULKAN_MEMORY_MODEL_FEATURES_KHR;
    if (paEnabled(VK_NV_COOPERATIVE_MATRIX_EXTENSION_NAME) &&
        paEnabled(VK_KHR_SHADER_FLOAT16_INT8_EXTENSION_NAME) &&
        paEnabled(VK_KHR_VULKAN_MEMORY_MODEL_EXTENSION_NAME)) {
        paCoop.pNext = &paF16;
        paF16.pNext = &paVmm;
        VkPhysicalDeviceFeatures2 paQuery{};
        paQuery.sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_FEATURES_2;
        paQuery.pNext = &paCoop;
        vkGetPhysicalDeviceFeatures2(static_cast<VkPhysicalDevice>(physicalDevice), &paQuery);
        // Only what the kernel needs: no robust-access variant, no int8, no device scope.
        paCoop.cooperativeMatrixRobustBufferAccess = VK_FALSE;
        paF16.shaderInt8 = VK_FALSE;
        paVmm.vulkanMemoryModelDeviceScope = VK_FALSE;
        paVmm.vulkanMemoryModelAvailabilityVisibilityChains = VK_FALSE;
        if (paCoop.cooperativeMatrix && paF16.shaderFloat16 && paVmm.vulkanMemoryModel) {
            deviceCreateInfo.pNext = &paCoop;
            this->mPaCooperativeMatrix = true;
        }
    }
""")
edit("python/src/main.cpp", """      .def(
        "get_device_properties",""", """      .def("pa_cooperative_matrix",
           [](kp::Manager& self) { return self.mPaCooperativeMatrix; })
      .def("pa_device_extensions", &kp::Manager::paDeviceExtensions)
      .def("pa_cooperative_matrix_properties", &kp::Manager::paCooperativeMatrixProperties)
      .def(
        "get_device_properties",""")
print("[build_kompute] applied the paged-attention patches (level 5) to", src)
PATCH_EOF
}

unpack_sdist() {  # unpack_sdist WORKDIR -> prints the source dir
  if [ -n "${KP_SDIST:-}" ]; then
    cp "$KP_SDIST" "$1/kp-$KP_VERSION.tar.gz"
  elif [ -f "$CACHE/kp-$KP_VERSION.tar.gz" ]; then
    cp "$CACHE/kp-$KP_VERSION.tar.gz" "$1/"
  else
    log "downloading the kp $KP_VERSION sdist" >&2
    "$PY" -m pip download -q --no-deps --no-binary=:all: -d "$1" "kp==$KP_VERSION" >&2
    # Kept beside the wheels: offline rebuilds, and the test that the patch still applies.
    mkdir -p "$CACHE" && cp "$1/kp-$KP_VERSION.tar.gz" "$CACHE/"
  fi
  tar xzf "$1"/kp-"$KP_VERSION".tar.gz -C "$1"
  echo "$1/kp-$KP_VERSION"
}

if [ -n "${KP_TARGET:-}" ]; then
  for tool in cmake make c++; do
    command -v "$tool" >/dev/null || { echo "error: $tool is required to build kp" >&2; exit 1; }
  done
  work=$(mktemp -d "${TMPDIR:-/tmp}/kpbuild.XXXXXX")
  trap 'rm -rf "$work"' EXIT
  src=$(unpack_sdist "$work")
  apply_patches "$src"
  mkdir -p "$KP_TARGET" "$src/build"
  rm -f "$KP_TARGET"/kp.cpython-*.so  # a stock build there would shadow nothing, but be explicit
  log "building patched kp $KP_BUILD_VERSION into $KP_TARGET (cmake, $JOBS jobs)"
  if ! (cd "$src/build" && cmake .. -DKOMPUTE_OPT_INSTALL=OFF -DKOMPUTE_OPT_BUILD_PYTHON=ON \
      -DKOMPUTE_OPT_LOG_LEVEL=Off -DKOMPUTE_OPT_USE_SPDLOG=Off -DKOMPUTE_OPT_DISABLE_VULKAN_VERSION_CHECK=ON \
      -DKOMPUTE_OPT_USE_BUILT_IN_VULKAN_HEADER=OFF -DKOMPUTE_OPT_USE_BUILT_IN_FMT=OFF \
      -DKOMPUTE_OPT_USE_BUILT_IN_PYBIND11=OFF -DCMAKE_BUILD_TYPE=Release -DCMAKE_POSITION_INDEPENDENT_CODE=ON \
      -Dpybind11_DIR="$("$PY" -c 'import pybind11; print(pybind11.get_cmake_dir())')" \
      -DPYTHON_EXECUTABLE="$PY" -DPython_EXECUTABLE="$PY" -DCMAKE_LIBRARY_OUTPUT_DIRECTORY="$KP_TARGET" \
      ${KP_CMAKE_ARGS:-} > "$work/cmake.log" 2>&1 && make -j"$JOBS" > "$work/make.log" 2>&1); then
    tail -30 "$work/cmake.log" >&2 || true
    tail -30 "$work/make.log" >&2 || true
    echo "error: kp build failed" >&2
    exit 1
  fi
  PYTHONPATH="$KP_TARGET" "$PY" -c 'import kp; assert kp.pa_patch_level >= 5; print("[build_kompute] patched kp (level", kp.pa_patch_level, ") in", kp.__file__)'
  exit 0
fi

installed=$("$PY" - <<'EOF' 2>/dev/null || true
import importlib.metadata as md
try:
    import kp  # noqa: F401
    print(md.version("kp") if getattr(kp, "pa_patch_level", 0) else "stock")
except Exception:
    pass
EOF
)
if [ "$installed" = "$KP_BUILD_VERSION" ]; then
  log "kp $KP_BUILD_VERSION already importable by $PY; nothing to do"
  exit 0
fi

pytag=$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
mkdir -p "$CACHE"
wheel=$(ls "$CACHE"/kp-"$KP_BUILD_VERSION"-"$pytag"-*.whl 2>/dev/null | head -1 || true)

if [ -z "$wheel" ]; then
  for tool in cmake c++; do
    command -v "$tool" >/dev/null || { echo "error: $tool is required to build kp" >&2; exit 1; }
  done
  [ -f /usr/include/vulkan/vulkan.hpp ] || [ -n "${KP_CMAKE_ARGS:-}" ] || {
    echo "error: Vulkan headers missing; install libvulkan-dev (apt-get install libvulkan-dev)" >&2; exit 1; }
  "$PY" -m pip --version >/dev/null
  "$PY" -c 'import pybind11' 2>/dev/null || "$PY" -m pip install -q pybind11
  # --no-build-isolation builds with the venv's own tools: old venv setuptools lack bdist_wheel.
  "$PY" -c 'import setuptools, wheel' 2>/dev/null || "$PY" -m pip install -q wheel 'setuptools>=68'

  work=$(mktemp -d "${TMPDIR:-/tmp}/kpbuild.XXXXXX")
  trap 'rm -rf "$work"' EXIT
  src=$(unpack_sdist "$work")
  apply_patches "$src"

  # Patch setup.py: drop the numpy<2 pin, replace its CMake arguments (upstream misses a comma and
  # would download Vulkan headers/fmt/pybind11) with offline ones, avoid distutils (gone in 3.12).
  "$PY" - "$src/setup.py" "$("$PY" -c 'import pybind11; print(pybind11.get_cmake_dir())')" "$KP_VERSION" "$KP_BUILD_VERSION" <<'EOF'
import re, sys
path, pybind_dir = sys.argv[1], sys.argv[2]
s = open(path).read()
s = s.replace('from distutils.version import LooseVersion\n', '')
s = re.sub(r"cmake_version = LooseVersion\(.*?\n\s*if cmake_version < '3.15':\n\s*raise RuntimeError\(\"CMake >= 3.15 is required\"\)\n",
           "", s, flags=re.S)
s = re.sub(r'install_requires=\[\s*"numpy<2.0.0"\s*\]', 'install_requires=["numpy"]', s)
start = s.index("cmake_args = ['-DCMAKE_LIBRARY_OUTPUT_DIRECTORY=' + extdir,")
end = s.index("]", s.index("'-DPYTHON_LIBRARY='", start)) + 1
args = ["-DCMAKE_LIBRARY_OUTPUT_DIRECTORY=' + extdir + '",
        "-DKOMPUTE_OPT_BUILD_PYTHON=ON", "-DKOMPUTE_OPT_LOG_LEVEL=Off", "-DKOMPUTE_OPT_USE_SPDLOG=Off",
        "-DKOMPUTE_OPT_DISABLE_VULKAN_VERSION_CHECK=ON", "-DKOMPUTE_OPT_INSTALL=OFF",
        "-DKOMPUTE_OPT_USE_BUILT_IN_VULKAN_HEADER=OFF", "-DKOMPUTE_OPT_USE_BUILT_IN_FMT=OFF",
        "-DKOMPUTE_OPT_USE_BUILT_IN_PYBIND11=OFF", "-DCMAKE_POSITION_INDEPENDENT_CODE=ON",
        "-DFETCHCONTENT_FULLY_DISCONNECTED=ON", "-Dpybind11_DIR=" + pybind_dir,
        "-DPYTHON_EXECUTABLE=' + sys.executable + '", "-DPython_EXECUTABLE=' + sys.executable + '"]
s = (s[:start] + "cmake_args = [" + ", ".join("'" + a + "'" for a in args) + "]"
     + " + os.environ.get('KP_CMAKE_ARGS', '').split()" + s[end:])
s = s.replace("build_args += ['--', '-j']", "build_args += ['--', '-j' + os.environ.get('JOBS', '2')]")
s = s.replace("build_args += env['KOMPUTE_PYTHON_NUM_PARALLEL_THREADS']", "pass")
s = s.replace("version='" + sys.argv[3] + "'", "version='" + sys.argv[4] + "'")
assert sys.argv[4] in s
assert "numpy<2" not in s and "LooseVersion" not in s
open(path, "w").write(s)

EOF
  log "building kp $KP_BUILD_VERSION wheel (offline, $JOBS jobs; a few minutes)"
  mkdir -p "$work/dist"
  (cd "$src" && JOBS=$JOBS "$PY" -m pip wheel -q --no-deps --no-build-isolation --no-index -w "$work/dist" .) \
    > "$work/build.log" 2>&1 || { tail -40 "$work/build.log" >&2; echo "error: kp build failed" >&2; exit 1; }
  built=$(ls "$work"/dist/kp-"$KP_BUILD_VERSION"-*.whl | head -1)
  cp "$built" "$CACHE/"
  wheel="$CACHE/$(basename "$built")"
  log "cached $wheel"
else
  log "using cached wheel $wheel"
fi

"$PY" -m pip install -q --no-deps --force-reinstall "$wheel"
"$PY" -c 'import kp, importlib.metadata as md; print("[build_kompute] kp", md.version("kp"), "installed")'
