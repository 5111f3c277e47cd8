"""JPEG header reading without decoding: size, components and coding process.

The GPU prepare stage needs to know, before handing bytes to nvjpeg, whether
an image is within the pixel limit and whether nvjpeg should get it at all
(CMYK/YCCK JPEGs and arithmetic coding go to the CPU decoder instead). Walking
the marker segments up to the first SOF costs a few microseconds in Python.
"""

from __future__ import annotations

from dataclasses import dataclass

#: SOF markers: baseline, extended, progressive, lossless; 0xC9-0xCF arithmetic.
_SOF = {0xC0: "baseline", 0xC1: "extended", 0xC2: "progressive", 0xC3: "lossless",
        0xC5: "differential", 0xC6: "differential", 0xC7: "differential",
        0xC9: "arithmetic", 0xCA: "arithmetic", 0xCB: "arithmetic",
        0xCD: "arithmetic", 0xCE: "arithmetic", 0xCF: "arithmetic"}
_STANDALONE = {0x01, *range(0xD0, 0xD8)}  # TEM, RSTn: no length field


@dataclass(frozen=True)
class JpegHeader:
    """What the frame header says about a JPEG."""

    width: int
    height: int
    components: int
    process: str  # baseline, extended, progressive, lossless, differential, arithmetic
    precision: int

    @property
    def gpu_decodable(self) -> bool:
        """True when nvjpeg takes it: 8-bit Huffman DCT with 1 or 3 components."""
        return (self.process in ("baseline", "extended", "progressive")
                and self.components in (1, 3) and self.precision == 8)


def read_header(data: bytes, limit: int = 1 << 20) -> JpegHeader | None:
    """Parse markers up to the first SOF; None when the bytes are not a sane JPEG.

    Only the first ``limit`` bytes are scanned (EXIF/ICC segments come first
    and can be large; a frame header further in is treated as absent).
    """
    n = min(len(data), limit)
    if n < 4 or data[0] != 0xFF or data[1] != 0xD8:
        return None
    i = 2
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in _STANDALONE:
            i += 2
            continue
        if marker in (0xD9, 0xDA):  # EOI or SOS before any frame header
            return None
        length = (data[i + 2] << 8) | data[i + 3]
        if length < 2:
            return None
        if marker in _SOF:
            if i + 10 > n:
                return None
            precision = data[i + 4]
            height = (data[i + 5] << 8) | data[i + 6]
            width = (data[i + 7] << 8) | data[i + 8]
            comps = data[i + 9]
            if width == 0 or height == 0 or comps == 0:
                return None
            return JpegHeader(width, height, comps, _SOF[marker], precision)
        i += 2 + length
    return None
