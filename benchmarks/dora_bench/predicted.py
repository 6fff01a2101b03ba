"""The static cost model's predictions, printed beside what a GPU run measures.

benchmarks/cost_model.py (no GPU: compiled SASS and stated assumptions) writes
benchmarks/results/cost_model_<target>.json; its "predictions" map a GPU ("H100", "H200",
"B200", "A100") to bench.py case keys and their predicted figures (fused_floor, composed_floor,
x_peft_dora, x_peft_lora). A GPU run reads the entry for its device, so its first run calibrates
the model. No file, or no entry for the device or the case: no prediction ('-').
"""
from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1] / "results"
# a substring of torch.cuda.get_device_name -> (the model's GPU, the report's target)
DEVICES = (("H200", "H200", "sm90"), ("H100", "H100", "sm90"), ("B200", "B200", "sm100"), ("A100", "A100", "sm80"))


def load_predictions(device_name: str, results: Path = RESULTS) -> dict:
    """{case key: predicted figures} for the GPU named ``device_name``; {} where there are none."""
    for tag, gpu, target in DEVICES:
        if tag in device_name.upper():
            path = results / f"cost_model_{target}.json"
            try:
                return json.loads(path.read_text()).get("predictions", {}).get(gpu, {})
            except (OSError, ValueError):
                return {}
    return {}


def predicted(predictions: dict, key: str, figure: str = "fused_floor"):
    """One predicted figure of the case ``key``, or None."""
    return (predictions or {}).get(key, {}).get(figure)
