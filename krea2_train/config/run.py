"""`RunConfig`: the whole training job, one section per field (each section's type in its own file)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from krea2_train.config.data import DataConfig
from krea2_train.config.memory import MemorySettings
from krea2_train.config.model import ModelConfig
from krea2_train.config.sections import (
    CheckpointSection,
    ExportSection,
    LoggingSection,
    LoraSection,
    OptimizerSection,
    PreviewSection,
    TimestepSection,
    TrainSection,
    ValidationSection,
)


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraSection = field(default_factory=LoraSection)
    train: TrainSection = field(default_factory=TrainSection)
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    timesteps: TimestepSection = field(default_factory=TimestepSection)
    memory: MemorySettings = field(default_factory=MemorySettings)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    preview: PreviewSection = field(default_factory=PreviewSection)
    validation: ValidationSection = field(default_factory=ValidationSection)
    export: ExportSection = field(default_factory=ExportSection)
    output_dir: str = "runs"
    run_name: str = "lora"
    cache_dir: str = ".cache/krea2"
    seed: int = 42
    # When set and missing, the tiny test model is written there first (`krea2-train make-tiny`); used by demo.yaml.
    make_tiny: Optional[str] = None

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.run_name

    @property
    def total_steps(self) -> int:
        return sum(s.steps for s in self.train.stages)
