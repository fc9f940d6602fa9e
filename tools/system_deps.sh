#!/usr/bin/env bash
# System packages the tests start for real: PostgreSQL (Debian's postgresql), OpenSSH's sshd
# (openssh-server), and chromium + chromium-driver (the dashboard's browser tests). Installed when missing
# and this runs as root with apt-get (CI); otherwise a note, and the tests that need them skip.
set -euo pipefail
need=()
compgen -G "/usr/lib/postgresql/*/bin/pg_ctl" >/dev/null || need+=(postgresql)
[ -x /usr/sbin/sshd ] || need+=(openssh-server)  # the SFTP server the non-local storage tests reach
command -v chromium >/dev/null || need+=(chromium)  # the dashboard's browser tests (Selenium)
command -v chromedriver >/dev/null || need+=(chromium-driver)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
    echo "installing ${need[*]} (apt-get)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
else
    echo "note: ${need[*]} not installed and not root: the tests that start them will skip" >&2
fi
