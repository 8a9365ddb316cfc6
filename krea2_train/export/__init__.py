"""LoRA export for Krea 2: file layouts (diffusers, ComfyUI, Civitai and peers), verification on Turbo, the
Raw -> Turbo transfer report and LoRA tools (inspect, convert, resize, merge, extract).

The one in-memory form is `TrainedAdapter` (diffusers module names, per-module A/B/alpha); every reader produces it
and every writer consumes it, so the effective scale is handled in exactly one place.
"""

from krea2_train.lora.formats import FORMATS, LoraFile, LoraFormatError, TrainedAdapter, read_lora_file, write_lora_file  # noqa: F401
from krea2_train.export.export import export_and_verify, export_lora  # noqa: F401,E402
from krea2_train.export.verify import LoraVerifyError, verify_lora_file  # noqa: F401,E402
