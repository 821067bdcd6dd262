"""Model zoo: EAMamba family here, baselines in ``baselines/``, all built from ``conf/model`` presets."""

from harness.models.registry import available, build, create, preset_config, preset_meta

__all__ = ["available", "build", "create", "preset_config", "preset_meta"]
