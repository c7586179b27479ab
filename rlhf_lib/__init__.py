"""rlhf_lib: the tested helpers behind the InstructGPT-style study's notebooks.

Stages: data -> sft -> reward -> ppo -> evaluation; presets in configs/, one per model size.
"""

__version__ = "0.1.0"
