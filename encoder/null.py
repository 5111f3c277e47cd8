"""The null encoder: a deterministic unit vector per image, with no decode and no model.

A product option for measuring everything around the encoder (``pinfresh
bench pipeline --encoder null``, ``PINFRESH_ENCODER__MODEL=null``): Kafka,
fetch, hashing, store writes and commits run for real while the encoder
costs almost nothing. The vector is a function of the image bytes only, so
a redelivery produces the same vector and the pipeline's idempotence can be
checked with it. Like a model's embeddings the vectors have full rank but
few intrinsic dimensions: a point of a ``LATENT_DIM``-dimensional latent space
(bytes of SHAKE-256 of the bytes' SHA-512) mapped into ``dim`` by a fixed
random basis (one per seed), plus isotropic noise of norm ``NOISE`` relative
to it. (The basis comes from numpy's seeded generator: the same vectors
wherever one numpy release runs, not promised across releases.) So the
vectors of distinct images span the whole space (rank ``dim``)
and have true neighbours for a search benchmark to find (isotropic random
points have none: in 512-d a point's ten nearest are barely nearer than the
rest, and recall on them measures that, not the index).
Never serve its vectors.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any

import numpy as np

from encoder.types import EncodeResult, EncoderInfo

#: Model name that selects the null encoder.
NULL_MODEL = "null"


#: Intrinsic dimensions of the null encoder's vectors.
LATENT_DIM = 16
#: Norm of the isotropic noise added to a vector's unit latent part.
NOISE = 0.5


@functools.cache
def _basis(dim: int, seed: int) -> np.ndarray:
    """The fixed ``LATENT_DIM`` x ``dim`` map from the latent space (one per seed)."""
    rng = np.random.default_rng([0x6E756C6C, seed % 2**64])  # "null"; any int seed
    basis = rng.standard_normal((LATENT_DIM, dim)).astype(np.float32)
    basis.setflags(write=False)
    return basis


def null_vector(data: bytes, dim: int, seed: int = 0) -> np.ndarray:
    """The unit vector the null encoder with ``seed`` gives ``data``."""
    salt = seed.to_bytes(8, "little", signed=True) if seed else b""
    digest = hashlib.sha512(salt + data).digest()
    raw = np.frombuffer(hashlib.shake_256(digest).digest(LATENT_DIM + dim), dtype=np.int8)
    coords = raw.astype(np.float32) + 0.5  # never all zero
    latent = coords[:LATENT_DIM] @ _basis(dim, seed)
    noise = coords[LATENT_DIM:]
    v = latent / np.linalg.norm(latent) + NOISE * noise / np.linalg.norm(noise)
    return v / np.linalg.norm(v)


class NullEncoder:
    """Implements what the stream needs from an encoder (`streams.processor.Encoder`)."""

    #: Tells an encoder process (`encoder.server`) that feeders send bytes as they are.
    prepare_kind = "none"

    def __init__(self, dim: int = 512, seed: int = 0) -> None:
        self.dim = dim
        self.seed = seed
        # another seed is another version with other vectors: a second model version for
        # refresh and backfill measurements (`pinfresh bench volume`)
        self.version = f"null_{dim}" if not seed else f"null_{dim}_s{seed}"
        self.images_forwarded = 0
        self.on_batch: Any = None

    @property
    def info(self) -> EncoderInfo:
        """Version and dimension (no checkpoint, no preprocessing)."""
        return EncoderInfo(version=self.version, dim=self.dim, model=NULL_MODEL,
                           checkpoint=None, preprocess={})

    def encode_images(self, items: Sequence[bytes]) -> list[EncodeResult]:
        """One vector per item, in order; never an error."""
        self.images_forwarded += len(items)
        return [null_vector(b, self.dim, self.seed) for b in items]

    def submit(self, items: Sequence[bytes]) -> list[Future[EncodeResult]]:
        """Completed futures, one per item (what an encoder process calls)."""
        out: list[Future[EncodeResult]] = []
        if self.on_batch is not None:  # one request is one batch here
            self.on_batch(len(items), 0.0)
        for res in self.encode_images([bytes(b) for b in items]):
            fut: Future[EncodeResult] = Future()
            fut.set_result(res)
            out.append(fut)
        return out

    async def encode_images_async(self, items: Sequence[bytes]) -> list[EncodeResult]:
        """`encode_images`, inline (it is cheaper than a thread hand-off)."""
        return self.encode_images(items)

    def close(self) -> None:
        """Nothing to release."""
