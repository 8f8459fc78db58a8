#!/bin/sh
# Helm post-renderer for the consul-k8s 1.x chart: rewrites the connect
# injector's `-consul-dataplane-image="..."` flag, and nothing else, so that
# only the sidecars the injector adds from now on run veer's dataplane image.
# Gateways, the DNS proxy and the telemetry collector keep
# global.imageConsulDataplane. See deploy/kubernetes/README.md.
#
#   Helm 3: helm upgrade consul hashicorp/consul -f values.yaml \
#             --post-renderer ./veer-dataplane-image.sh \
#             --post-renderer-args registry.example.com/veer-consul-dataplane:0.1.0
#   Helm 4: helm plugin install deploy/kubernetes/helm, then
#           --post-renderer veer-dataplane-image --post-renderer-args <image>
#   Or:     helm template ... | VEER_DATAPLANE_IMAGE=<image> ./veer-dataplane-image.sh
#
# Reads the rendered manifests on stdin, writes them to stdout. Fails,
# writing nothing, unless the flag occurs exactly once (a chart that renders
# it differently must not be deployed with Envoy silently kept).
set -eu
image="${1:-${VEER_DATAPLANE_IMAGE:-}}"
if [ -z "$image" ]; then
  echo "veer-dataplane-image: give the image as the argument (--post-renderer-args) or in VEER_DATAPLANE_IMAGE" >&2
  exit 2
fi
case "$image" in
  *[!A-Za-z0-9./:@_-]*)
    echo "veer-dataplane-image: not an image reference: $image" >&2
    exit 2 ;;
esac
in=$(mktemp)
trap 'rm -f "$in"' EXIT
cat > "$in"
n=$(grep -c -- '-consul-dataplane-image="' "$in" || true)
if [ "$n" != 1 ]; then
  echo "veer-dataplane-image: expected the connect injector's -consul-dataplane-image=\"...\" once in the rendered chart, found it $n times (is connectInject enabled? is this the consul-k8s 1.x chart?)" >&2
  exit 1
fi
sed -e "s|-consul-dataplane-image=\"[^\"]*\"|-consul-dataplane-image=\"$image\"|" "$in"
