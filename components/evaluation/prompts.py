"""The evaluation prompt set: a JSONL file of `{"prompt": ...}` lines in the object store
(by default curation's `heldout/prompts.jsonl`, the held-out clips' captions). Its version
is its content digest, recorded with every evaluation so figures on different sets are
never compared."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from components.common.objectstore import ObjectNotFoundError, ObjectStore, S3Uri, is_s3_uri

PROMPTS_FILE = "prompts.jsonl"


@dataclass(frozen=True)
class PromptSet:
    uri: str
    prompts: tuple[str, ...]
    digest: str  # 16 hex digits of sha256 over the file: the set's version

    def first(self, count: int | None) -> tuple[str, ...]:
        """The first `count` prompts (None: all)."""
        return self.prompts if count is None else self.prompts[:count]


def parse_prompt_set(text: str, uri: str) -> PromptSet:
    """A prompt set from its JSONL text; a line that is not `{"prompt": "..."}` is a ValueError
    naming the line."""
    prompts = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            prompt = json.loads(line)["prompt"]
        except (ValueError, KeyError, TypeError):
            raise ValueError(f'{uri} line {number}: expected {{"prompt": "..."}}, got {line[:80]!r}') from None
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"{uri} line {number}: the prompt must be a non-empty string")
        prompts.append(prompt)
    if not prompts:
        raise ValueError(f"{uri} holds no prompt")
    return PromptSet(uri, tuple(prompts), hashlib.sha256(text.encode()).hexdigest()[:16])


def read_prompt_set(uri: str, store: ObjectStore) -> PromptSet:
    """The prompt set at `uri` (s3:// or a local file)."""
    if is_s3_uri(uri):
        try:
            text = store.get_bytes(uri).decode()
        except ObjectNotFoundError:
            raise ValueError(f"no prompt set at {uri}") from None
    else:
        try:
            with open(uri) as f:
                text = f.read()
        except FileNotFoundError:
            raise ValueError(f"no prompt set at {uri}") from None
    return parse_prompt_set(text, uri)


def default_prompt_set(data: str, store: ObjectStore) -> PromptSet | None:
    """Curation's prompt set beside held-out shards `data` (`<data>/prompts.jsonl`), else None."""
    if not is_s3_uri(data):
        return None
    uri = str(S3Uri.parse(data).join(PROMPTS_FILE))
    return read_prompt_set(uri, store) if store.exists(uri) else None
