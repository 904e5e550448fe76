"""Curation (SVD section 1): raw videos to annotated, filtered WebDataset shards.

Steps: `video` (probe, reject, decode once), `cuts`, `motion`, `neural`
(OCR, CLIP, aesthetics, captions), `annotate` (one input shard), `finalize`
(filters, shards, manifest, dataset card), `ablation` (filtered subsets).
"""
