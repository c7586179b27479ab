"""Size presets: every knob of every stage, as plain data, validated on load.

Presets live in ``configs/<name>.toml``; each section maps to one dataclass below and every
field says what it is. Loading rejects unknown keys, wrong types, NaN or infinity (also inside
lists) and out-of-range values with an error naming the file, the key and what is allowed::

    from rlhf_lib.config import load_preset
    cfg = load_preset("tiny")          # configs/tiny.toml
    cfg.ppo.kl_beta                    # 0.02, as in the paper
    cfg.fingerprint("sft")             # hash of what the SFT stage depends on

Modules: knobs (the dataclasses: every section and field, with its default, range and meaning) and loading
(load_preset, overrides, validation, describe_knobs).
"""

from rlhf_lib.config.knobs import (
    CONFIG_DIR,
    PRESETS,
    ConfigError,
    DataConfig,
    EvalConfig,
    GenerationConfig,
    LabelerConfig,
    ModelConfig,
    PPOConfig,
    RewardConfig,
    SFTConfig,
    StudyConfig,
    TrackingConfig,
)
from rlhf_lib.config.loading import (
    config_from_dict,
    describe_knobs,
    load_preset,
)

__all__ = [
    "CONFIG_DIR", "ConfigError", "DataConfig", "EvalConfig", "GenerationConfig", "LabelerConfig",
    "ModelConfig", "PPOConfig", "PRESETS", "RewardConfig", "SFTConfig", "StudyConfig", "TrackingConfig",
    "config_from_dict", "describe_knobs", "load_preset",
]
