# Shared by scripts/up.sh and scripts/test.sh: what building Agora needs on a
# fresh machine. Sourced, not run.

log() { printf '==> %s\n' "$*" >&2; }

# Installs Debian packages when running as root with apt; else says what to install.
apt_install() {
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    log "missing $*; install it (Debian package names: $*) and re-run"
    exit 1
  fi
  log "installing $*"
  if [ -z "${APT_UPDATED:-}" ]; then
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
    APT_UPDATED=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

# Pingora compresses with zlib-ng, whose build runs cmake: Debian's package as
# root, else PyPI's cmake for this user, else a clear word on what is missing.
ensure_cmake() {
  command -v cmake >/dev/null && return
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt_install cmake
    return
  fi
  if command -v python3 >/dev/null && python3 -m pip --version >/dev/null 2>&1; then
    log "installing cmake from PyPI for this user"
    python3 -m pip install --user --quiet cmake
    PATH="$(python3 -m site --user-base)/bin:$PATH"
    export PATH
    command -v cmake >/dev/null && return
  fi
  log "cmake is needed to build Agora's gateway: install it (Debian: apt-get install cmake) and re-run"
  exit 1
}
