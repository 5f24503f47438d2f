#!/usr/bin/env bash
# Builds our images without Docker, as OCI archives that `ctr images import`
# loads (testbed/src/node runs them on a real kubelet and containerd):
#
#   scripts/images.sh OUT_DIR BIN_DIR MUSL_BIN_DIR
#
# BIN_DIR holds cargo's ztunnel, waypoint and istio-cni-agent, MUSL_BIN_DIR
# the static istio-cni plugin. Each image is what docker/*.Dockerfile makes, from the
# same binaries and with the same entrypoint and user; the base layers are
# the host's own Debian files instead of distroless/bookworm-slim (the
# Dockerfiles' bases cannot be pulled here):
#   ztunnel    the binary and the glibc it links (distroless cc), root
#   waypoint   the binary, its glibc and CA certificates, and distroless
#              nonroot's passwd/group entries; 65532:65532
#   istio-cni  plugin, agent (also as install-cni), iptables, ip, ipset and
#              nsenter with their libraries and xtables modules, root
#   pause      kubernetes' own pause.c from the pinned module, static
#   app        Debian's static busybox (httpd serves, nc is the client)
set -euo pipefail
out="$1" bin="$2" musl="$3"
root="$(cd "$(dirname "$0")/.." && pwd)"
export PATH="$PATH:/usr/local/go/bin"
mkdir -p "$out"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# oci NAME REF ENTRYPOINT_JSON USER: archives $work/NAME as a one-layer image.
oci() {
  local name="$1" ref="$2" ep="$3" user="$4" l="$work/$1.oci"
  mkdir -p "$l/blobs/sha256"
  tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner \
    -C "$work/$name" -cf "$l/layer.tar" .
  local diff_id; diff_id="$(sha256sum "$l/layer.tar" | cut -d' ' -f1)"
  gzip -n -1 "$l/layer.tar"
  local layer; layer="$(blob "$l" "$l/layer.tar.gz")"
  printf '{"architecture":"amd64","os":"linux","config":{"Entrypoint":%s,"User":"%s","Env":["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]},"rootfs":{"type":"layers","diff_ids":["sha256:%s"]}}' \
    "$ep" "$user" "$diff_id" > "$l/config"
  local config; config="$(blob "$l" "$l/config")"
  printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json",%s},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip",%s}]}' \
    "$config" "$layer" > "$l/manifest"
  local manifest; manifest="$(blob "$l" "$l/manifest")"
  printf '{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json",%s,"annotations":{"io.containerd.image.name":"%s","org.opencontainers.image.ref.name":"%s"}}]}' \
    "$manifest" "$ref" "${ref##*:}" > "$l/index.json"
  echo '{"imageLayoutVersion":"1.0.0"}' > "$l/oci-layout"
  tar -C "$l" -cf "$out/$name.tar" oci-layout index.json blobs
}

# blob LAYOUT FILE: moves FILE into the layout's blobs, prints its descriptor fields.
blob() {
  local sum size; sum="$(sha256sum "$2" | cut -d' ' -f1)"; size="$(stat -c %s "$2")"
  mv "$2" "$1/blobs/sha256/$sum"
  printf '"digest":"sha256:%s","size":%s' "$sum" "$size"
}

# libs DIR FILE...: copies the shared libraries each file loads (none for a
# static one) to their own paths under DIR.
libs() {
  local dir="$1"; shift
  for f in "$@"; do
    { ldd "$f" 2>/dev/null || true; } | { grep -o '/[^ ]*' || true; } | while read -r lib; do
      cp -L --parents "$lib" "$dir"
    done
  done
}

# skeleton DIR: Debian's merged /usr, so libraries copied by their /lib
# paths land where the host has them.
skeleton() {
  mkdir -p "$1/usr/bin" "$1/usr/sbin" "$1/usr/lib" "$1/usr/lib64" "$1/usr/local/bin" "$1/tmp" "$1/etc"
  for d in bin sbin lib lib64; do ln -s "usr/$d" "$1/$d"; done
}

# ztunnel: distroless cc is glibc, libgcc and CA certificates.
z="$work/ztunnel"
skeleton "$z"
mkdir -p "$z/etc/ssl/certs"
install -m 0755 "$bin/ztunnel" "$z/usr/local/bin/ztunnel"
libs "$z" "$bin/ztunnel"
cp /etc/ssl/certs/ca-certificates.crt "$z/etc/ssl/certs/"
oci ztunnel ghcr.io/ambient-rs/ztunnel:0.1.0 '["/usr/local/bin/ztunnel"]' ""

# waypoint: distroless cc's nonroot flavour (its user 65532 named in
# passwd/group, a home and a /tmp of its own).
w="$work/waypoint"
skeleton "$w"
mkdir -p "$w/etc/ssl/certs" "$w/home/nonroot"
install -m 0755 "$bin/waypoint" "$w/usr/local/bin/waypoint"
libs "$w" "$bin/waypoint"
cp /etc/ssl/certs/ca-certificates.crt "$w/etc/ssl/certs/"
printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' > "$w/etc/passwd"
printf 'root:x:0:\nnonroot:x:65532:\n' > "$w/etc/group"
chmod 1777 "$w/tmp"
oci waypoint ghcr.io/ambient-rs/waypoint:0.1.0 '["/usr/local/bin/waypoint"]' 65532:65532

# istio-cni: the Dockerfile's slim Debian with iptables, iproute2, ipset,
# util-linux (nsenter).
c="$work/istio-cni"
skeleton "$c"
mkdir -p "$c/run" "$c/var"
install -m 0755 "$musl/istio-cni" "$c/usr/local/bin/istio-cni"
install -m 0755 "$bin/istio-cni-agent" "$c/usr/local/bin/istio-cni-agent"
ln -s istio-cni-agent "$c/usr/local/bin/install-cni"
tools=(/usr/sbin/xtables-nft-multi /usr/sbin/xtables-legacy-multi /usr/sbin/ip /usr/sbin/ipset /usr/bin/nsenter)
cp --parents "${tools[@]}" "$c"
libs "$c" "$bin/istio-cni-agent" "${tools[@]}"
# Debian's names; its alternatives point the plain ones at the nft backend.
for t in iptables ip6tables; do
  for op in "" -save -restore; do
    ln -s xtables-nft-multi "$c/usr/sbin/$t$op"
    ln -s xtables-nft-multi "$c/usr/sbin/$t-nft$op"
    ln -s xtables-legacy-multi "$c/usr/sbin/$t-legacy$op"
  done
done
cp -a --parents /usr/lib/x86_64-linux-gnu/xtables "$c"
oci istio-cni ghcr.io/ambient-rs/istio-cni:0.1.0 '["/usr/local/bin/istio-cni-agent"]' ""

# pause: the kubelet's sandbox image, from the pinned kubernetes module.
k8s="$(cd "$root/testbed/peers/node" && go list -m -f '{{.Dir}}' k8s.io/kubernetes)"
mkdir -p "$work/pause"
gcc -Os -static -DVERSION=v3.10 -o "$work/pause/pause" "$k8s/build/pause/linux/pause.c"
oci pause registry.k8s.io/pause:3.10 '["/pause"]' 65535:65535

# app: busybox's httpd serves, its nc is the client (its wget crashes).
a="$work/app"
skeleton "$a"
mkdir -p "$a/www"
cp /bin/busybox "$a/bin/busybox"
libs "$a" /bin/busybox
for t in sh httpd nc sleep cat echo hostname; do ln -s busybox "$a/bin/$t"; done
oci app mesh.test/app:1 '["/bin/busybox"]' 65532:65532
ls "$out"
