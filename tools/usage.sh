# Sourced by the shell tools: `usage_or_die MAX_ARGS "$@"`. --help (or -h) prints
# the calling script's header comment and exits 0; another option, or more than
# MAX_ARGS arguments, is a usage error (exit 2) rather than a value.
usage_or_die() {
    local max=$1 arg
    shift
    for arg in "$@"; do
        case $arg in
            -h|--help) awk 'NR > 1 && /^#/ {sub(/^# ?/, ""); print; next} NR > 1 {exit}' "$0"
                       exit 0 ;;
            -*) echo "$(basename "$0"): unknown option $arg (--help)" >&2; exit 2 ;;
        esac
    done
    if [ $# -gt "$max" ]; then
        echo "$(basename "$0"): takes at most $max argument(s), got $# (--help)" >&2
        exit 2
    fi
}
