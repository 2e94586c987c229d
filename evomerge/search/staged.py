"""The staged config (PS+DFS): a list of search configs, later stages naming earlier winners.
How the stages run, and their run folders: evomerge/runs/staged.py.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import yaml

from evomerge.core.errors import ConfigError
from evomerge.search.config import SearchConfig, refuse_filled_in
from evomerge.search.validation import check_sources, check_tasks

STAGE_REF = "stage:"
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


def staged_file(path: str | Path) -> bool:
    """Whether a config file is a staged one (has ``stages:``); unreadable files are not."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(data, dict) and "stages" in data


@dataclasses.dataclass(frozen=True)
class StagedConfig:
    """A list of stage configs (dicts: the defaults with each stage's keys on top)."""

    data: dict
    names: list[str]
    stage_dicts: list[dict]

    @classmethod
    def from_dict(cls, data: dict, source: str = "<config>") -> StagedConfig:
        stages = data.get("stages")
        if not isinstance(stages, list) or not stages:
            raise ConfigError(f"{source}: stages: a non-empty list of stage configs is needed")
        defaults = {k: v for k, v in data.items() if k != "stages"}
        if "run_dir" in defaults:
            defaults.pop("run_dir")
        names: list[str] = []
        merged: list[dict] = []
        for i, stage in enumerate(stages):
            where = f"{source}: stages.{i}"
            if not isinstance(stage, dict):
                raise ConfigError(f"{where}: a stage is a mapping with a name and search config keys")
            name = stage.get("name")
            if not isinstance(name, str) or not _NAME.match(name):
                raise ConfigError(f"{where}.name: a stage needs a name of letters, digits, _ . - "
                                  f"(got {name!r})")
            if name in names:
                raise ConfigError(f"{where}.name: stage {name!r} is named twice")
            if "run_dir" in stage:
                raise ConfigError(f"{where}.run_dir: stages live in the staged run folder; set "
                                  "run_dir at the top level")
            d = {**defaults, **{k: v for k, v in stage.items() if k != "name"}}
            for j, m in enumerate(d.get("models") or []):
                ref = stage_ref(m)
                if ref is not None and ref not in names:
                    raise ConfigError(f"{where}.models.{j}: {m!r} names no earlier stage "
                                      f"(earlier: {', '.join(names) or 'none'})")
            names.append(name)
            merged.append(d)
        cfg = cls(data=data, names=names, stage_dicts=merged)
        for i in range(len(names)):  # each stage's schema, with placeholder folders for stage refs
            cfg.stage_config(i, None, source)
        return cfg

    @classmethod
    def load(cls, path: str | Path) -> StagedConfig:
        try:
            data = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"{path}: cannot read the config: {e}") from None
        if isinstance(data, dict):  # a user's file: the keys the search fills in are not theirs
            refuse_filled_in(data, str(path))
            for i, stage in enumerate(data.get("stages") if isinstance(data.get("stages"), list) else []):
                if isinstance(stage, dict):
                    refuse_filled_in(stage, f"{path}: stages.{i}")
        return cls.from_dict(data, str(path))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.data, sort_keys=False)

    def stage_config(self, i: int, run_dir: Path | None, source: str = "<config>") -> SearchConfig:
        """Stage i's search config. With ``run_dir`` None (validation before anything runs) a
        stage reference stands for the referenced stage's first model: same architecture."""
        d = dict(self.stage_dicts[i])
        models = []
        for m in d.get("models") or []:
            ref = stage_ref(m)
            if ref is None:
                models.append(m)
            elif run_dir is None:
                models.append(self._stand_in(ref))
            else:
                models.append(str(run_dir / "models" / ref))
        d["models"] = models
        if run_dir is not None:
            d["run_dir"] = str(run_dir / "stages" / self.names[i])
        return SearchConfig.from_dict(d, source=f"{source}: stages.{i} ({self.names[i]})")

    def _stand_in(self, ref: str) -> str:
        d = self.stage_dicts[self.names.index(ref)]
        first = d.get("base_model") or (d.get("models") or [None])[0]
        return self._stand_in(stage_ref(first)) if stage_ref(first) else first

    def referenced(self) -> set[str]:
        return {r for d in self.stage_dicts for m in d.get("models") or [] if (r := stage_ref(m))}


def stage_ref(model: Any) -> str | None:
    if isinstance(model, str) and model.startswith(STAGE_REF):
        return model[len(STAGE_REF):]
    return None


def validate_stages(cfg: StagedConfig) -> None:
    """Every check that needs no weights, for every stage, before the first stage runs."""
    for i in range(len(cfg.names)):
        sc = cfg.stage_config(i, None)
        check_sources(sc)
        check_tasks(sc)
