"""What an evaluation measures with: the evaluation networks (I3D for FVD, optionally a
self-supervised video network for content-debiased FVD, OpenCLIP and the LAION aesthetic
head) as imported weights, and how many videos it generates. A YAML file like
`public-weights.yaml` beside this module (the pipelines' default) or `EvaluationConfig()`
with `allow_random_networks` for tests and the tiny demo."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field

PUBLIC_WEIGHTS = Path(__file__).with_name("public-weights.yaml")


class EvaluationNetworks(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    i3d: str | None = Field(None, description="weights:NAME of the Kinetics-400 I3D (FVD's features)")
    content_debiased: str | None = Field(
        None, description="weights:NAME of a self-supervised VideoMAE (fvd_content_debiased); None: not measured"
    )
    clip_model: str = Field("ViT-L-14-quickgelu", description="open_clip architecture of clip_score")
    clip: str | None = Field(None, description="weights:NAME of that open_clip model")
    aesthetic: str | None = Field(None, description="weights:NAME of the LAION aesthetic head (on clip's embeddings)")
    allow_random_networks: bool = Field(
        False, description="networks without weights run seeded random (tests and the tiny demo only)"
    )
    tiny: bool = Field(False, description="tiny registered open_clip architectures (tests)")
    batch_size: int = Field(8, ge=1, description="clips per feature batch")

    @classmethod
    def from_yaml(cls, path: str | Path) -> EvaluationNetworks:
        raw = yaml.safe_load(Path(path).read_text()) or {}
        return cls(**raw.get("networks", raw))

    def weights_names(self) -> dict[str, str | None]:
        """The weights each network runs with: what makes two evaluations' figures comparable."""
        return {
            "i3d": self.i3d,
            "content_debiased": self.content_debiased,
            "clip": f"{self.clip_model}:{self.clip}",
            "aesthetic": self.aesthetic,
        }


def networks_from(path: str | None, *, random_networks: bool = False) -> EvaluationNetworks:
    """The networks of the YAML file at `path`; an empty path with `random_networks`: every
    network seeded random (the tiny demo)."""
    if path:
        return EvaluationNetworks.from_yaml(path)
    if not random_networks:
        raise ValueError(
            f"no evaluation networks configured: give the networks file (the public one is {PUBLIC_WEIGHTS.name}, "
            "after `vdm weights import` of each) or allow random networks (tests and demos only)"
        )
    return EvaluationNetworks(allow_random_networks=True)
