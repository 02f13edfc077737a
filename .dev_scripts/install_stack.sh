# Sourced in the repository root on a GPU host without a package index
# (gpu_run.sh does it first; by hand: `source .dev_scripts/install_stack.sh`):
# installs the wheels of .dev_scripts/wheels (download_stack.sh's stack and
# build_mmcv_cuda_wheel.sh's mmcv) beside the host's own Python and torch into
# $CONVNEUR_SITE (default /tmp/convneur_site), puts the repository and that
# folder on PYTHONPATH and, before anything else runs, checks mmcv's CUDA ops:
# the wheel serves this host's torch, CUDA and GPU, and nms and RoIAlign on
# CUDA tensors agree with the CPU. Without the wheel folder the host's Python
# is checked as it is (a host whose environment has the stack).
#   MMCV_OPS=0  mmcv's Python part from its source distribution instead (no
#               mmcv.ops: the detectors and the tests that need them fail)
#   DRY_RUN=1   says what it would install and check, and does neither
#   PYTHON      the host's interpreter (default python3)
#   INSTALL_STEP_TIMEOUT_S  the most each install or check command may take (300)
# Returns non-zero with the reason on any failure.

_convneur_install() {
    local repo=$PWD py=${PYTHON:-python3} wheels=${WHEELS:-$PWD/.dev_scripts/wheels}
    local site=${CONVNEUR_SITE:-/tmp/convneur_site} setup=tools/setup/cuda_setup.py
    local tag version w stack=() mmcv_wheel='' flavor_file='' host_flavor wheel_flavor
    # a hung pip or CUDA check must not take the whole run's time
    local limit=(timeout "${INSTALL_STEP_TIMEOUT_S:-300}")
    # the wheels' tag (cp312) and the version download_stack.sh takes (3.12)
    read -r tag version < <("$py" -c 'import sys; v = sys.version_info[:2]
print("cp%d%d %d.%d" % (v + v))') || {
        echo "[install] error: no Python '$py' here (set PYTHON)"; return 1; }
    if ls "$wheels"/*.whl > /dev/null 2>&1; then
        for w in "$wheels"/*.whl; do
            case $(basename "$w") in mmcv-*) ;; *) stack+=("$w") ;; esac
        done
        if [ ${#stack[@]} -eq 0 ]; then
            echo "[install] error: $wheels holds mmcv's wheel but none of the stack's."
            echo "[install] Download them on a machine with PyPI first: bash" \
                 ".dev_scripts/download_stack.sh --python $version"
            return 1
        fi
        if [ "${MMCV_OPS:-1}" != 0 ]; then
            mmcv_wheel=$(ls "$wheels"/mmcv-*-"$tag"-"$tag"-*.whl 2> /dev/null | head -1)
            if [ -z "$mmcv_wheel" ]; then
                echo "[install] error: $wheels holds no mmcv CUDA wheel for this Python ($tag)."
                echo "[install] Build one on a machine with PyPI: bash .dev_scripts/build_mmcv_cuda_wheel.sh" \
                     "--python $version" \
                     "--torch $("$py" -c 'import torch; print(torch.__version__)' 2> /dev/null || echo VERSION)"
                return 1
            fi
            flavor_file=${mmcv_wheel%.whl}.flavor.json
            [ -f "$flavor_file" ] || { echo "[install] error: $flavor_file is missing"; return 1; }
        fi
        echo "[install] ${#stack[@]} wheels of the stack${mmcv_wheel:+ and $(basename "$mmcv_wheel")} into $site"
        if [ "${DRY_RUN:-0}" = 1 ]; then
            echo "[install] dry run: nothing installed, nothing checked"
            return 0
        fi
        # mmpretrain 1.2 imports its multimodal models whenever a transformers
        # *distribution* >= 4.28 is installed and fails beside transformers 5:
        # a 0.0 one first on the path hides the host's
        mkdir -p "$site/transformers-0.0.dist-info"
        printf 'Metadata-Version: 2.1\nName: transformers\nVersion: 0.0\n' \
            > "$site/transformers-0.0.dist-info/METADATA"
        "${limit[@]}" "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
            --upgrade --target "$site" "${stack[@]}" || return 1
        if [ -n "$mmcv_wheel" ]; then
            "${limit[@]}" "$py" -m pip install -q --no-index --find-links "$wheels" --only-binary=:all: \
                --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$mmcv_wheel" \
                || return 1
        else
            rm -rf "$site/mmcv" /tmp/convneur_mmcv_src && mkdir -p /tmp/convneur_mmcv_src && \
                tar xzf "$wheels"/mmcv-*.tar.gz -C /tmp/convneur_mmcv_src && \
                cp -r /tmp/convneur_mmcv_src/mmcv-*/mmcv "$site/" || return 1
            echo "[install] mmcv's Python part only (MMCV_OPS=0): no mmcv.ops"
        fi
        # the repository first: mmsegmentation's and model-index's wheels
        # install a top-level `tests` package
        export PYTHONPATH=$repo:$site
    elif [ "${DRY_RUN:-0}" = 1 ]; then
        echo "[install] dry run: no $wheels; the host's Python would be checked as it is"
        return 0
    else
        echo "[install] no $wheels: checking the host's Python as it is"
        export PYTHONPATH=$repo${PYTHONPATH:+:$PYTHONPATH}
    fi
    command -v nvidia-smi > /dev/null && \
        nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    if [ "${MMCV_OPS:-1}" != 0 ]; then
        "$py" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else
                  "torch %s sees no GPU here" % torch.__version__)' || return 1
        host_flavor=$("$py" "$setup" flavor) || return 1
        if [ -n "$flavor_file" ] && ! "$py" "$setup" mmcv-covers "$host_flavor" "$flavor_file"; then
            echo "[install] error: $(basename "$mmcv_wheel") was built for $(cat "$flavor_file")"
            echo "[install] this host needs $host_flavor: rebuild it (.dev_scripts/README.md)"
            return 1
        fi
        # the wheel's recorded flavor, or the host's for an mmcv installed here
        wheel_flavor=$host_flavor
        [ -n "$flavor_file" ] && wheel_flavor=$(tail -n 1 "$flavor_file")
        "${limit[@]}" "$py" "$setup" check "$wheel_flavor" || return 1
    fi
    "${limit[@]}" "$py" -c "import torch, mmcv, mmdet, mmseg, mmpretrain.models; print('[install] torch',
torch.__version__, 'mmcv', mmcv.__version__, 'mmdet', mmdet.__version__, 'mmseg',
mmseg.__version__, 'mmpretrain', mmpretrain.__version__)" || return 1
}

_convneur_install
_convneur_rc=$?
unset -f _convneur_install
return $_convneur_rc
