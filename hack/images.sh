#!/usr/bin/env bash
# Builds the amesh container images from the Dockerfile's targets:
#   hack/images.sh [name…]      (default: every image)
# as $IMAGE_REGISTRY/<name>:$IMAGE_TAG (default ghcr.io/amesh-dev/…:dev, the
# tag the kind overlay uses) into the local Docker image store. Needs a
# Docker engine with BuildKit (docker buildx, or docker build on Docker ≥ 23).
set -euo pipefail
cd "$(dirname "$0")/.."

registry=${IMAGE_REGISTRY:-ghcr.io/amesh-dev}
tag=${IMAGE_TAG:-dev}
platform=${IMAGE_PLATFORM:-}
all=(amesh-controller ztunnel waypoint amesh-cni-agent sampleapp)
images=("$@")
[ ${#images[@]} -gt 0 ] || images=("${all[@]}")
for i in "${images[@]}"; do
  case " ${all[*]} " in *" $i "*) ;; *) echo "images: unknown image $i (one of: ${all[*]})" >&2; exit 2 ;; esac
done

if ! command -v docker >/dev/null 2>&1; then
  echo "images: no docker client on PATH. Install Docker (with buildx) to build images;" >&2
  echo "        the local cluster (make demo, make e2e) needs no images." >&2
  exit 1
fi
if ! docker info >/dev/null 2>&1; then
  echo "images: the Docker engine is not reachable (docker info failed): start it or set DOCKER_HOST." >&2
  echo "        The local cluster (make demo, make e2e) needs no images." >&2
  exit 1
fi
if docker buildx version >/dev/null 2>&1; then
  build=(docker buildx build --load)
else
  echo "images: docker buildx not found; using docker build with BuildKit" >&2
  build=(env DOCKER_BUILDKIT=1 docker build)
fi
[ -z "$platform" ] || build+=(--platform "$platform")

for i in "${images[@]}"; do
  ref="$registry/$i:$tag"
  echo "== $ref"
  "${build[@]}" --target "$i" --tag "$ref" .
done
