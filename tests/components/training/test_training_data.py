"""Which shards a training command reads for its `--data`: a curated output's root is its
training folder (never its held-out split or raw parts), the shard list is what the dataset's
published manifest lists (never a listing of the prefix), and a prefix is a whole folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from components.common.objectstore import MANIFEST_NAME, ChecksumMissingError, S3Uri
from components.training.run import published_shards, rendition_data, shard_urls, training_data


def _keys(urls: list[str]) -> list[str]:
    return sorted(S3Uri.parse(url).key for url in urls)


def _folder(root: Path, names: list[str]) -> Path:
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(name.encode())
    return root


def test_a_curated_outputs_root_is_read_as_its_training_shards(store, prefix, tmp_path):
    root = S3Uri.parse(f"{prefix}/curated")
    names = [
        "dataset_card.json",
        "manifest.jsonl",
        "shards/shard-000000.tar",
        "shards/shard-000001.tar",
        "heldout/shard-000000.tar",
        "shards-hq/shard-000000.tar",
        "heldout-hq/shard-000000.tar",
        "parts/shard-0123/clips.tar",
    ]
    store.publish_folder(_folder(tmp_path / "curated", names), root)
    # A shard put there after publishing is not part of the dataset: never read.
    store.put_bytes(root.join("shards/shard-000002.tar"), b"not published")
    data = training_data(str(root), store)
    assert data == f"{root}/shards/" and training_data(f"{root}/", store) == data
    urls = shard_urls(data, store)
    assert urls == [f"{root}/shards/shard-00000{i}.tar" for i in (0, 1)]  # s3:// URIs: no signature in them
    # A stage that reads the high-resolution rendition goes on to its folder.
    assert _keys(shard_urls(rendition_data(data, "hq"), store)) == [f"{root.key}/shards-hq/shard-000000.tar"]
    # Any other location is read as given.
    assert training_data(f"{root}/shards-hq/", store) == f"{root}/shards-hq/"
    # Each shard comes with the sha256 the manifest recorded.
    (first, _) = published_shards(data, store)
    assert first["sha256"] == store.recorded_sha256(first["uri"])


def test_a_prefix_is_a_whole_folder(store, prefix, tmp_path):
    for run in ("run1", "run10"):
        store.publish_folder(_folder(tmp_path / run, ["shard-000000.tar"]), f"{prefix}/{run}")
    for data in (f"{prefix}/run1", f"{prefix}/run1/"):
        assert _keys(shard_urls(training_data(data, store), store)) == [
            f"{S3Uri.parse(prefix).key}/run1/shard-000000.tar"
        ]
    (tmp_path / "run1" / "dataset_card.json").write_text("{}")  # a local curated output: its shards/ (none)
    (tmp_path / "run1" / "shards").mkdir()
    (tmp_path / "run1" / "shards" / "shard-000000.tar").write_bytes(b"x")
    local = training_data(str(tmp_path / "run1"), store)
    assert shard_urls(local, store) == [str(tmp_path / "run1" / "shards" / "shard-000000.tar")]


def test_unpublished_shards_and_entries_without_a_checksum_are_refused(store, prefix, tmp_path):
    store.put_bytes(f"{prefix}/loose/shard-000000.tar", b"x")
    with pytest.raises(ValueError, match=rf"{prefix}/loose is not a published dataset: no {MANIFEST_NAME}"):
        shard_urls(f"{prefix}/loose", store)
    store.publish_folder(_folder(tmp_path / "data", ["shard-000000.tar"]), f"{prefix}/data")
    manifest = store.read_manifest(f"{prefix}/data")
    del manifest["files"][0]["sha256"]
    store.put_bytes(f"{prefix}/data/{MANIFEST_NAME}", json.dumps(manifest).encode())
    with pytest.raises(ChecksumMissingError, match="'shard-000000.tar' without a sha256"):
        shard_urls(f"{prefix}/data", store)
