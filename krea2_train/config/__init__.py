"""The run config: one typed schema (dataclasses as OmegaConf structured configs) for a whole training job.

    run.py       RunConfig: the sections below, plus run name, folders and seed
    model.py, data.py, memory.py, sections.py    one dataclass per section (choices declared on the fields)
    load.py      load_config (YAML + overrides, every check before any work), to_yaml, save_resolved
"""

from krea2_train.config.load import ConfigError, load_config, save_resolved, to_yaml, validate  # noqa: F401
from krea2_train.config.memory import MemorySettings, resolve_memory_settings  # noqa: F401
from krea2_train.config.run import RunConfig  # noqa: F401
from krea2_train.config.sections import (  # noqa: F401
                                         CheckpointSection,
                                         ExportSection,
                                         LoggingSection,
                                         LoraSection,
                                         OptimizerSection,
                                         PreviewSection,
                                         StageSection,
                                         TimestepSection,
                                         TrainSection,
                                         ValidationSection,
)
