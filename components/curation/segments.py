"""Clip boundaries from cuts, as the video streams: a clip is closed as soon as the cuts
around it are known, so only the frames of the clip being formed are held."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from components.curation.config import Cuts


@dataclass(frozen=True)
class Segment:
    start: int  # first frame
    end: int  # one past the last frame
    too_short: bool


class Segmenter:
    """Shots between cuts, dark ends (fades) trimmed, split to at most `max_clip_s`; shots
    shorter than `min_clip_s` are kept but marked.

    A shot longer than twice `max_clip_s` is not held to its end: once more than that of it
    is known to have no cut, a piece of `max_clip_s` is closed; at the shot's end the rest
    is split evenly. Every piece has its dark ends trimmed."""

    def __init__(self, fps: float, config: Cuts):
        self.min_len, self.max_len = config.min_clip_s * fps, config.max_clip_s * fps
        self.piece_len = max(1, int(self.max_len))
        self.dark_luma = config.dark_luma
        # The first frame a later segment can hold: every frame before it is in a closed
        # segment or trimmed.
        self.open_from = 0

    def advance(self, cuts: list[int], known: int, luma: Sequence[float]) -> list[Segment]:
        """The segments closed by `cuts` (sorted, after those given before) and by the open
        shot growing long, given that no cut before frame `known` is missing. `luma`: the mean
        (0-255) of every frame so far."""
        out: list[Segment] = []
        for cut in cuts:
            out += self._long_shot_pieces(cut, luma)
            out += self._close(cut, luma)
        return out + self._long_shot_pieces(known, luma)

    def finish(self, cuts: list[int], num_frames: int, luma: Sequence[float]) -> list[Segment]:
        """After the last frame: the remaining segments."""
        return self.advance(cuts, num_frames, luma) + self._close(num_frames, luma)

    def _long_shot_pieces(self, known: int, luma: Sequence[float]) -> list[Segment]:
        out: list[Segment] = []
        while known - self.open_from > 2 * self.max_len:
            out += self._trimmed(self.open_from, self.open_from + self.piece_len, luma, pieces=1)
            self.open_from += self.piece_len
        return out

    def _close(self, end: int, luma: Sequence[float]) -> list[Segment]:
        out = self._trimmed(self.open_from, end, luma, pieces=None)
        self.open_from = max(self.open_from, end)
        return out

    def _trimmed(self, start: int, end: int, luma: Sequence[float], pieces: int | None) -> list[Segment]:
        """[start, end) without its dark ends, in `pieces` (None: as few equal ones as `max_clip_s` allows)."""
        lit = np.flatnonzero(np.asarray(luma[start:end]) >= self.dark_luma)
        if len(lit) == 0:
            return []  # all black: nothing to keep
        start, end = start + int(lit[0]), start + int(lit[-1]) + 1
        if pieces is None:
            pieces = max(1, int(np.ceil((end - start) / self.max_len)))
        bounds = np.linspace(start, end, pieces + 1).round().astype(int)
        return [
            Segment(int(a), int(b), too_short=bool(b - a < self.min_len))
            for a, b in zip(bounds[:-1], bounds[1:], strict=True)
        ]


def segments(num_frames: int, fps: float, cuts: list[int], luma: Sequence[float], config: Cuts) -> list[Segment]:
    """Every segment of a whole video (see Segmenter)."""
    return Segmenter(fps, config).finish(cuts, num_frames, luma)
