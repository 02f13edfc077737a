# Sourced on a borrowed GPU machine, in the repository root, after
# .dev_scripts/carry_stack.sh filled .whl here and the call carried it:
#   source .dev_scripts/device_env.sh
# installs the stack into /tmp/site beside the machine's own torch and puts
# it and the repository on PYTHONPATH. mmcv is built from its source (about
# 5 minutes on 16 cores) unless .whl holds the parts of an earlier build
# (mmcvcuda.part*): a build leaves its wheel in $OUT in 15 MB parts and its
# file name in mmcvcuda.name, to be copied into .whl for the next call (a
# fresh machine each time). MMCV_OPS=0 skips the build: mmcv's Python part
# only (no mmcv.ops), unless .whl holds such parts.
REPO=$PWD
export PYTHONUNBUFFERED=1
# mmpretrain 1.2 imports its multimodal models whenever the transformers
# *distribution* is >= 4.28, and fails beside transformers 5: a 0.0 one first
mkdir -p /tmp/site/transformers-0.0.dist-info
printf 'Metadata-Version: 2.1\nName: transformers\nVersion: 0.0\n' \
    > /tmp/site/transformers-0.0.dist-info/METADATA
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || return 1
# the repository first: mmsegmentation's and model-index's wheels install a
# top-level `tests` package
export PYTHONPATH=$REPO:/tmp/site
if ! python3 -c "import mmcv.ops" 2>/dev/null; then
    if [ "${MMCV_OPS:-1}" = 0 ] && ! ls .whl/mmcvcuda.part* >/dev/null 2>&1; then
        # MMCV_OPS=0: mmcv's Python part alone, from the carried source, in
        # seconds: the models and gpu_memory_bench.py need no mmcv op, and a
        # 15-minute lease has no 5 minutes for the build (mmcv.ops fails)
        mkdir -p /tmp/mmcvsrc && tar xzf "$REPO"/.whl/mmcv-*.tar.gz -C /tmp/mmcvsrc && \
            cp -r /tmp/mmcvsrc/mmcv-*/mmcv /tmp/site/ || return 1
        echo "[device_env] mmcv without its ops (MMCV_OPS=0)"
    elif ls .whl/mmcvcuda.part* >/dev/null 2>&1; then
        # the wheel's file name (pip reads its tags from it) beside the parts
        wheel=/tmp/$(cat .whl/mmcvcuda.name 2>/dev/null || echo mmcv-2.1.0-cp312-cp312-linux_x86_64.whl)
        cat .whl/mmcvcuda.part* > "$wheel"
        python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site \
            "$wheel" || return 1
    else
        start=$(date +%s)
        arch=$(python3 -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
        [ "$arch" = 9.0 ] && arch=9.0a
        (cd /tmp && tar xzf "$REPO"/.whl/mmcv-*.tar.gz && cd mmcv-*/ && \
         FORCE_CUDA=1 MMCV_WITH_OPS=1 CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} \
         TORCH_CUDA_ARCH_LIST=$arch MAX_JOBS=$(nproc) \
         python3 -m pip wheel -q --no-build-isolation --no-deps -w /tmp/mmcvwheel .) || return 1
        echo "[device_env] mmcv built for $arch in $(( $(date +%s) - start )) s"
        python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site \
            /tmp/mmcvwheel/*.whl || return 1
        [ -n "${OUT:-}" ] && (cd "$OUT" && split -b 15M /tmp/mmcvwheel/*.whl mmcvcuda.part &&
                               basename /tmp/mmcvwheel/*.whl > mmcvcuda.name)
    fi
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, mmcv, mmdet, mmseg, mmpretrain.models; print('[device_env] torch',
torch.__version__, 'mmcv', mmcv.__version__, 'mmdet', mmdet.__version__, 'mmseg',
mmseg.__version__, 'mmpretrain', mmpretrain.__version__)"
