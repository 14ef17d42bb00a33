#!/usr/bin/env bash
# Acceptance check of the installable package (issue 12): build the wheel, install it into a fresh
# venv OUTSIDE the checkout, then from outside the checkout
#   - `import backends` must fail (nothing generic lands in site-packages),
#   - every available backend x path decodes a fragmented batch like paged_attention.reference,
#   - `paged-attn run smoke` writes its results.
# WHEEL_CHECK_DIR (default: a new temp folder) holds the wheel, the venv and the smoke run.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
work=${WHEEL_CHECK_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/pa-wheel-check.XXXXXX")}
log() { printf '[wheel-check] %s\n' "$*"; }

log "building the wheel into $work/dist"
rm -rf "$work/dist" "$work/venv" "$work/smoke"
"$root/.venv/bin/python" -m pip wheel -q . --no-deps -w "$work/dist"
wheel=$(ls "$work"/dist/paged_attention-*.whl)
log "wheel: $(basename "$wheel") ($(unzip -l "$wheel" | grep -c 'shaders/\|experiment_files/') shader/experiment files)"

python3 -m venv "$work/venv"
extras=(numpy pyyaml matplotlib tqdm)
case "$(uname -s)" in Linux) extras+=("mlx[cpu]") ;; Darwin) extras+=(mlx) ;; esac
kp_wheel=$(ls ~/.cache/paged-attention/wheels/kp-*.whl 2>/dev/null | head -1 || true)
[ -n "$kp_wheel" ] && extras+=("$kp_wheel") || log "no cached Kompute wheel: vulkan will be skipped"
log "installing the wheel and ${extras[*]} into $work/venv"
"$work/venv/bin/pip" install -q "$wheel" "${extras[@]}"

cd "$work"   # outside the checkout from here on
if "$work/venv/bin/python" -c 'import backends' 2>/dev/null; then
  log "FAIL: 'import backends' works in the installed environment"; exit 1
fi
log "ok: 'import backends' fails (ModuleNotFoundError)"

"$work/venv/bin/python" - <<'PY'
import numpy as np
import paged_attention as pa
from paged_attention import reference

assert "site-packages" in pa.__file__, pa.__file__
rng = np.random.default_rng(0)
bs, hkv, hq, d, nb = 16, 2, 8, 64, 32
tables = rng.permutation(nb).astype(np.int32).reshape(4, 8)    # fragmented
lens = np.array([128, 77, 1, 100], np.int32)
k = rng.standard_normal((nb * bs, hkv, d)).astype(np.float16)
v = rng.standard_normal((nb * bs, hkv, d)).astype(np.float16)
q = rng.standard_normal((4, hq, d)).astype(np.float16)
checked = 0
for name in pa.registry.BACKENDS:
    why = pa.registry.unavailable_reason(name)
    if why:
        print(f"  {name}: unavailable ({why})")
        continue
    be = pa.get_backend(name)
    pool = be.create_pool(nb, bs, hkv, d, "float16")
    be.write_kv(pool, np.arange(nb * bs), k, v)
    kp, vp = pool.to_numpy()
    want = reference.decode(q, kp, vp, tables, lens)
    for path in be.paths + ("auto",):
        got = be.to_numpy(be.decode(q, pool, tables, lens, path=path))
        err = reference.rms(got, want)
        assert err < 2e-3, (name, path, err)
        print(f"  {name}/{path}: rms vs reference {err:.2e} on {be.device}")
        checked += 1
    be.close()
assert checked, "no backend decoded"
print(f"[wheel-check] ok: {checked} backend/path decodes match the reference")
PY

"$work/venv/bin/paged-attn" run smoke --out "$work/smoke" --no-progress > "$work/smoke.log" 2>&1 \
  || { tail -20 "$work/smoke.log"; log "FAIL: paged-attn run smoke"; exit 1; }
for f in results.jsonl results.csv summary.md env.json config.yaml; do
  [ -s "$work/smoke/$f" ] || { log "FAIL: $work/smoke/$f missing"; exit 1; }
done
log "ok: paged-attn run smoke wrote $(wc -l < "$work/smoke/results.jsonl") result rows to $work/smoke"
log "PASS"
