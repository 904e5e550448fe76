"""Near-duplicate clips (re-uploads, the same shot in two videos) by perceptual hashes of their key frames.

A clip's signature is the 64-bit DCT perceptual hash of its first, middle and last key frame. Two clips are
near-duplicates when every one of their frame hashes is within `max_distance` bits of the other's. Re-encodes,
rescales, brightness and contrast changes leave a hash within a few bits; a crop of 3% per side moves it about
6 bits; unrelated frames, even of one palette, differ by 14 bits or more (32 on average).

Candidates come from bucket collisions, never from comparing all pairs (multi-index hashing): each frame hash
is split into `max_distance + 1` bands, so two hashes within `max_distance` bits agree exactly on at least one
band (pigeonhole), and a near-duplicate pair shares a bucket keyed by one band of each of the three frames.
Every candidate is then checked bit by bit. Within a group the clip of highest quality is kept.
"""

from __future__ import annotations

import itertools
from array import array

import cv2
import numpy as np

HASH_BITS = 64
FRAMES = 3  # first, middle, last key frame of a clip
# Covers re-encodes, rescales, brightness and crops up to about 3% per side (6 bits); unrelated frames start at
# 14. Lookup cost grows with it: (max_distance + 1) ** 3 bucket passes over the index.
DEFAULT_MAX_DISTANCE = 8
# Pairs verified per step: bounds the memory of candidate pairs on large indexes.
_PAIR_CHUNK = 1 << 20


def phash(rgb: np.ndarray) -> str:
    """64-bit DCT perceptual hash of an RGB uint8 HxWx3 frame, as 16 hex digits: the 8x8 lowest frequencies
    of the 32x32 grey frame, each bit set where the coefficient is above the median of the 63 non-DC ones."""
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    small = cv2.resize(grey, (32, 32), interpolation=cv2.INTER_AREA).astype(np.float32)
    coefficients = cv2.dct(small)[:8, :8].flatten()
    # The DC term (mean brightness) is far above the others and would skew the median.
    bits = coefficients > np.median(coefficients[1:])
    return f"{int(np.packbits(bits).view('>u8')[0]):016x}"


def hamming(a: str, b: str) -> int:
    """Bits that differ between two hex hashes."""
    return (int(a, 16) ^ int(b, 16)).bit_count()


def _bands(max_distance: int) -> list[tuple[int, int]]:
    """(shift, width) of `max_distance + 1` bands covering the 64 bits, widths differing by at most one."""
    count = max_distance + 1
    widths = [HASH_BITS // count + (i < HASH_BITS % count) for i in range(count)]
    starts = np.cumsum([0, *widths[:-1]])
    return [(int(start), width) for start, width in zip(starts, widths, strict=True)]


class DuplicateIndex:
    """Clips added one at a time (key, frame hashes, quality); `duplicates()` maps each dropped clip to the
    kept clip it nearly copies. Holds three integers and a float per clip besides the keys."""

    def __init__(self, max_distance: int = DEFAULT_MAX_DISTANCE):
        if not 0 <= max_distance < HASH_BITS // 2:
            raise ValueError(f"max_distance must be in [0, {HASH_BITS // 2}), got {max_distance}")
        self.max_distance = max_distance
        self._keys: list[str] = []
        self._hashes = array("Q")  # FRAMES per clip, in order
        self._quality = array("d")
        self.candidates = 0  # pairs the last `duplicates()` checked bit by bit (its cost beyond the sorts)

    def __len__(self) -> int:
        return len(self._keys)

    def add(self, key: str, phash: tuple[str, ...], quality: float) -> None:
        """One clip: its key, the hashes of its first, middle and last key frames, and its quality
        (higher is kept; NaN counts as lowest)."""
        if len(phash) != FRAMES:
            raise ValueError(f"clip {key}: {len(phash)} frame hashes, expected {FRAMES}")
        self._keys.append(key)
        self._hashes.extend(int(h, 16) for h in phash)
        self._quality.append(float("-inf") if np.isnan(quality) else float(quality))

    def duplicates(self) -> dict[str, str]:
        """Dropped key -> kept key. Clips are taken best first (quality, then key); a clip is dropped when
        it is a near-duplicate of a clip already kept, and names the best such clip."""
        count = len(self._keys)
        if count < 2:
            return {}
        hashes = np.frombuffer(self._hashes, np.uint64).reshape(count, FRAMES)
        self.candidates = 0
        neighbours: dict[int, list[int]] = {}
        for first, second in self._pairs(hashes):
            neighbours.setdefault(int(first), []).append(int(second))
            neighbours.setdefault(int(second), []).append(int(first))
        if not neighbours:
            return {}
        keys = self._keys
        # Best first: highest quality, ties by key, so the outcome does not depend on the order of `add`.
        order = sorted(range(count), key=lambda i: (-self._quality[i], keys[i]))
        rank = np.empty(count, np.int64)
        rank[order] = np.arange(count)
        kept: set[int] = set()
        dropped: dict[str, str] = {}
        for clip in order:
            copies_of = [other for other in neighbours.get(clip, ()) if other in kept]
            if copies_of:
                dropped[keys[clip]] = keys[min(copies_of, key=lambda other: rank[other])]
            else:
                kept.add(clip)
        return dropped

    def _pairs(self, hashes: np.ndarray) -> np.ndarray:
        """(P, 2) index pairs, first < second, of near-duplicates: candidates from bucket collisions
        (one band of each frame hash), each checked on every frame."""
        bands = _bands(self.max_distance)
        # values[frame][band]: that band of every clip's hash of that frame
        values = [
            [(hashes[:, frame] >> np.uint64(shift)) & np.uint64((1 << width) - 1) for shift, width in bands]
            for frame in range(FRAMES)
        ]
        widths = [width for _, width in bands]
        found: list[np.ndarray] = []
        candidates: list[np.ndarray] = []
        pending = 0
        for first, second, third in itertools.product(range(len(bands)), repeat=FRAMES):
            bucket = (
                (values[0][first] << np.uint64(widths[second] + widths[third]))
                | (values[1][second] << np.uint64(widths[third]))
                | values[2][third]
            )
            pairs = _collisions(bucket)
            if len(pairs):
                candidates.append(pairs)
                pending += len(pairs)
            if pending >= _PAIR_CHUNK:
                found.append(self._verified(hashes, candidates))
                candidates, pending = [], 0
        if candidates:
            found.append(self._verified(hashes, candidates))
        # A pair may collide in several buckets, so across chunks too.
        codes = np.unique(np.concatenate(found)) if found else np.zeros(0, np.int64)
        return np.stack(np.divmod(codes, len(hashes)), axis=1)

    def _verified(self, hashes: np.ndarray, candidates: list[np.ndarray]) -> np.ndarray:
        """The codes of the candidate pairs whose frame hashes are all within max_distance bits."""
        codes = np.unique(np.concatenate(candidates))
        self.candidates += len(codes)
        first, second = np.divmod(codes, len(hashes))
        distances = np.bitwise_count(hashes[first] ^ hashes[second])
        return codes[(distances <= self.max_distance).all(axis=1)]


def _collisions(bucket: np.ndarray) -> np.ndarray:
    """Pair codes `first * len(bucket) + second`, first < second, of entries with equal bucket values."""
    order = np.argsort(bucket)
    ordered = bucket[order]
    codes = []
    # Entries of one bucket are adjacent once sorted: pair each with those `offset` places on, until none match.
    for offset in range(1, len(order)):
        same = np.flatnonzero(ordered[offset:] == ordered[:-offset])
        if not len(same):
            break
        first, second = order[same], order[same + offset]
        codes.append(np.minimum(first, second) * len(bucket) + np.maximum(first, second))
    return np.concatenate(codes) if codes else np.zeros(0, np.int64)
