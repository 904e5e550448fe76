"""Which shards a training command reads for its `--data`: a curated output's root is its
training folder (never its held-out split or raw parts), and a prefix is a whole folder."""

from __future__ import annotations

from urllib.parse import urlparse

from components.common.objectstore import S3Uri
from components.training.run import rendition_data, shard_urls, training_data


def _keys(urls: list[str]) -> list[str]:
    """The object keys of presigned URLs, after the bucket."""
    return sorted(urlparse(url).path.split("/", 2)[2] for url in urls)


def test_a_curated_outputs_root_is_read_as_its_training_shards(store, prefix):
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
    for name in names:
        store.put_bytes(root.join(name), b"x")
    data = training_data(str(root), store)
    assert data == f"{root}/shards/" and training_data(f"{root}/", store) == data
    assert _keys(shard_urls(data, store)) == [f"{root.key}/shards/shard-00000{i}.tar" for i in (0, 1)]
    # A stage that reads the high-resolution rendition goes on to its folder.
    assert _keys(shard_urls(rendition_data(data, "hq"), store)) == [f"{root.key}/shards-hq/shard-000000.tar"]
    # Any other location is read as given.
    assert training_data(f"{root}/shards-hq/", store) == f"{root}/shards-hq/"


def test_a_prefix_is_a_whole_folder(store, prefix, tmp_path):
    for run in ("run1", "run10"):
        store.put_bytes(S3Uri.parse(f"{prefix}/{run}/shard-000000.tar"), b"x")
    for data in (f"{prefix}/run1", f"{prefix}/run1/"):
        assert _keys(shard_urls(training_data(data, store), store)) == [
            f"{S3Uri.parse(prefix).key}/run1/shard-000000.tar"
        ]
    for run in ("run1", "run10"):
        (tmp_path / run).mkdir()
        (tmp_path / run / "shard-000000.tar").write_bytes(b"x")
    (tmp_path / "run1" / "dataset_card.json").write_text("{}")  # a local curated output: its shards/ (none)
    (tmp_path / "run1" / "shards").mkdir()
    (tmp_path / "run1" / "shards" / "shard-000000.tar").write_bytes(b"x")
    local = training_data(str(tmp_path / "run1"), store)
    assert shard_urls(local, store) == [str(tmp_path / "run1" / "shards" / "shard-000000.tar")]
